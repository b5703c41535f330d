//! A data blob read while it is still being written: the spool tells how many bytes are on its
//! file, and a follower reads them in pieces as they land, so a push can start with the
//! layer's first files instead of after its last one. A file written already is read the same
//! way (`Growing::finished`): every push streams its file through here.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::watch;

/// How much of a blob is on its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// This many bytes so far; more may follow.
    Growing(u64),
    /// All of it: the blob's final size.
    Done(u64),
}

/// A blob being written, and how far (see the module comment).
#[derive(Clone)]
pub struct Growing {
    file: Arc<File>,
    written: watch::Receiver<Written>,
}

impl Growing {
    /// The blob on `file` (read at offsets, never through its cursor), whose progress
    /// `written` tells. A sender dropped before `Done` means the blob will not be finished.
    pub fn new(file: Arc<File>, written: watch::Receiver<Written>) -> Growing {
        Growing { file, written }
    }

    /// The first `size` bytes of `file`, all written already.
    pub fn finished(file: Arc<File>, size: u64) -> Growing {
        let (_done, written) = watch::channel(Written::Done(size));
        Growing { file, written }
    }

    /// The blob's bytes in order, in pieces of at most `piece` bytes, each as soon as it is
    /// written (read on the blocking pool). Ends after the last byte of a finished blob; an
    /// error if the blob is abandoned first.
    pub fn stream(self, piece: u64) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        futures::stream::try_unfold((self, 0u64), move |(mut g, at)| async move {
            let end = match g.written_past(at).await? {
                Some(end) => end,
                None => return Ok(None),
            };
            let n = (end - at).min(piece);
            let file = Arc::clone(&g.file);
            let bytes = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n as usize];
                file.read_exact_at(&mut buf, at).map(|()| Bytes::from(buf))
            })
            .await
            .map_err(io::Error::other)??;
            Ok(Some((bytes, (g, at + n))))
        })
    }

    /// Wait until more than `at` bytes are written: how many (`None`: the blob is finished
    /// and `at` is its end).
    async fn written_past(&mut self, at: u64) -> io::Result<Option<u64>> {
        loop {
            match *self.written.borrow_and_update() {
                Written::Done(end) if end <= at => return Ok(None),
                Written::Done(end) | Written::Growing(end) if end > at => return Ok(Some(end)),
                _ => {}
            }
            if self.written.changed().await.is_err() {
                // the writer is gone: only a value it left before going can still be news
                if let Written::Done(end) = *self.written.borrow_and_update() {
                    return Ok((end > at).then_some(end));
                }
                return Err(io::Error::other("the blob was abandoned before it was finished"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::io::Write;

    fn blob() -> (Arc<File>, File) {
        let f = tempfile::tempfile().unwrap();
        (Arc::new(f.try_clone().unwrap()), f)
    }

    #[tokio::test]
    async fn a_follower_reads_each_byte_as_it_lands_and_ends_with_the_blob() {
        let (reader, mut writer) = blob();
        let (tx, rx) = watch::channel(Written::Growing(0));
        let follow = tokio::spawn(async move {
            let pieces: Vec<Bytes> = Growing::new(reader, rx).stream(3).map(|p| p.unwrap()).collect().await;
            pieces
        });
        let mut n = 0;
        for part in [&b"hello"[..], b" ", b"world, growing"] {
            writer.write_all(part).unwrap();
            n += part.len() as u64;
            tx.send_replace(Written::Growing(n));
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        tx.send_replace(Written::Done(n));
        drop(tx);
        let pieces = follow.await.unwrap();
        assert!(pieces.iter().all(|p| p.len() <= 3 && !p.is_empty()));
        assert_eq!(pieces.concat(), b"hello world, growing");
    }

    #[tokio::test]
    async fn a_blob_abandoned_midway_fails_its_follower() {
        let (reader, mut writer) = blob();
        let (tx, rx) = watch::channel(Written::Growing(0));
        writer.write_all(b"partial").unwrap();
        tx.send_replace(Written::Growing(7));
        let mut s = Box::pin(Growing::new(reader, rx).stream(1 << 20));
        assert_eq!(&s.next().await.unwrap().unwrap()[..], b"partial");
        drop(tx);
        let err = s.next().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("abandoned"), "{err}");
    }

    #[tokio::test]
    async fn a_file_written_already_is_read_whole_and_a_short_one_fails() {
        let (reader, mut writer) = blob();
        writer.write_all(b"0123456789").unwrap();
        let whole = Growing::finished(Arc::clone(&reader), 10).stream(4);
        let pieces: Vec<Bytes> = whole.map(|p| p.unwrap()).collect().await;
        assert_eq!(pieces.iter().map(|p| p.len()).collect::<Vec<_>>(), [4, 4, 2]);
        assert_eq!(pieces.concat(), b"0123456789");
        let mut short = Box::pin(Growing::finished(reader, 11).stream(64));
        assert!(short.next().await.unwrap().is_err(), "11 bytes asked of a 10-byte file");
    }

    #[tokio::test]
    async fn an_empty_finished_blob_is_an_empty_stream() {
        let (reader, _writer) = blob();
        let (tx, rx) = watch::channel(Written::Done(0));
        drop(tx);
        assert!(Box::pin(Growing::new(reader, rx).stream(4)).next().await.is_none());
    }
}
