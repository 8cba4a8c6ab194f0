//! pam_soffid_otp: a PAM module that relays a one-time-password conversation to guardd.
//!
//! It holds no secret and decides nothing: it tells guardd who is logging in, shows the prompts
//! guardd asks for, sends back the answers, and maps the outcome to a PAM code.

/// guardd over its Unix socket, with a timeout on every step.
pub mod client;
/// The conversation, over a small `PamHandle` trait so it runs in unit tests without libpam.
pub mod core;
/// The PAM entry points: the only place that touches libpam (Kanidm's thin-FFI pattern).
mod ffi;
/// Messages for the system log (never the user's terminal).
pub mod log;
/// Module arguments from the PAM service file.
pub mod options;
/// gRPC over HTTP/2 on a blocking Unix socket: the module's own small client.
pub mod wire;
