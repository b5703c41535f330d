//! Who may talk to the admin socket. The socket is created with its final mode before it
//! becomes visible (bound in a private directory, then renamed into place), and every
//! connection's peer is checked with `SO_PEERCRED`: root gets the whole API, members of the
//! configured `socket_group` (by primary gid) get the read-only part (`GET`), anyone else is
//! disconnected before a byte is read.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use nix::unistd::Gid;
use tokio::net::{UnixListener, UnixStream};

/// What a connected peer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// root: every request.
    Admin,
    /// A member of `socket_group`: `GET` requests only.
    ReadOnly,
}

/// A unix listener that admits root and, read-only, one group.
pub struct PeerListener {
    inner: UnixListener,
    group: Option<Gid>,
}

impl PeerListener {
    /// Bind `socket` (replacing a stale one) with mode `0600`, or `0660` and group `group`
    /// when one is given; the socket never exists under its name with a wider mode.
    pub fn bind(socket: &Path, group: Option<Gid>) -> io::Result<PeerListener> {
        let dir = socket
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let name = socket
            .file_name()
            .ok_or_else(|| io::Error::other(format!("{} names no socket", socket.display())))?;
        let staging = tempfile::Builder::new().prefix(".lazyblob-sock-").tempdir_in(dir)?;
        let staged = staging.path().join(name);
        let inner = UnixListener::bind(&staged)?;
        let mode = match group {
            Some(g) => {
                nix::unistd::chown(&staged, None, Some(g))?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staged, socket)?;
        Ok(PeerListener { inner, group })
    }

    /// The access of a connected peer, if it has any.
    fn admit(&self, stream: &UnixStream) -> Option<Access> {
        let cred = stream.peer_cred().ok()?;
        if cred.uid() == 0 {
            return Some(Access::Admin);
        }
        if self.group.is_some_and(|g| g.as_raw() == cred.gid()) {
            return Some(Access::ReadOnly);
        }
        tracing::warn!(
            uid = cred.uid(),
            gid = cred.gid(),
            pid = cred.pid(),
            "admin socket: refused a peer that is neither root nor in socket_group"
        );
        None
    }
}

impl Listener for PeerListener {
    type Io = UnixStream;
    type Addr = Access;

    async fn accept(&mut self) -> (UnixStream, Access) {
        loop {
            match self.inner.accept().await {
                Ok((stream, _)) => {
                    if let Some(access) = self.admit(&stream) {
                        return (stream, access);
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning or giving up
                    tracing::warn!(error = %e, "admin socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Access> {
        Ok(Access::Admin)
    }
}

impl Connected<IncomingStream<'_, PeerListener>> for Access {
    fn connect_info(stream: IncomingStream<'_, PeerListener>) -> Access {
        *stream.remote_addr()
    }
}

/// Middleware: read-only peers may only `GET`.
pub async fn enforce(ConnectInfo(access): ConnectInfo<Access>, req: Request, next: Next) -> Response {
    if access == Access::ReadOnly && req.method() != Method::GET {
        return (
            StatusCode::FORBIDDEN,
            "read-only peer: only status requests are allowed",
        )
            .into_response();
    }
    next.run(req).await
}

/// Serve gRPC `routes` on the unix socket `socket` (root-only peers, as [`PeerListener`]
/// admits them) until `shutdown` changes; `what` names the service in logs. A socket that
/// cannot be bound is logged and the service does not run.
pub async fn serve_grpc(
    socket: &Path,
    what: &str,
    routes: tonic::service::Routes,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let listener = match PeerListener::bind(socket, None) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(socket = %socket.display(), error = %e, "cannot bind the {what} socket");
            return Ok(());
        }
    };
    tracing::info!(socket = %socket.display(), "{what} listening");
    let incoming = futures::stream::unfold(listener, |mut l| async move {
        let (stream, _) = Listener::accept(&mut l).await;
        Some((Ok::<_, io::Error>(stream), l))
    });
    tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.changed().await;
        })
        .await
}
