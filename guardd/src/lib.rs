//! guardd: the soffid-otp daemon and its admin CLI.
//!
//! The PAM module never holds secrets and never decides; everything that does lives here.
//! Read the modules in the order a login touches them:

/// Where the daemon's files live: `guardd.toml` and its embedded defaults.
pub mod config;
/// Who is calling: SO_PEERCRED credentials and what each caller may do.
pub mod caller;
/// The gRPC `Guard` service: the login conversation and token administration.
pub mod service;
/// One-time passwords: RFC 6238 verification, secrets and otpauth:// URIs.
pub mod otp;
/// Tokens on disk: SQLite with WAL, and the atomic replay guard.
pub mod store;
/// The audit trail: one structured line per decision, never a secret.
pub mod audit;
/// Binding the Unix socket, serving, and shutting down cleanly.
pub mod server;
/// `guardctl`, the admin and self-service command line.
pub mod cli;
/// Logging to journald or stderr.
pub mod logging;
