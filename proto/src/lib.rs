//! The guardd protocol, `soffid.otp.v1`, and how to reach guardd over its Unix socket.
//!
//! Shared by the daemon (server side), the PAM module and guardctl (client side), so all three
//! always speak the same version of the messages.

use std::time::Duration;

/// Generated messages and the `Guard` service of `soffid.otp.v1` (the client and server only
/// with the `grpc` feature: the PAM module speaks the protocol with its own small client).
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/soffid.otp.v1.rs"));
}

/// The socket guardd listens on when the configuration does not say otherwise.
pub const DEFAULT_SOCKET: &str = "/run/soffid-otp/guardd.sock";

/// The longest sshd SSH_AUTH_INFO_0 relayed (one RSA-8192 certificate is about 3 KiB): the
/// module sends none that is longer, and guardd refuses a longer one.
pub const MAX_SSH_AUTH_INFO: usize = 16 * 1024;

/// guardd closes every connection (an HTTP/2 GOAWAY) this long after it was opened, so no client
/// holds a connection, and what the daemon keeps for it, for ever. Clients that keep a
/// conversation open longer (a person typing a code) reconnect before
/// [`RECONNECT_AFTER`]. The conversation itself lives in guardd (a challenge id), not in the
/// connection.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(20);

/// A client opens a new connection before a call once its connection is this old: well before
/// [`MAX_CONNECTION_AGE`], so no call races guardd's GOAWAY.
pub const RECONNECT_AFTER: Duration = Duration::from_secs(10);

// A call may start just before the threshold and take up to a timeout: keep a wide margin.
const _: () = assert!(RECONNECT_AFTER.as_secs() * 2 <= MAX_CONNECTION_AGE.as_secs());

#[cfg(feature = "grpc")]
mod connect;
#[cfg(feature = "grpc")]
pub use connect::{connect, ConnectError, Connection};
