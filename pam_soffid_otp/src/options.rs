use std::path::PathBuf;
use std::time::Duration;

/// What to do when no guardd is running. A guardd that is running but fails (overloaded,
/// timing out, answering with an error) refuses the login in either mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Refuse the login (PAM_AUTHINFO_UNAVAIL): the default, fail closed.
    Secure,
    /// Step aside (PAM_IGNORE) and log loudly, the rest of the stack decides, but only when
    /// guardd's socket is missing or refuses connections: it trades security for availability.
    Safe,
}

/// Where the OTP comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstPass {
    /// Ask the user (the default).
    Ask,
    /// Answer the first prompt with PAM_AUTHTOK from an earlier module; fail if there is none.
    Use,
    /// Answer the first prompt with PAM_AUTHTOK if an earlier module set it, else ask.
    Try,
}

/// Settings from the module's line in the PAM service file, e.g.
/// `auth required pam_soffid_otp.so socket=/run/soffid-otp/guardd.sock timeout=5`.
/// Arguments with spaces use Linux-PAM's brackets: `[prompt=One-time code: ]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// guardd's socket.
    pub socket: PathBuf,
    /// Bound on connecting to guardd and on each call to it.
    pub timeout: Duration,
    pub failmode: FailMode,
    /// Replaces guardd's prompt text.
    pub prompt: Option<String>,
    /// Log each step to syslog (never a code).
    pub debug: bool,
    pub first_pass: FirstPass,
    /// PAM_IGNORE for users the system does not know, instead of asking guardd.
    pub ignore_unknown_user: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            socket: PathBuf::from(proto::DEFAULT_SOCKET),
            timeout: Duration::from_secs(5),
            failmode: FailMode::Secure,
            prompt: None,
            debug: false,
            first_pass: FirstPass::Ask,
            ignore_unknown_user: false,
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
        let mut o = Options::default();
        let mut warnings = Vec::new();
        for arg in args {
            let arg = arg.as_ref();
            match arg.split_once('=') {
                Some(("socket", path)) if path.starts_with('/') => o.socket = PathBuf::from(path),
                Some(("timeout", secs)) => match secs.parse::<f64>() {
                    Ok(s) if s > 0.0 && s <= MAX_TIMEOUT_SECS => {
                        o.timeout = Duration::from_secs_f64(s)
                    }
                    _ => warnings.push(format!(
                        "ignoring {arg}: timeout must be a number of seconds in (0, {MAX_TIMEOUT_SECS}]"
                    )),
                },
                Some(("failmode", "secure")) => o.failmode = FailMode::Secure,
                Some(("failmode", "safe")) => o.failmode = FailMode::Safe,
                Some(("prompt", text)) if !text.is_empty() && text.len() <= 200 => {
                    o.prompt = Some(text.to_owned())
                }
                None if arg == "debug" => o.debug = true,
                None if arg == "use_first_pass" => o.first_pass = FirstPass::Use,
                None if arg == "try_first_pass" => o.first_pass = FirstPass::Try,
                None if arg == "ignore_unknown_user" => o.ignore_unknown_user = true,
                _ => warnings.push(format!("ignoring unknown or malformed argument {arg:?}")),
            }
        }
        (o, warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_arguments() {
        let (o, w) = Options::parse::<&str>(&[]);
        assert_eq!(o, Options::default());
        assert_eq!(o.failmode, FailMode::Secure);
        assert!(w.is_empty());
    }

    #[test]
    fn every_option_is_read() {
        let (o, w) = Options::parse(&[
            "socket=/tmp/x.sock",
            "timeout=0.5",
            "failmode=safe",
            "prompt=One-time code: ",
            "debug",
            "try_first_pass",
            "ignore_unknown_user",
        ]);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(o.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(o.timeout, Duration::from_millis(500));
        assert_eq!(o.failmode, FailMode::Safe);
        assert_eq!(o.prompt.as_deref(), Some("One-time code: "));
        assert!(o.debug && o.ignore_unknown_user);
        assert_eq!(o.first_pass, FirstPass::Try);
        let (o, _) = Options::parse(&["use_first_pass"]);
        assert_eq!(o.first_pass, FirstPass::Use);
    }

    #[test]
    fn bad_arguments_warn_and_keep_defaults() {
        let (o, w) = Options::parse(&[
            "timeout=abc",
            "timeout=-1",
            "timeout=1e9",
            "socket=rel",
            "failmode=open",
            "x",
        ]);
        assert_eq!(o, Options::default());
        assert_eq!(w.len(), 6);
    }
}
