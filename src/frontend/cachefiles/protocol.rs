//! The cachefiles on-demand wire protocol (uapi `linux/cachefiles.h`), without I/O.
//!
//! Every message the kernel hands to the daemon is parsed into a [`Message`]; every
//! reply the daemon writes is encoded by [`Command`]. Parsing never panics: a short
//! buffer, a header length that disagrees with the bytes read, keys that overflow the
//! message or an unknown opcode all come back as a [`ProtocolError`].

#![forbid(unsafe_code)]

use std::fmt;

use crate::frontend::wire::{u32_at, u64_at};

/// Largest message the kernel sends (`CACHEFILES_MSG_MAX_SIZE`).
pub const MSG_MAX_SIZE: usize = 1024;
/// Size of `struct cachefiles_msg` (the header of every message).
pub const HEADER_SIZE: usize = 16;
/// Size of `struct cachefiles_open` without its trailing key data.
pub const OPEN_SIZE: usize = 16;
/// Size of `struct cachefiles_read`.
pub const READ_SIZE: usize = 16;

const OP_OPEN: u32 = 0;
const OP_CLOSE: u32 = 1;
const OP_READ: u32 = 2;

/// Why a kernel message could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Fewer bytes than a structure needs.
    #[error("message of {got} bytes is shorter than the {need}-byte {what}")]
    Short {
        /// The structure.
        what: &'static str,
        /// Its size.
        need: usize,
        /// The bytes there were.
        got: usize,
    },
    /// The header's length and the bytes read differ.
    #[error("header says {header} bytes but {read} were read")]
    LengthMismatch {
        /// The length the header declares.
        header: u32,
        /// The length read.
        read: usize,
    },
    /// A message longer than the kernel ever sends.
    #[error("message of {0} bytes exceeds CACHEFILES_MSG_MAX_SIZE")]
    TooLong(usize),
    /// The keys of an OPEN overflow its payload.
    #[error("OPEN keys ({volume} + {cookie} bytes) overflow the {avail}-byte payload")]
    KeysOverflow {
        /// Volume key length.
        volume: u32,
        /// Cookie key length.
        cookie: u32,
        /// Bytes the payload has.
        avail: usize,
    },
    /// The volume key of an OPEN is malformed.
    #[error("OPEN volume key is empty or not NUL-terminated")]
    VolumeKeyNotTerminated,
    /// An opcode this daemon does not know.
    #[error("unknown opcode {0}")]
    UnknownOpcode(u32),
}

/// Header fields shared by every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The id to answer with.
    pub msg_id: u32,
    /// The object the kernel opened.
    pub object_id: u32,
}

/// One parsed kernel request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The kernel opened an object (a blob) of a volume (an image).
    Open {
        /// Message id and object.
        header: Header,
        /// Volume key without its trailing NUL, e.g. `erofs,myfsid`.
        volume_key: Vec<u8>,
        /// Cookie key (binary, no NUL): the fsid or a device tag for EROFS.
        cookie_key: Vec<u8>,
        /// Anonymous fd the kernel installed in our fd table for this object.
        fd: u32,
        /// OPEN flags.
        flags: u32,
    },
    /// The kernel closed an object.
    Close {
        /// Message id and object.
        header: Header,
    },
    /// The kernel needs a range of an object.
    Read {
        /// Message id and object.
        header: Header,
        /// Offset in the object.
        offset: u64,
        /// Length of the range.
        len: u64,
    },
}

impl Message {
    /// The header of any message.
    pub fn header(&self) -> Header {
        match self {
            Message::Open { header, .. } | Message::Close { header } | Message::Read { header, .. } => *header,
        }
    }

    /// Parse one message exactly as `read()` on `/dev/cachefiles` returned it.
    pub fn parse(buf: &[u8]) -> Result<Message, ProtocolError> {
        if buf.len() > MSG_MAX_SIZE {
            return Err(ProtocolError::TooLong(buf.len()));
        }
        let head = take::<HEADER_SIZE>(buf, 0, "message header")?;
        let msg_id = u32_at(&head, 0);
        let opcode = u32_at(&head, 4);
        let len = u32_at(&head, 8);
        let object_id = u32_at(&head, 12);
        if len as usize != buf.len() {
            return Err(ProtocolError::LengthMismatch {
                header: len,
                read: buf.len(),
            });
        }
        let header = Header { msg_id, object_id };
        let payload = &buf[HEADER_SIZE..];
        match opcode {
            OP_OPEN => parse_open(header, payload),
            OP_CLOSE => Ok(Message::Close { header }),
            OP_READ => {
                let body = take::<READ_SIZE>(payload, 0, "READ payload")?;
                Ok(Message::Read {
                    header,
                    offset: u64_at(&body, 0),
                    len: u64_at(&body, 8),
                })
            }
            other => Err(ProtocolError::UnknownOpcode(other)),
        }
    }

    /// Encode a message the way the kernel lays it out (used by tests and fuzzing).
    pub fn encode(&self) -> Vec<u8> {
        let (opcode, payload) = match self {
            Message::Open {
                volume_key,
                cookie_key,
                fd,
                flags,
                ..
            } => {
                let mut p = Vec::with_capacity(OPEN_SIZE + volume_key.len() + 1 + cookie_key.len());
                p.extend_from_slice(&(volume_key.len() as u32 + 1).to_le_bytes());
                p.extend_from_slice(&(cookie_key.len() as u32).to_le_bytes());
                p.extend_from_slice(&fd.to_le_bytes());
                p.extend_from_slice(&flags.to_le_bytes());
                p.extend_from_slice(volume_key);
                p.push(0);
                p.extend_from_slice(cookie_key);
                (OP_OPEN, p)
            }
            Message::Close { .. } => (OP_CLOSE, Vec::new()),
            Message::Read { offset, len, .. } => {
                let mut p = Vec::with_capacity(READ_SIZE);
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&len.to_le_bytes());
                (OP_READ, p)
            }
        };
        let h = self.header();
        let mut out = Vec::with_capacity(HEADER_SIZE + payload.len());
        out.extend_from_slice(&h.msg_id.to_le_bytes());
        out.extend_from_slice(&opcode.to_le_bytes());
        out.extend_from_slice(&((HEADER_SIZE + payload.len()) as u32).to_le_bytes());
        out.extend_from_slice(&h.object_id.to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }
}

fn parse_open(header: Header, payload: &[u8]) -> Result<Message, ProtocolError> {
    let fixed = take::<OPEN_SIZE>(payload, 0, "OPEN payload")?;
    let volume_size = u32_at(&fixed, 0);
    let cookie_size = u32_at(&fixed, 4);
    let keys = &payload[OPEN_SIZE..];
    let overflow = ProtocolError::KeysOverflow {
        volume: volume_size,
        cookie: cookie_size,
        avail: keys.len(),
    };
    let total = (volume_size as usize)
        .checked_add(cookie_size as usize)
        .ok_or(overflow.clone())?;
    if total > keys.len() {
        return Err(overflow);
    }
    let (volume, rest) = keys.split_at(volume_size as usize);
    let volume_key = match volume.split_last() {
        Some((0, key)) => key.to_vec(),
        _ => return Err(ProtocolError::VolumeKeyNotTerminated),
    };
    Ok(Message::Open {
        header,
        volume_key,
        cookie_key: rest[..cookie_size as usize].to_vec(),
        fd: u32_at(&fixed, 8),
        flags: u32_at(&fixed, 12),
    })
}

fn take<const N: usize>(buf: &[u8], at: usize, what: &'static str) -> Result<[u8; N], ProtocolError> {
    buf.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .ok_or(ProtocolError::Short {
            what,
            need: N,
            got: buf.len(),
        })
}

/// A text command written to `/dev/cachefiles` (never with a trailing NUL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// `dir <path>`: the cache directory.
    Dir(&'a str),
    /// `tag <name>`: the cache tag.
    Tag(&'a str),
    /// `bind ondemand`.
    BindOndemand,
    /// `copen <msg_id>,<size>`: answer an OPEN with the object size.
    Copen {
        /// The OPEN answered.
        msg_id: u32,
        /// The object size.
        size: u64,
    },
    /// `copen <msg_id>,-<errno>`: refuse an OPEN.
    CopenError {
        /// The OPEN refused.
        msg_id: u32,
        /// Its negative errno, as a positive number.
        errno: i32,
    },
    /// `restore`: re-deliver in-flight requests after a daemon restart (6.8+).
    Restore,
}

impl fmt::Display for Command<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Dir(p) => write!(f, "dir {p}"),
            Command::Tag(t) => write!(f, "tag {t}"),
            Command::BindOndemand => f.write_str("bind ondemand"),
            Command::Copen { msg_id, size } => write!(f, "copen {msg_id},{size}"),
            Command::CopenError { msg_id, errno } => write!(f, "copen {msg_id},-{}", errno.abs()),
            Command::Restore => f.write_str("restore"),
        }
    }
}

impl Command<'_> {
    /// The bytes to write, without a trailing NUL (the kernel refuses one).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

/// The EROFS fsid named by a volume key `erofs,<fsid>`, if it is one.
pub fn erofs_fsid(volume_key: &[u8]) -> Option<&str> {
    std::str::from_utf8(volume_key.strip_prefix(b"erofs,")?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn open(volume: &[u8], cookie: &[u8]) -> Message {
        Message::Open {
            header: Header {
                msg_id: 7,
                object_id: 3,
            },
            volume_key: volume.to_vec(),
            cookie_key: cookie.to_vec(),
            fd: 12,
            flags: 0,
        }
    }

    #[test]
    fn open_round_trip_matches_kernel_layout() {
        let bytes = open(b"erofs,img", b"img").encode();
        // header 16 + open 16 + "erofs,img\0" 10 + "img" 3
        assert_eq!(bytes.len(), 45);
        assert_eq!(&bytes[8..12], &45u32.to_le_bytes());
        assert_eq!(&bytes[16..20], &10u32.to_le_bytes(), "volume key size counts the NUL");
        assert_eq!(Message::parse(&bytes).unwrap(), open(b"erofs,img", b"img"));
    }

    #[test]
    fn read_and_close_parse() {
        let read = Message::Read {
            header: Header {
                msg_id: 1,
                object_id: 2,
            },
            offset: 1 << 40,
            len: 65536,
        };
        assert_eq!(Message::parse(&read.encode()).unwrap(), read);
        let close = Message::Close {
            header: Header {
                msg_id: 9,
                object_id: 2,
            },
        };
        assert_eq!(Message::parse(&close.encode()).unwrap(), close);
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(matches!(Message::parse(&[0; 8]), Err(ProtocolError::Short { .. })));
        let mut read = Message::Read {
            header: Header {
                msg_id: 1,
                object_id: 1,
            },
            offset: 0,
            len: 1,
        }
        .encode();
        read.push(0);
        assert!(matches!(
            Message::parse(&read),
            Err(ProtocolError::LengthMismatch { .. })
        ));
        let mut bad_op = read[..32].to_vec();
        bad_op[4] = 9;
        assert_eq!(Message::parse(&bad_op), Err(ProtocolError::UnknownOpcode(9)));
        let mut overflow = open(b"erofs,x", b"x").encode();
        overflow[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Message::parse(&overflow),
            Err(ProtocolError::KeysOverflow { .. })
        ));
        let mut unterminated = open(b"erofs,x", b"x").encode();
        unterminated[16 + 16 + 7] = b'!';
        assert_eq!(
            Message::parse(&unterminated),
            Err(ProtocolError::VolumeKeyNotTerminated)
        );
        assert!(matches!(Message::parse(&[0; 2048]), Err(ProtocolError::TooLong(2048))));
    }

    #[test]
    fn commands_have_no_trailing_nul() {
        assert_eq!(Command::Copen { msg_id: 4, size: 8192 }.to_bytes(), b"copen 4,8192");
        assert_eq!(Command::CopenError { msg_id: 4, errno: 2 }.to_bytes(), b"copen 4,-2");
        assert_eq!(Command::CopenError { msg_id: 4, errno: -5 }.to_bytes(), b"copen 4,-5");
        assert_eq!(Command::BindOndemand.to_bytes(), b"bind ondemand");
        assert_eq!(Command::Dir("/var/cache/x").to_string(), "dir /var/cache/x");
        assert_eq!(erofs_fsid(b"erofs,abc"), Some("abc"));
        assert_eq!(erofs_fsid(b"nfs,abc"), None);
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            let _ = Message::parse(&bytes);
        }

        #[test]
        fn parse_never_panics_with_consistent_length(
            mut bytes in proptest::collection::vec(any::<u8>(), 16..1024),
            opcode in 0u32..4,
        ) {
            let n = bytes.len() as u32;
            bytes[4..8].copy_from_slice(&opcode.to_le_bytes());
            bytes[8..12].copy_from_slice(&n.to_le_bytes());
            let _ = Message::parse(&bytes);
        }

        #[test]
        fn open_round_trips(volume in proptest::collection::vec(1u8..=255, 0..200),
                            cookie in proptest::collection::vec(any::<u8>(), 0..300)) {
            let m = open(&volume, &cookie);
            prop_assert_eq!(Message::parse(&m.encode()).unwrap(), m);
        }
    }
}
