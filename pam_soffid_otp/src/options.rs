use std::path::PathBuf;
use std::time::Duration;

/// Settings from the module's line in the PAM service file, e.g.
/// `auth required pam_soffid_otp.so socket=/run/soffid-otp/guardd.sock timeout=5`.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// guardd's socket.
    pub socket: PathBuf,
    /// Bound on connecting to guardd and on each call to it.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            socket: PathBuf::from(proto::DEFAULT_SOCKET),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Longest `timeout=` honoured, so a typo cannot make a login hang for hours.
const MAX_TIMEOUT_SECS: f64 = 300.0;

impl Options {
    /// Parses module arguments. Unknown or malformed arguments keep the defaults and are
    /// reported in the returned warnings (for the system log), never fatal: a typo in a PAM file
    /// must not lock everyone out, and the defaults are the secure ones.
    pub fn parse<S: AsRef<str>>(args: &[S]) -> (Options, Vec<String>) {
        let mut options = Options::default();
        let mut warnings = Vec::new();
        for arg in args {
            let arg = arg.as_ref();
            match arg.split_once('=') {
                Some(("socket", path)) if path.starts_with('/') => {
                    options.socket = PathBuf::from(path)
                }
                Some(("timeout", secs)) => match secs.parse::<f64>() {
                    Ok(s) if s > 0.0 && s <= MAX_TIMEOUT_SECS => {
                        options.timeout = Duration::from_secs_f64(s)
                    }
                    _ => warnings.push(format!(
                        "ignoring {arg}: timeout must be a number of seconds in (0, {MAX_TIMEOUT_SECS}]"
                    )),
                },
                _ => warnings.push(format!("ignoring unknown or malformed argument {arg:?}")),
            }
        }
        (options, warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_arguments() {
        let (o, w) = Options::parse::<&str>(&[]);
        assert_eq!(o, Options::default());
        assert!(w.is_empty());
    }

    #[test]
    fn socket_and_timeout_are_read() {
        let (o, w) = Options::parse(&["socket=/tmp/x.sock", "timeout=0.5"]);
        assert_eq!(o.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(o.timeout, Duration::from_millis(500));
        assert!(w.is_empty());
    }

    #[test]
    fn bad_arguments_warn_and_keep_defaults() {
        let (o, w) = Options::parse(&[
            "timeout=abc",
            "timeout=-1",
            "timeout=1e9",
            "socket=rel",
            "x",
        ]);
        assert_eq!(o, Options::default());
        assert_eq!(w.len(), 5);
    }
}
