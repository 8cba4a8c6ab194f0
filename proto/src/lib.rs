//! The guardd protocol, `soffid.otp.v1`, and how to reach guardd over its Unix socket.
//!
//! Shared by the daemon (server side), the PAM module and guardctl (client side), so all three
//! always speak the same version of the messages.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
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
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}
