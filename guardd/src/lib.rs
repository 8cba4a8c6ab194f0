//! guardd: the soffid-otp daemon and its admin CLI.
//!
//! The PAM module never holds secrets and never decides; everything that does lives here.
//! A login enters at `server`, is checked by `caller`, decided in `service`, verified by `otp`
//! against `store`, and recorded by `audit`.

/// The system's accounts: NSS, password state, the PAM password check, chpasswd.
pub mod accounts;
/// The audit trail: one structured line per decision, never a secret.
pub mod audit;
/// Backup codes: one-time, hashed with Argon2id.
pub mod backup;
/// Per-caller limits on shared resources, with a reserve for root.
pub mod budget;
/// Who is calling: SO_PEERCRED credentials and what each caller may do.
pub mod caller;
/// `guardctl`, the admin and self-service command line.
pub mod cli;
/// Where the daemon's files live: `guardd.toml` and its embedded defaults.
pub mod config;
/// Reuse grants: an OTP proven once lets the same session in again for a while.
pub mod grant;
/// Brute-force back-off per user.
pub mod lockout;
/// Logging to journald or stderr.
pub mod logging;
/// Counters for monitoring, written as a Prometheus text file (docs/operating.md#metrics).
pub mod metrics;
/// One-time passwords: TOTP (RFC 6238) and HOTP (RFC 4226), secrets, otpauth:// URIs.
pub mod otp;
/// The calling process as a pidfd: its real uid from the kernel, without /proc.
pub mod pidfd;
/// The rules: XACML-style permit / otp / deny decisions with explanations.
pub mod policy;
/// What /proc says about a process: real uid, peak memory, CPU time.
pub mod procfs;
/// Secrets at rest: XChaCha20-Poly1305 under a key file.
pub mod seal;
/// Binding the Unix socket, serving, and shutting down cleanly.
pub mod server;
/// The gRPC `Guard` service: the login conversation and token administration.
pub mod service;
/// The ssh keys that authenticated a login, from sshd's SSH_AUTH_INFO_0.
pub mod ssh_auth;
/// The `Store` trait, its SQLite implementation (tokens, failures, backup codes) and the one
/// thread every store call runs on, which commits them in groups.
pub mod store;
