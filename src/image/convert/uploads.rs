//! Data blobs stored while later layers convert: each layer's blob goes to the destination as
//! soon as the layer is applied, at most [`MAX_UPLOADS`] at a time, so the uploads of a
//! many-layer image overlap the conversion of the layers after them. A blob pushed to a
//! registry while its layer converted (`Location::push_growing`) is only committed here; if
//! that push failed, the finished file is pushed again.

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;

use super::Location;
use crate::image::spool::SpooledBlob;
use crate::registry::streamed::{Committed, StreamedPush};
use crate::registry::{Registry, RegistryError};

/// A layer's finished data blob, and its push if one started while it was written.
pub(super) struct LayerBlob {
    pub blob: SpooledBlob,
    pub streamed: Option<StreamedPush>,
}

/// Data blobs being stored at once (each holds an upload piece in memory).
const MAX_UPLOADS: usize = 2;

/// How a data blob reaches its destination.
#[derive(Debug, Clone, Copy)]
enum Route {
    /// Pushed while its layer converted, committed here.
    Streamed,
    /// The registry had it already.
    Present,
    /// Stored from its finished file (a layout; a registry when the stream did not make it).
    FromFile,
}

/// The data blobs being stored.
pub(super) struct Uploads<'a> {
    registry: &'a Registry,
    dst: &'a Location,
    pending: FuturesUnordered<BoxFuture<'a, Result<Route, RegistryError>>>,
    /// Blobs stored so far that went up while their layer converted.
    streamed: usize,
}

impl<'a> Uploads<'a> {
    pub fn new(registry: &'a Registry, dst: &'a Location) -> Uploads<'a> {
        Uploads {
            registry,
            dst,
            pending: FuturesUnordered::new(),
            streamed: 0,
        }
    }

    /// Start storing `blob`, once fewer than [`MAX_UPLOADS`] are under way.
    pub async fn start(&mut self, LayerBlob { blob, streamed }: LayerBlob) -> Result<(), RegistryError> {
        while self.pending.len() >= MAX_UPLOADS {
            self.next().await?;
        }
        let (registry, dst) = (self.registry, self.dst);
        self.pending.push(
            async move {
                let (size, digest) = (blob.chunks.size, blob.chunks.digest.to_string());
                let route = match streamed {
                    Some(s) => match s.commit(&digest, size).await {
                        Ok(Committed::Stored) => Route::Streamed,
                        Ok(Committed::AlreadyThere) => Route::Present,
                        Err(e) => {
                            tracing::warn!(blob = %digest, error = %e, "the data blob pushed while its layer converted was not stored: pushing it again");
                            Route::FromFile
                        }
                    },
                    None => Route::FromFile,
                };
                if let Route::FromFile = route {
                    dst.put_blob_file(registry, Arc::new(blob.file), size, digest.clone())
                        .await?;
                }
                tracing::info!(blob = %digest, bytes = size, ?route, "data blob stored");
                Ok(route)
            }
            .boxed(),
        );
        Ok(())
    }

    /// Run `work` while the uploads go on; a failed upload ends it.
    pub async fn alongside<T>(&mut self, work: impl Future<Output = T>) -> Result<T, RegistryError> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return Ok(done),
                stored = self.pending.next(), if !self.pending.is_empty() => self.count(stored)?,
            }
        }
    }

    /// Wait until every blob is stored; how many went up while their layer converted.
    pub async fn finish(mut self) -> Result<usize, RegistryError> {
        while !self.pending.is_empty() {
            self.next().await?;
        }
        Ok(self.streamed)
    }

    async fn next(&mut self) -> Result<(), RegistryError> {
        let stored = self.pending.next().await;
        self.count(stored)
    }

    /// Count a blob stored (`None`: nothing was pending).
    fn count(&mut self, stored: Option<Result<Route, RegistryError>>) -> Result<(), RegistryError> {
        if let Some(Route::Streamed) = stored.transpose()? {
            self.streamed += 1;
        }
        Ok(())
    }
}
