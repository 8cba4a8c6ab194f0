use syslog::{Facility, Formatter3164};

/// Writes `message` to syslog (facility authpriv). Never to stderr: under sudo or su that is the
/// user's terminal. If there is no syslog socket the message is dropped; logging never fails a
/// login.
pub fn error(message: &str) {
    let formatter = Formatter3164 {
        facility: Facility::LOG_AUTHPRIV,
        hostname: None,
        process: "pam_soffid_otp".into(),
        pid: std::process::id(),
    };
    if let Ok(mut logger) = syslog::unix(formatter) {
        let _ = logger.err(message);
    }
}
