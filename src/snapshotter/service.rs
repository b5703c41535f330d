//! The gRPC side: containerd's `Snapshots` service over the [`Store`], served on a unix
//! socket that only root may connect to (mode 0600, peers checked with `SO_PEERCRED`).
//! Errors carry the codes containerd acts on: NotFound, AlreadyExists, FailedPrecondition,
//! InvalidArgument.

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::api::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use super::api::snapshots::{self as pb};
use super::filter::{self, Filter};
use super::mounts;
use super::remote::{self, Images, Layer};
use super::store::{Kind, Snapshot, Source, Store, StoreError};

/// The snapshots service.
pub struct Service {
    store: Arc<Store>,
    root: std::path::PathBuf,
    images: Arc<dyn Images>,
    /// Serialises image mounts and unmounts.
    mounting: tokio::sync::Mutex<()>,
}

impl Service {
    /// The service over `store` (kept in `root`), mounting lazy images through `images`.
    pub fn new(store: Arc<Store>, root: &Path, images: Arc<dyn Images>) -> Service {
        Service {
            store,
            root: root.to_path_buf(),
            images,
            mounting: tokio::sync::Mutex::new(()),
        }
    }

    /// Run a store operation on the blocking pool: it creates directories and fsyncs.
    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || op(&store))
            .await
            .unwrap_or_else(|e| Err(StoreError::Io(std::io::Error::other(e))))
    }

    fn image_mount(&self) -> impl Fn(&str) -> std::path::PathBuf + '_ {
        move |pinned| remote::mount_point(&self.root, pinned)
    }

    /// The mounts of `key`, with the lazy image below it mounted.
    async fn mounts_of(&self, key: &str, s: &Snapshot) -> Result<Vec<super::api::Mount>, Status> {
        let ancestors = self.store.ancestors(key).map_err(status)?;
        if let Some(pinned) = mounts::remote_image(s, &ancestors) {
            let _one = self.mounting.lock().await;
            let target = remote::mount_point(&self.root, pinned);
            self.images
                .ensure_mounted(pinned, &target)
                .await
                .map_err(|e| Status::unavailable(format!("mounting lazyblob image {pinned}: {e}")))?;
        }
        Ok(mounts::for_snapshot(&self.store, &ancestors, s, &self.image_mount()))
    }

    /// Commit a lazyblob layer under its chain ID without unpacking anything; containerd is
    /// told ALREADY_EXISTS and downloads nothing.
    async fn commit_remote(
        &self,
        key: &str,
        parent: &str,
        labels: std::collections::HashMap<String, String>,
        (chain, role, pinned, layer): (
            String,
            String,
            Result<String, super::remote::LabelError>,
            Option<String>,
        ),
    ) -> Status {
        let pinned = match pinned {
            Ok(p) => p,
            Err(e) => return Status::failed_precondition(e.to_string()),
        };
        let layers = match self.images.register(&pinned).await {
            Ok(l) => l,
            Err(e) => return Status::failed_precondition(format!("lazyblob image {pinned}: {e}")),
        };
        if role != "chunks" && layer.as_ref().is_some_and(|l| !layers.contains(l)) {
            return Status::failed_precondition(format!("layer {layer:?} is not part of lazyblob image {pinned}"));
        }
        let parent = (!parent.is_empty()).then(|| parent.to_string());
        let labels: BTreeMap<String, String> = labels.into_iter().collect();
        let remote = BTreeMap::from([(remote::LABEL_REMOTE.to_string(), "remote".to_string())]);
        let (k, c, source) = (key.to_string(), chain.clone(), Source::Remote { image: pinned.clone() });
        let committed = self
            .blocking(move |st| {
                st.create(Kind::Active, &k, parent.as_deref(), labels)?;
                let committed = st.commit_as(&c, &k, remote, source);
                if committed.is_err() {
                    let _ = st.remove(&k);
                }
                committed
            })
            .await;
        match committed {
            Ok(s) => {
                tracing::info!(
                    chain,
                    role,
                    image = pinned,
                    id = s.id,
                    "lazyblob layer committed remotely"
                );
                Status::already_exists(format!("{chain}: lazyblob layer committed remotely"))
            }
            Err(StoreError::AlreadyExists(_)) => Status::already_exists(format!("{chain} exists")),
            Err(e) => status(e),
        }
    }

    /// Unmount the lazy images no snapshot reads through any more.
    async fn release_unused_images(&self) {
        let _one = self.mounting.lock().await;
        let mut in_use = std::collections::HashSet::new();
        for (key, s) in self.store.all() {
            if s.source != Source::Local {
                continue;
            }
            let Ok(ancestors) = self.store.ancestors(&key) else {
                continue;
            };
            if let Some(image) = mounts::remote_image(&s, &ancestors) {
                in_use.insert(remote::mount_point(&self.root, image));
            }
        }
        let Ok(dir) = std::fs::read_dir(self.root.join("images")) else {
            return;
        };
        for e in dir.flatten() {
            let target = e.path();
            if in_use.contains(&target) || !crate::frontend::mount::is_erofs_mount(&target) {
                continue;
            }
            match self.images.unmount(&target).await {
                Ok(()) => tracing::info!(target = %target.display(), "lazyblob image no longer used: unmounted"),
                Err(e) => tracing::warn!(target = %target.display(), error = %e, "could not unmount an unused image"),
            }
        }
    }

    /// Serve on `socket` until `shutdown` fires.
    pub async fn serve(
        self,
        socket: &Path,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), tonic::transport::Error> {
        let routes = tonic::service::Routes::new(SnapshotsServer::new(self));
        crate::api::peer::serve_grpc(socket, "containerd snapshotter", routes, shutdown).await
    }

    fn info(&self, name: &str, s: &Snapshot) -> pb::Info {
        pb::Info {
            name: name.to_string(),
            parent: s.parent.clone().unwrap_or_default(),
            kind: kind_of(s.kind) as i32,
            created_at: Some(s.created.into()),
            updated_at: Some(s.updated.into()),
            labels: s.labels.clone().into_iter().collect(),
        }
    }

    /// Prepare or View: create the snapshot and answer its mounts (a lazyblob layer is
    /// committed remotely instead).
    async fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: std::collections::HashMap<String, String>,
    ) -> Result<Vec<super::api::Mount>, Status> {
        if kind == Kind::Active {
            if let Layer::Lazyblob {
                chain,
                role,
                pinned,
                layer,
            } = remote::classify(&labels)
            {
                return Err(self
                    .commit_remote(key, parent, labels, (chain, role, pinned, layer))
                    .await);
            }
        }
        let parent = (!parent.is_empty()).then(|| parent.to_string());
        let labels: BTreeMap<String, String> = labels.into_iter().collect();
        let (k, p) = (key.to_string(), parent.clone());
        let s = self
            .blocking(move |st| st.create(kind, &k, p.as_deref(), labels))
            .await
            .map_err(status)?;
        tracing::debug!(key, ?parent, ?kind, id = s.id, "snapshot created");
        match self.mounts_of(key, &s).await {
            Ok(m) => Ok(m),
            Err(e) => {
                let k = key.to_string();
                let _ = self.blocking(move |st| st.remove(&k)).await;
                Err(e)
            }
        }
    }
}

fn kind_of(k: Kind) -> pb::Kind {
    match k {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::View => "view",
        Kind::Active => "active",
        Kind::Committed => "committed",
    }
}

fn status(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(_) => Status::not_found(e.to_string()),
        StoreError::AlreadyExists(_) => Status::already_exists(e.to_string()),
        StoreError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
        StoreError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
        StoreError::Io(_) => Status::internal(e.to_string()),
    }
}

/// Bytes allocated and inodes under `dir` (hard links counted once).
fn usage(dir: &Path) -> std::io::Result<(i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut inodes) = (0i64, 0i64);
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let md = e.path().symlink_metadata()?;
            if seen.insert((md.dev(), md.ino())) {
                bytes = bytes.saturating_add((md.blocks() * 512) as i64);
                inodes += 1;
            }
            if md.is_dir() {
                todo.push(e.path());
            }
        }
    }
    Ok((bytes, inodes))
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let mounts = self.create(Kind::Active, &r.key, &r.parent, r.labels).await?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(&self, req: Request<pb::ViewSnapshotRequest>) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let mounts = self.create(Kind::View, &r.key, &r.parent, r.labels).await?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(&self, req: Request<pb::MountsRequest>) -> Result<Response<pb::MountsResponse>, Status> {
        let key = req.into_inner().key;
        let s = self.store.get(&key).map_err(status)?;
        let mounts = self.mounts_of(&key, &s).await?;
        Ok(Response::new(pb::MountsResponse { mounts }))
    }

    async fn commit(&self, req: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        let (name, key, labels) = (r.name.clone(), r.key.clone(), r.labels.into_iter().collect());
        let s = self
            .blocking(move |st| st.commit(&name, &key, labels))
            .await
            .map_err(status)?;
        tracing::debug!(key = r.key, name = r.name, id = s.id, "snapshot committed");
        Ok(Response::new(()))
    }

    async fn remove(&self, req: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let key = req.into_inner().key;
        let k = key.clone();
        let s = self.blocking(move |st| st.remove(&k)).await.map_err(status)?;
        tracing::debug!(key, id = s.id, "snapshot removed");
        self.release_unused_images().await;
        Ok(Response::new(()))
    }

    async fn stat(&self, req: Request<pb::StatSnapshotRequest>) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let key = req.into_inner().key;
        let s = self.store.get(&key).map_err(status)?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(self.info(&key, &s)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = r.info.ok_or_else(|| Status::invalid_argument("update without info"))?;
        let mut only = Vec::new();
        for path in r.update_mask.map(|m| m.paths).unwrap_or_default() {
            match path.as_str() {
                "labels" => only.clear(),
                p => match p.strip_prefix("labels.") {
                    Some(k) => only.push(k.to_string()),
                    None => return Err(Status::invalid_argument(format!("cannot update field {p:?}"))),
                },
            }
        }
        let (name, labels) = (info.name.clone(), info.labels.into_iter().collect());
        let s = self
            .blocking(move |st| st.set_labels(&name, labels, &only))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(self.info(&info.name, &s)),
        }))
    }

    type ListStream = ListStream;

    async fn list(&self, req: Request<pb::ListSnapshotsRequest>) -> Result<Response<ListStream>, Status> {
        let filters = req
            .into_inner()
            .filters
            .iter()
            .map(|f| Filter::parse(f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let info: Vec<pb::Info> = self
            .store
            .all()
            .into_iter()
            .filter(|(name, s)| {
                filter::any_matches(
                    &filters,
                    &filter::Subject {
                        name,
                        parent: s.parent.as_deref().unwrap_or(""),
                        kind: kind_name(s.kind),
                        labels: &s.labels,
                    },
                )
            })
            .map(|(name, s)| self.info(&name, &s))
            .collect();
        let pages: Vec<Result<pb::ListSnapshotsResponse, Status>> = info
            .chunks(100)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(pages))))
    }

    async fn usage(&self, req: Request<pb::UsageRequest>) -> Result<Response<pb::UsageResponse>, Status> {
        let key = req.into_inner().key;
        let s = self.store.get(&key).map_err(status)?;
        let dir = self.store.fs_dir(s.id);
        let (size, inodes) = tokio::task::spawn_blocking(move || usage(&dir))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("usage of {key}: {e}")))?;
        Ok(Response::new(pb::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let n = self.blocking(|st| st.cleanup()).await.map_err(status)?;
        tracing::info!(removed = n, "snapshotter cleanup");
        Ok(Response::new(()))
    }
}
