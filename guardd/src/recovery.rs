//! Password recovery: after an OTP, the new password is set with the system's own `chpasswd`
//! (PAM service `chpasswd`, so the site's password rules, hashing method and shadow handling
//! apply). Nothing here edits /etc/shadow, and the password never reaches argv, the environment
//! or a log: it goes to chpasswd's stdin and the buffers are zeroized.

use std::io::Write;
use std::process::{Command, Stdio};

use zeroize::Zeroizing;

/// Where Debian's chpasswd lives.
const CHPASSWD: &str = "/usr/sbin/chpasswd";
/// Longest password accepted.
const MAX_LEN: usize = 512;

/// Why a password was not set.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("the new password must be 1 to {MAX_LEN} bytes of text without line breaks")]
    Invalid,
    #[error("the system refused the new password: {0}")]
    Refused(String),
    #[error("cannot run chpasswd: {0}")]
    Tool(std::io::Error),
}

/// What the user typed as a new password, if it can be one (UTF-8, no line breaks or NUL:
/// chpasswd reads `user:password` lines).
pub fn new_password(input: &[u8]) -> Result<Zeroizing<String>, RecoveryError> {
    let text = std::str::from_utf8(input).map_err(|_| RecoveryError::Invalid)?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    if text.is_empty() || text.len() > MAX_LEN || text.contains(['\n', '\r', '\0']) {
        return Err(RecoveryError::Invalid);
    }
    Ok(Zeroizing::new(text.to_owned()))
}

/// Sets `user`'s password through chpasswd. On failure nothing was changed (chpasswd writes
/// the shadow file only when every line succeeded).
pub fn set_password(user: &str, password: &str) -> Result<(), RecoveryError> {
    let mut child = Command::new(CHPASSWD)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RecoveryError::Tool)?;
    let line = Zeroizing::new(format!("{user}:{password}\n"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(line.as_bytes())
            .map_err(RecoveryError::Tool)?;
    }
    let out = child.wait_with_output().map_err(RecoveryError::Tool)?;
    if out.status.success() {
        return Ok(());
    }
    let why = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| l.trim_start_matches("chpasswd: ").trim())
        .find(|l| !l.is_empty())
        .unwrap_or("chpasswd failed")
        .to_owned();
    // chpasswd's messages name the user and the line, never the password.
    Err(RecoveryError::Refused(why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_passwords_are_text_lines() {
        assert_eq!(
            new_password(b"s3cret pass\n").unwrap().as_str(),
            "s3cret pass"
        );
        assert!(new_password(b"").is_err());
        assert!(new_password(b"\n").is_err());
        assert!(new_password(b"a\nb").is_err());
        assert!(new_password(b"a\rb").is_err());
        assert!(new_password(&[0xff, 0xfe]).is_err());
        assert!(new_password(&[b'a'; 513]).is_err());
    }
}
