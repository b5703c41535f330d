//! How the file's numbers become typed values: milliseconds become `Duration`s, a 0 that
//! means "off" or "unlimited" becomes `None`, strings with a grammar (the platform) are
//! parsed. Used by serde's `deserialize_with` on the fields of [`super::Config`].

use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Milliseconds.
pub fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

/// Milliseconds, 0 meaning off.
pub fn millis_or_off<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    u64::deserialize(d).map(|ms| (ms > 0).then(|| Duration::from_millis(ms)))
}

/// Microseconds, 0 meaning off.
pub fn micros_or_off<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    u64::deserialize(d).map(|us| (us > 0).then(|| Duration::from_micros(us)))
}

/// A count or size, 0 meaning off (or unlimited).
pub fn nonzero_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NonZeroU64>, D::Error> {
    u64::deserialize(d).map(NonZeroU64::new)
}

/// A count or size, 0 meaning off.
pub fn nonzero_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NonZeroU32>, D::Error> {
    u32::deserialize(d).map(NonZeroU32::new)
}

/// A string parsed with its type's `FromStr`.
pub fn parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    Option::<String>::deserialize(d)?
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .transpose()
}
