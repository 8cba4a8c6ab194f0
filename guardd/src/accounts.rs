//! guardd's view of the system's accounts, behind one small trait ([`Accounts`]) so the
//! service's identity rules run in unit tests with a fake: NSS look-ups (the canonical name and
//! uid of an account, its groups), whether its password is usable, the password check through
//! the system's own PAM stack, and setting a password with the system's `chpasswd`.
//!
//! Nothing here reads or edits /etc/shadow, and a password never reaches argv, the environment
//! or a log: it goes to a child's stdin, and the buffers are zeroized.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::policy::LookupError;

/// Where Debian's chpasswd and passwd live.
const CHPASSWD: &str = "/usr/sbin/chpasswd";
const PASSWD: &str = "/usr/bin/passwd";
/// Longest password accepted.
const MAX_LEN: usize = 512;
/// The PAM service guardd checks passwords with, unless guardd.toml names another.
pub const PASSWORD_SERVICE: &str = "soffid-otp";
/// The longest a password check may take (pam_unix alone waits 2 s after a wrong one).
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// The hidden `guardd` option that runs one password check in a child process.
pub const PAM_CHECK_FLAG: &str = "--pam-check-password";

/// An account as NSS knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The canonical name (a case-insensitive directory may have been asked with other case).
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// What the account's password allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordState {
    /// A password is set and not locked.
    Usable,
    /// Locked (`passwd -l`, or `!`/`*` as the hash): no password logs in.
    Locked,
    /// Empty: no password is asked.
    Empty,
    /// Not a local account (LDAP, SSSD) or the state could not be read.
    Unknown,
}

/// Why an account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("the new password must be 1 to {MAX_LEN} bytes of text without line breaks")]
    Invalid,
    #[error("the system refused the new password: {0}")]
    Refused(String),
    #[error("cannot run {0}: {1}")]
    Tool(&'static str, std::io::Error),
    #[error("the password check did not finish within {CHECK_TIMEOUT:?}")]
    TimedOut,
    #[error("the password check failed: {0}")]
    Check(String),
}

/// The system's accounts, as guardd may use them. Every method may block (NSS, child
/// processes): the service calls them on its blocking pool, within the caller's budget.
pub trait Accounts: Send + Sync + 'static {
    /// The account called `name`, if NSS knows it.
    fn by_name(&self, name: &str) -> Result<Option<Account>, LookupError>;
    /// The account with `uid`, if NSS knows it.
    fn by_uid(&self, uid: u32) -> Result<Option<Account>, LookupError>;
    /// The names of the account's primary and supplementary groups.
    fn groups(&self, account: &Account) -> Result<Vec<String>, LookupError>;
    /// Whether the account's password is usable, locked or empty.
    fn password_state(&self, name: &str) -> PasswordState;
    /// Whether `password` is the account's current password, by the system's PAM stack
    /// (authenticate and account management); Err when the check itself failed.
    fn check_password(&self, name: &str, password: &[u8]) -> Result<bool, AccountError>;
    /// Sets the account's password.
    fn set_password(&self, name: &str, password: &str) -> Result<(), AccountError>;
}

/// The real system: NSS through libc, `passwd -S`, a PAM check in a child process, chpasswd.
pub struct System {
    /// The PAM service of the password check (its file in /etc/pam.d).
    pub password_service: String,
}

impl Accounts for System {
    fn by_name(&self, name: &str) -> Result<Option<Account>, LookupError> {
        let user = nix::unistd::User::from_name(name).map_err(LookupError::Nss)?;
        Ok(user.map(account))
    }

    fn by_uid(&self, uid: u32) -> Result<Option<Account>, LookupError> {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .map_err(LookupError::Nss)?;
        Ok(user.map(account))
    }

    fn groups(&self, account: &Account) -> Result<Vec<String>, LookupError> {
        use nix::unistd::{getgrouplist, Gid, Group};
        let lookup = LookupError::Nss;
        let name =
            std::ffi::CString::new(account.name.as_str()).map_err(|_| LookupError::BadName)?;
        let mut names = Vec::new();
        for gid in getgrouplist(&name, Gid::from_raw(account.gid)).map_err(lookup)? {
            if let Some(g) = Group::from_gid(gid).map_err(lookup)? {
                if !names.contains(&g.name) {
                    names.push(g.name);
                }
            }
        }
        Ok(names)
    }

    fn password_state(&self, name: &str) -> PasswordState {
        // `passwd -S` reads the shadow entry for us: "NAME L|NP|P date ...".
        let out = Command::new(PASSWD)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .args(["-S", "--", name])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        match out {
            Ok(out) if out.status.success() => {
                parse_passwd_status(&String::from_utf8_lossy(&out.stdout))
            }
            _ => PasswordState::Unknown,
        }
    }

    fn check_password(&self, name: &str, password: &[u8]) -> Result<bool, AccountError> {
        let exe = std::env::current_exe().map_err(|e| AccountError::Tool("guardd", e))?;
        let mut child = Command::new(exe)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .args([PAM_CHECK_FLAG, &self.password_service, name])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| AccountError::Tool("guardd", e))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A child that died early closes its stdin: that is its exit status's business.
            let _ = stdin.write_all(password);
        }
        let started = Instant::now();
        loop {
            match child
                .try_wait()
                .map_err(|e| AccountError::Tool("guardd", e))?
            {
                Some(status) => {
                    return match status.code() {
                        Some(0) => Ok(true),
                        Some(1) => Ok(false),
                        _ => Err(AccountError::Check(format!(
                            "the PAM service {} could not check it ({status})",
                            self.password_service
                        ))),
                    }
                }
                None if started.elapsed() > CHECK_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(AccountError::TimedOut);
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn set_password(&self, name: &str, password: &str) -> Result<(), AccountError> {
        set_password(name, password)
    }
}

fn account(u: nix::unistd::User) -> Account {
    Account {
        name: u.name,
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    }
}

/// The state in `passwd -S` output.
fn parse_passwd_status(line: &str) -> PasswordState {
    match line.split_whitespace().nth(1) {
        Some("P") | Some("PS") => PasswordState::Usable,
        Some("L") | Some("LK") => PasswordState::Locked,
        Some("NP") => PasswordState::Empty,
        _ => PasswordState::Unknown,
    }
}

/// The child side of [`Accounts::check_password`]: reads the password from stdin and runs the
/// PAM service's auth and account stacks for `user`. Exit 0: right; 1: wrong; 2: not checked.
/// A child process, so that a PAM module that hangs, crashes or leaks cannot harm guardd.
pub fn pam_check_main(service: &str, user: &str) -> std::process::ExitCode {
    use pam_client::{Context, Flag};
    let mut password = Zeroizing::new(Vec::new());
    if std::io::stdin()
        .take(MAX_LEN as u64 + 1)
        .read_to_end(&mut password)
        .is_err()
        || password.len() > MAX_LEN
    {
        return std::process::ExitCode::from(2);
    }
    let Ok(password) = std::ffi::CString::new(password.to_vec()) else {
        return std::process::ExitCode::from(1);
    };
    let conversation = OnePassword(Some(password));
    let Ok(mut pam) = Context::new(service, Some(user), conversation) else {
        return std::process::ExitCode::from(2);
    };
    let ok = pam.authenticate(Flag::DISALLOW_NULL_AUTHTOK).is_ok()
        && pam.acct_mgmt(Flag::DISALLOW_NULL_AUTHTOK).is_ok();
    std::process::ExitCode::from(if ok { 0 } else { 1 })
}

/// A PAM conversation that answers the first hidden prompt with the password, and nothing else.
struct OnePassword(Option<std::ffi::CString>);

impl pam_client::ConversationHandler for OnePassword {
    fn prompt_echo_on(
        &mut self,
        _prompt: &std::ffi::CStr,
    ) -> Result<std::ffi::CString, pam_client::ErrorCode> {
        Err(pam_client::ErrorCode::CONV_ERR)
    }

    fn prompt_echo_off(
        &mut self,
        _prompt: &std::ffi::CStr,
    ) -> Result<std::ffi::CString, pam_client::ErrorCode> {
        self.0.take().ok_or(pam_client::ErrorCode::CONV_ERR)
    }

    fn text_info(&mut self, _msg: &std::ffi::CStr) {}

    fn error_msg(&mut self, _msg: &std::ffi::CStr) {}
}

/// What the user typed as a new password, if it can be one (UTF-8, no line breaks or NUL:
/// chpasswd reads `user:password` lines).
pub fn new_password(input: &[u8]) -> Result<Zeroizing<String>, AccountError> {
    let text = std::str::from_utf8(input).map_err(|_| AccountError::Invalid)?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    if text.is_empty() || text.len() > MAX_LEN || text.contains(['\n', '\r', '\0']) {
        return Err(AccountError::Invalid);
    }
    Ok(Zeroizing::new(text.to_owned()))
}

/// Sets `user`'s password through chpasswd. On failure nothing was changed (chpasswd writes
/// the shadow file only when every line succeeded).
pub fn set_password(user: &str, password: &str) -> Result<(), AccountError> {
    let mut child = Command::new(CHPASSWD)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| AccountError::Tool("chpasswd", e))?;
    let line = Zeroizing::new(format!("{user}:{password}\n"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(line.as_bytes())
            .map_err(|e| AccountError::Tool("chpasswd", e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| AccountError::Tool("chpasswd", e))?;
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
    Err(AccountError::Refused(why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_status_lines() {
        assert_eq!(
            parse_passwd_status("ann P 2026-11-29 0 99999 7 -1\n"),
            PasswordState::Usable
        );
        assert_eq!(
            parse_passwd_status("ann L 2026-11-29 0 99999 7 -1"),
            PasswordState::Locked
        );
        assert_eq!(
            parse_passwd_status("ann NP 2026-11-29"),
            PasswordState::Empty
        );
        assert_eq!(parse_passwd_status(""), PasswordState::Unknown);
    }

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
