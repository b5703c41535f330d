//! cachefiles across a daemon restart: the device fd and every open object's anonymous fd
//! are kept with the guard (the kernel fails the READs of an object whose fd closes, and
//! declares the cache dead when the last device fd closes). A new daemon takes them over,
//! rebuilds its object table from the keys kept with each fd, and writes `restore`: the
//! kernel sends every request still in flight again, and the readers of the dead daemon
//! get their bytes from the new one.

#![forbid(unsafe_code)]

use std::os::fd::AsFd;
use std::sync::Arc;

use super::device::{AnonFd, Device};
use super::protocol::{erofs_fsid, Command};
use super::serve::{Cachefiles, Object, Serving};
use crate::frontend::guard::{self, Handover};
use crate::lock::lock;

/// An object's volume and cookie keys as kept with its fd: the volume key's length (u16),
/// the volume key, the cookie key.
pub fn keys(volume_key: &[u8], cookie_key: &[u8]) -> Vec<u8> {
    let len = u16::try_from(volume_key.len()).unwrap_or(u16::MAX);
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(&volume_key[..usize::from(len).min(volume_key.len())]);
    out.extend_from_slice(cookie_key);
    out
}

/// The volume and cookie keys of [`keys`] (untrusted bytes: `None` if malformed).
fn split_keys(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::from(u16::from_le_bytes(b.get(..2)?.try_into().ok()?));
    let rest = b.get(2..)?;
    (rest.len() >= len).then(|| rest.split_at(len))
}

impl Cachefiles {
    /// Serve the cache a guard handed over: its objects again, then `restore`, so the kernel
    /// sends again what the previous daemon left unanswered.
    pub fn adopt(handover: Handover, how: Serving) -> std::io::Result<Arc<Cachefiles>> {
        let catalog = Arc::clone(&how.catalog);
        let read_ahead_max = how.read_ahead_max;
        let device = handover
            .kernel
            .into_iter()
            .next()
            .ok_or_else(|| std::io::Error::other("the guard handed over no cachefiles device"))?;
        let c = Cachefiles::serving(Device::from_fd(device), how)?;
        let mut adopted = 0;
        for kept in handover.kept {
            let object_id = u32::try_from(kept.key).ok();
            let target = split_keys(&kept.detail)
                .and_then(|(v, k)| catalog.lookup(erofs_fsid(v)?, k).map(|t| (t, v.to_vec(), k.to_vec())));
            let (Some(object_id), Some((target, v, k))) = (object_id, target) else {
                tracing::warn!(
                    key = kept.key,
                    "an object kept by the guard names no registered blob: closed"
                );
                continue;
            };
            let obj = Object::new(AnonFd::from_fd(kept.fd), target, keys(&v, &k), read_ahead_max);
            lock(&c.objects).insert(object_id, Arc::new(obj));
            adopted += 1;
        }
        c.dev
            .get_ref()
            .command(&Command::Restore)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cachefiles 'restore' (needs Linux 6.8+): {e}")))?;
        tracing::warn!(
            objects = adopted,
            "took over the cachefiles cache of a daemon that stopped; its requests in flight are sent again"
        );
        Ok(c)
    }

    /// Keep objects' fds with this daemon's guard from now on, and those open already.
    pub fn set_keeper(&self, keeper: std::os::unix::net::UnixStream) {
        for (id, obj) in lock(&self.objects).iter() {
            guard::keep(&keeper, u64::from(*id), &obj.keys, obj.fd.as_fd());
        }
        *lock(&self.keeper) = Some(keeper);
    }

    /// Keep a newly opened object's fd with the guard.
    pub(super) fn keep(&self, object_id: u32, obj: &Object) {
        if let Some(k) = &*lock(&self.keeper) {
            guard::keep(k, u64::from(object_id), &obj.keys, obj.fd.as_fd());
        }
    }

    /// The kernel closed an object: the guard lets its fd go.
    pub(super) fn forget(&self, object_id: u32) {
        if let Some(k) = &*lock(&self.keeper) {
            guard::forget(k, u64::from(object_id));
        }
    }

    /// The device fd (for the guard to hold a duplicate).
    pub fn device(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dev.get_ref().as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_garbage_is_refused() {
        let b = keys(b"erofs,lb-0123\0", b"\x01\x02cookie");
        assert_eq!(split_keys(&b), Some((&b"erofs,lb-0123\0"[..], &b"\x01\x02cookie"[..])));
        assert_eq!(split_keys(b""), None);
        assert_eq!(split_keys(&[0xff, 0xff, 1]), None);
    }
}
