//! fanotify event records, parsed without I/O: `struct fanotify_event_metadata` followed by
//! info records, of which the range record (`FAN_EVENT_INFO_TYPE_RANGE`, 6.14+) says which
//! bytes a pre-content event is about. Malformed buffers are errors, never panics.

#![forbid(unsafe_code)]

use crate::frontend::wire::{u16_at, u32_at, u64_at};

/// `FAN_PRE_ACCESS` (6.14+; not in older headers).
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;
/// `FAN_EVENT_INFO_TYPE_RANGE`.
pub const INFO_TYPE_RANGE: u8 = 6;
/// `FANOTIFY_METADATA_VERSION`.
pub const METADATA_VERSION: u8 = 3;
/// `FAN_NOFD`: an event without a file descriptor (queue overflow).
pub const FAN_NOFD: i32 = -1;
const METADATA_LEN: usize = 24;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event mask (`FAN_PRE_ACCESS`...).
    pub mask: u64,
    /// The event's fd (an open file description without notifications).
    pub fd: i32,
    /// The reader's pid.
    pub pid: i32,
    /// (offset, count) of a pre-content event.
    pub range: Option<(u64, u64)>,
}

/// Why a buffer of events could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// An event length that does not fit the buffer.
    #[error("event length {len} at offset {at} is invalid for a {avail}-byte buffer")]
    BadLength {
        /// Offset of the event in the buffer.
        at: usize,
        /// The length it declares.
        len: usize,
        /// Bytes the buffer has.
        avail: usize,
    },
    /// A metadata version this parser does not know.
    #[error("metadata version {0}, expected {METADATA_VERSION}")]
    Version(u8),
    /// An info record that overflows its event.
    #[error("info record at offset {0} overflows its event")]
    BadInfo(usize),
}

/// Parse every event in a buffer returned by `read()` on the fanotify fd.
///
/// On error the events parsed so far are returned with it, so their fds can still be answered
/// and closed. A bad info record does not end the batch: its event's own length is valid, so
/// the event is kept without a range (served as a whole-file access, never left unanswered)
/// and parsing goes on with the next one; only a bad event length ends it.
pub fn parse(buf: &[u8]) -> (Vec<Event>, Option<EventError>) {
    let mut out = Vec::new();
    let mut first_err = None;
    let mut at = 0;
    while at < buf.len() {
        let avail = buf.len() - at;
        if avail < METADATA_LEN {
            return (out, Some(EventError::BadLength { at, len: avail, avail }));
        }
        let ev = &buf[at..];
        let len = u32_at(ev, 0) as usize;
        let meta_len = u16_at(ev, 6) as usize;
        if len < METADATA_LEN || len > avail || meta_len < METADATA_LEN || meta_len > len {
            return (out, Some(EventError::BadLength { at, len, avail }));
        }
        if ev[4] != METADATA_VERSION {
            return (out, Some(EventError::Version(ev[4])));
        }
        let mut event = Event {
            mask: u64_at(ev, 8),
            fd: u32_at(ev, 16) as i32,
            pid: u32_at(ev, 20) as i32,
            range: None,
        };
        let mut info = meta_len;
        while info + 4 <= len {
            let ilen = u16_at(ev, info + 2) as usize;
            if ilen < 4 || info + ilen > len {
                event.range = None;
                first_err.get_or_insert(EventError::BadInfo(at + info));
                break;
            }
            if ev[info] == INFO_TYPE_RANGE && ilen >= 24 {
                event.range = Some((u64_at(ev, info + 8), u64_at(ev, info + 16)));
            }
            info += ilen;
        }
        out.push(event);
        at += len;
    }
    (out, first_err)
}

/// Encode an event the way the kernel lays it out (tests and fuzzing).
pub fn encode(e: &Event) -> Vec<u8> {
    let len = METADATA_LEN + if e.range.is_some() { 24 } else { 0 };
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_le_bytes());
    b.push(METADATA_VERSION);
    b.push(0);
    b.extend_from_slice(&(METADATA_LEN as u16).to_le_bytes());
    b.extend_from_slice(&e.mask.to_le_bytes());
    b.extend_from_slice(&e.fd.to_le_bytes());
    b.extend_from_slice(&e.pid.to_le_bytes());
    if let Some((off, count)) = e.range {
        b.push(INFO_TYPE_RANGE);
        b.push(0);
        b.extend_from_slice(&24u16.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_several_events() {
        let a = Event {
            mask: FAN_PRE_ACCESS,
            fd: 7,
            pid: 100,
            range: Some((1 << 20, 65536)),
        };
        let b = Event {
            mask: 1,
            fd: 8,
            pid: 1,
            range: None,
        };
        let mut buf = encode(&a);
        buf.extend(encode(&b));
        assert_eq!(parse(&buf), (vec![a, b], None));
    }

    #[test]
    fn a_bad_info_record_does_not_drop_the_rest_of_the_batch() {
        let first = Event {
            mask: FAN_PRE_ACCESS,
            fd: 7,
            pid: 1,
            range: Some((0, 4096)),
        };
        let second = Event { fd: 8, ..first.clone() };
        let mut buf = encode(&first);
        buf[METADATA_LEN + 2] = 200; // the range record claims more than its event holds
        buf.extend_from_slice(&encode(&second));
        let (events, err) = parse(&buf);
        assert_eq!(err, Some(EventError::BadInfo(METADATA_LEN)));
        assert_eq!(events.len(), 2, "both fds are answered");
        assert_eq!((events[0].fd, events[0].range), (7, None));
        assert_eq!(events[1], second);
    }

    #[test]
    fn malformed_is_an_error() {
        let mut e = encode(&Event {
            mask: FAN_PRE_ACCESS,
            fd: 3,
            pid: 1,
            range: Some((0, 1)),
        });
        e[0] = 200;
        assert!(parse(&e).1.is_some());
        assert!(parse(&[0; 10]).1.is_some());
        let mut v = encode(&Event {
            mask: 0,
            fd: 1,
            pid: 1,
            range: None,
        });
        v[4] = 2;
        assert_eq!(parse(&v).1, Some(EventError::Version(2)));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse(&bytes);
        }
    }
}
