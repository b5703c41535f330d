//! The fanotify pre-content frontend (Linux 6.14+; the only lazy path on 7.2+): EROFS is
//! mounted file-backed from the verified metadata blob with `device=` sparse cache files, one
//! per data blob, marked `FAN_PRE_ACCESS`. `event` parses, `sys` holds the syscalls, `cache`
//! the sparse files, `pin` keeps metadata blobs resident, `serve` the event loop.

pub mod cache;
pub mod event;
pub mod journal;
pub mod pin;
pub mod serve;
pub mod sys;

pub use serve::{FanotifyFrontend, FanotifyStats};
