//! The guardd protocol, `soffid.otp.v1`, and how to reach guardd over its Unix socket.
//!
//! Shared by the daemon (server side), the PAM module and guardctl (client side), so all three
//! always speak the same version of the messages.

use std::io::IoSlice;
use std::path::PathBuf;
use std::pin::Pin;
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

/// Opens an HTTP/2 channel to guardd on the Unix socket at `path`.
///
/// `timeout` bounds the connection (socket connect and HTTP/2 handshake) and every later call on
/// the channel, so a stopped or wedged daemon cannot hang the caller.
pub async fn connect(
    path: impl Into<PathBuf>,
    timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let path = path.into();
    // The URI is required by the API but unused: the connector below always dials the socket.
    Endpoint::from_static("http://[::1]:50051")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(NoSigPipe(stream)))
            }
        }))
        .await
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
