//! The guardd protocol, `soffid.otp.v1`, and how to reach guardd over its Unix socket.
//!
//! Shared by the daemon (server side), the PAM module and guardctl (client side), so all three
//! always speak the same version of the messages.

use std::io::IoSlice;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// Generated messages and the `Guard` service of `soffid.otp.v1`.
pub mod v1 {
    tonic::include_proto!("soffid.otp.v1");
}

/// The socket guardd listens on when the configuration does not say otherwise.
pub const DEFAULT_SOCKET: &str = "/run/soffid-otp/guardd.sock";

/// Why no channel to guardd could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No guardd is running: the socket does not exist (ENOENT) or nobody listens on it
    /// (ECONNREFUSED), as connect(2) reported. The only outcome a caller may take for "guardd is
    /// not there" rather than "guardd is failing".
    #[error("no guardd at {}: {source}", path.display())]
    Absent {
        path: PathBuf,
        source: std::io::Error,
    },
    /// connect(2) and the HTTP/2 handshake together took longer than the timeout.
    #[error("no answer from {} within {timeout:?}", path.display())]
    TimedOut { path: PathBuf, timeout: Duration },
    /// Anything else: connect(2) failed otherwise (EAGAIN: guardd's listen backlog is full, which
    /// any local user can cause; EACCES; ...), or the HTTP/2 handshake failed.
    #[error("cannot connect to {}: {reason}", path.display())]
    Failed { path: PathBuf, reason: String },
}

/// Opens an HTTP/2 channel to guardd on the Unix socket at `path`.
///
/// `timeout` bounds the connection (socket connect and HTTP/2 handshake together) and every later
/// call on the channel, so a stopped or wedged daemon cannot hang the caller. The socket is
/// connected here first, so that connect(2)'s errno tells an absent guardd
/// ([`ConnectError::Absent`]) from a failing one; the channel dials again by itself if that
/// connection breaks later.
pub async fn connect(path: impl Into<PathBuf>, timeout: Duration) -> Result<Channel, ConnectError> {
    let path = path.into();
    match tokio::time::timeout(timeout, open(path.clone(), timeout)).await {
        Ok(opened) => opened,
        Err(_) => Err(ConnectError::TimedOut { path, timeout }),
    }
}

async fn open(path: PathBuf, timeout: Duration) -> Result<Channel, ConnectError> {
    let stream = match UnixStream::connect(&path).await {
        Ok(stream) => stream,
        Err(source) if is_absent(&source) => return Err(ConnectError::Absent { path, source }),
        Err(e) => {
            return Err(ConnectError::Failed {
                path,
                reason: format!("connect: {e}"),
            })
        }
    };
    // The channel's connector hands out this stream first, and dials anew only if the channel
    // later has to reconnect on its own.
    let first = Arc::new(Mutex::new(Some(stream)));
    let dial = path.clone();
    // The URI is required by the API but unused: the connector below always dials the socket.
    Endpoint::from_static("http://[::1]:50051")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_| {
            let first = first.lock().ok().and_then(|mut first| first.take());
            let path = dial.clone();
            async move {
                let stream = match first {
                    Some(stream) => stream,
                    None => UnixStream::connect(path).await?,
                };
                Ok::<_, std::io::Error>(TokioIo::new(NoSigPipe(stream)))
            }
        }))
        .await
        .map_err(|e| ConnectError::Failed {
            path,
            reason: with_causes(&e),
        })
}

/// Whether connect(2) failed because no guardd is running: no socket file (ENOENT), or a socket
/// file nobody listens on, left behind by a guardd that died (ECONNREFUSED). Decided on the
/// errno: every other failure (EAGAIN from a full listen backlog above all) means a guardd is
/// there and failing.
fn is_absent(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED))
}

/// An error and its causes on one line (tonic's transport error alone says "transport error").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// A socket that never raises SIGPIPE. The PAM module runs inside sshd, sudo or any other host,
/// some of which keep SIGPIPE's default action (terminate): a write to a daemon that has hung
/// up must be an error, not the host's death. Plain writes go out with `send(MSG_NOSIGNAL)`;
/// vectored writes would use `writev(2)`, which has no such flag, so this stream offers none.
struct NoSigPipe(UnixStream);

impl AsyncRead for NoSigPipe {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for NoSigPipe {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let buf = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &**b);
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const TIMEOUT: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn no_socket_or_nobody_listening_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.sock");
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        for path in [missing, stale] {
            match connect(&path, TIMEOUT).await {
                Err(ConnectError::Absent { source, .. }) => assert!(is_absent(&source)),
                other => panic!("{}: {other:?}", path.display()),
            }
        }
    }

    /// A full listen backlog (connect(2) says EAGAIN) means guardd is there: a failure.
    #[tokio::test]
    async fn a_full_backlog_is_a_failure_not_an_absence() {
        use nix::sys::socket::{listen, Backlog};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listen(&listener, Backlog::new(0).unwrap()).unwrap();
        let mut queued = Vec::new();
        let error = loop {
            match UnixStream::connect(&path).await {
                Ok(stream) => queued.push(stream),
                Err(e) => break e,
            }
            assert!(queued.len() < 16, "the backlog never filled");
        };
        assert_eq!(error.raw_os_error(), Some(libc::EAGAIN));
        assert!(!is_absent(&error));
        match connect(&path, TIMEOUT).await {
            Err(ConnectError::Failed { reason, .. }) => assert!(reason.contains("os error 11")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_errnos_are_not_absence() {
        for errno in [libc::EAGAIN, libc::EACCES, libc::ENOTDIR, libc::ETIMEDOUT] {
            assert!(!is_absent(&std::io::Error::from_raw_os_error(errno)));
        }
        let made_up = std::io::Error::new(std::io::ErrorKind::NotFound, "not from connect(2)");
        assert!(!is_absent(&made_up), "decided on the errno, not the kind");
    }
}
