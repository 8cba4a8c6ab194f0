use syslog::{Facility, Formatter3164};

/// Writes `message` to syslog (facility authpriv). Never to stderr: under sudo or su that is the
/// user's terminal. If there is no syslog socket the message is dropped; logging never fails a
/// login.
pub fn error(message: &str) {
    write(message, true);
}

/// Writes an informational `message` to syslog (the `debug` option's trail).
pub fn info(message: &str) {
    write(message, false);
}

fn write(message: &str, error: bool) {
    let formatter = Formatter3164 {
        facility: Facility::LOG_AUTHPRIV,
        hostname: None,
        process: "pam_soffid_otp".into(),
        pid: std::process::id(),
    };
    if let Ok(mut logger) = syslog::unix(formatter) {
        let _ = if error {
            logger.err(message)
        } else {
            logger.info(message)
        };
    }
}
