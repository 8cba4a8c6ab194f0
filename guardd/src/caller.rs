use std::os::fd::OwnedFd;
use std::sync::Arc;

use tonic::{Request, Status};

use crate::budget::Key;

/// The process on the other end of the socket, as the kernel reports it (SO_PEERCRED) when the
/// connection is accepted. Never what the request claims: a client cannot lie about these.
/// A caller inside a user namespace is seen with its uid in guardd's namespace (its real one).
#[derive(Debug, Clone)]
pub struct Caller {
    /// The effective uid that connected (0 for sshd, and for sudo, which is setuid root).
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// The real uid of the connecting process, when it could be read: the user behind a
    /// setuid-root sudo or su. Read only for callers with root's rights, the one use of it
    /// (`budget_keys`).
    pub real_uid: Option<u32>,
    /// The caller is the unprivileged uid guardd itself runs as. In production guardd runs as
    /// root and this is never set; a guardd that a user runs (development, the test suite) is
    /// that user's to administer, since they own its database and key file anyway.
    pub owner: bool,
    /// How the calling process is known, to read its login session when a login needs it.
    pub process: Process,
}

/// How guardd knows the calling process, for its login session (`Caller::login_session`).
#[derive(Debug, Clone, Default)]
pub enum Process {
    /// Not at all: a caller without root's rights (whose logins never use a session), or one
    /// whose pid guardd cannot see (another pid namespace).
    #[default]
    Unknown,
    /// Gone before it was accepted (its pidfd says it exited): its pid may be another
    /// process's by now, so nothing is read of it, and the server refuses the connection.
    Gone,
    /// Held by a pidfd (SO_PEERPIDFD, Linux 6.5): that process and no other, even once its pid
    /// is reused. Its session is read only when a login needs it, which most never do.
    Pinned(Arc<OwnedFd>),
    /// Read when it connected (older kernels): its audit login session (pam_loginuid; None when
    /// unset) and its start time, which with the pid names one process for good.
    Read {
        session: Option<u32>,
        start: Option<u64>,
    },
}

/// What a caller asks to do, for the access table (docs/architecture.md#callers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Begin or Answer a login conversation for a user.
    Login,
    /// See a user's tokens.
    List,
    /// Enroll or confirm a token.
    Enroll,
    /// Delete a token.
    Delete,
    /// Administration without self-service: disable, enable, resync, unlock, backup codes.
    Admin,
}

impl Caller {
    /// The caller of the connection a request arrived on, as recorded when it was accepted.
    pub fn of<T>(req: &Request<T>) -> Result<Caller, Status> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::permission_denied("caller credentials are unavailable"))
    }

    /// The caller of a connection, from its SO_PEERCRED credentials alone (tests, `explain`):
    /// see `accepted`, with no pidfd.
    pub fn from_cred(uid: u32, gid: u32, pid: Option<i32>) -> Caller {
        Caller::accepted(uid, gid, pid, || None)
    }

    /// The caller of a freshly accepted connection: its SO_PEERCRED credentials and the real uid
    /// of the process behind them. `pidfd` gives that process's pidfd (SO_PEERPIDFD); it is
    /// asked only of callers with root's rights.
    pub fn accepted(
        uid: u32,
        gid: u32,
        pid: Option<i32>,
        pidfd: impl FnOnce() -> Option<OwnedFd>,
    ) -> Caller {
        let owner = uid != 0 && uid == nix::unistd::geteuid().as_raw();
        // What /proc says is used only for callers with root's rights (their budget keys, their
        // reuse grants): an unprivileged connection costs the accept loop no /proc read. Each
        // read of a process new to /proc costs 10-25 µs here, `status` the most.
        let privileged = pid
            .filter(|_| uid == 0 || owner)
            .and_then(|p| u32::try_from(p).ok());
        let pidfd = privileged.and_then(|_| pidfd());
        let (real_uid, process) = match privileged {
            None => (None, Process::Unknown),
            Some(p) => match real_uid_of(p, pidfd.as_ref()) {
                Err(Gone) => (None, Process::Gone),
                Ok(real_uid) => (
                    real_uid,
                    match pidfd {
                        Some(pidfd) => Process::Pinned(Arc::new(pidfd)),
                        None => Process::Read {
                            session: crate::procfs::session_id(p),
                            start: crate::procfs::start_time(p),
                        },
                    },
                ),
            },
        };
        Caller {
            uid,
            gid,
            pid,
            real_uid,
            owner,
            process,
        }
    }

    /// Whether the process that connected was gone before its connection was accepted.
    pub fn is_gone(&self) -> bool {
        matches!(self.process, Process::Gone)
    }

    /// The caller's login session, if the process that connected still runs, now in a session
    /// that is `uid`'s: its login uid is the account being authenticated. A pinned process's
    /// session is read now and believed only if the process still runs after the read (so its
    /// pid was no one else's); one read at connect must be unchanged, with the same start time
    /// (so a pid recycled since borrows nothing). A session inherited by a daemon someone
    /// started from their own login (sshd, xrdp run by hand) is that person's, never a user's
    /// it authenticates.
    pub fn login_session(&self, uid: Option<u32>) -> Option<u32> {
        let pid = u32::try_from(self.pid?).ok()?;
        uid?;
        match &self.process {
            Process::Unknown | Process::Gone => None,
            Process::Pinned(pidfd) => crate::procfs::session_id(pid)
                .filter(|_| crate::procfs::loginuid(pid) == uid && crate::pidfd::runs(pidfd)),
            Process::Read { session, start } => session.filter(|&s| {
                start.is_some()
                    && crate::procfs::start_time(pid) == *start
                    && crate::procfs::session_id(pid) == Some(s)
                    && crate::procfs::loginuid(pid) == uid
            }),
        }
    }

    /// Whom an open login counts against: as `budget_keys`, with a root caller's remote logins
    /// counted per remote host (an sshd prompt left unanswered by one client must not refuse
    /// the user's logins from everywhere for the prompt's lifetime).
    pub fn login_keys(&self, user: &str, rhost: &str) -> Vec<Key> {
        let mut keys = self.budget_keys(Some(user));
        if self.is_root() && !rhost.is_empty() {
            for key in &mut keys {
                if let Key::User(u) = key {
                    *key = Key::Remote(std::mem::take(u), rhost.to_owned());
                }
            }
        }
        keys
    }

    /// Whom this caller's holdings count against: an unprivileged caller against its uid; a root
    /// caller acting for `target` against that user and, when a user started it (sudo, su),
    /// against that user's uid, so parked sudo prompts cannot use up root's reserve.
    pub fn budget_keys(&self, target: Option<&str>) -> Vec<Key> {
        if !self.is_root() {
            return vec![Key::Uid(self.uid)];
        }
        let mut keys = Vec::with_capacity(2);
        // Root's own work, or the owner's (see `owner`), counts against no uid.
        if let Some(real) = self
            .real_uid
            .filter(|&u| u != 0 && !(self.owner && u == self.uid))
        {
            keys.push(Key::Uid(real));
        }
        if let Some(user) = target {
            keys.push(Key::User(user.to_owned()));
        }
        keys
    }

    /// Whether the caller has root's rights here: root, or the owner (see `owner`).
    pub fn is_root(&self) -> bool {
        self.uid == 0 || self.owner
    }
}

/// The process that connected has exited: nothing may be read by its pid, which may be another
/// process's by now.
struct Gone;

/// The real uid of process `pid`: through its pidfd where the kernel describes one (Linux 6.13),
/// else from the `Uid:` line of its status file, believed only if the pidfd (where there is one)
/// says the process still ran after that read.
fn real_uid_of(pid: u32, pidfd: Option<&OwnedFd>) -> Result<Option<u32>, Gone> {
    use crate::pidfd::Described;
    if let Some(pidfd) = pidfd {
        match crate::pidfd::describe(pidfd) {
            Described::As { pid: p, real_uid } if p == pid => return Ok(Some(real_uid)),
            Described::Gone => return Err(Gone),
            _ => {}
        }
    }
    let uid = crate::procfs::status_number(pid, "Uid:").and_then(|u| u32::try_from(u).ok());
    match pidfd {
        Some(pidfd) if !crate::pidfd::runs(pidfd) => Err(Gone),
        _ => Ok(uid),
    }
}

/// Decides whether `caller` may do `action` for a user: `is_self` when the caller's uid is that
/// user's account, `admin` when the caller is in the admin group (see the service's NSS
/// look-ups), `self_service` when the user's own request is allowed in the current state (for
/// example, withdrawing a pending token but not an active one).
pub fn authorize(
    caller: &Caller,
    action: Action,
    is_self: bool,
    admin: bool,
    self_service: bool,
) -> Result<(), Status> {
    if caller.is_root() {
        return Ok(());
    }
    let allowed = match action {
        Action::Login => is_self,
        Action::List | Action::Enroll | Action::Delete => admin || (is_self && self_service),
        Action::Admin => admin,
    };
    if allowed {
        Ok(())
    } else {
        Err(Status::permission_denied(match action {
            Action::Login => "only root or the user themself may authenticate this user",
            _ => "permission denied: run this as root or as a member of the guardd admin group",
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOBODY: Caller = Caller {
        uid: 65534,
        gid: 65534,
        pid: None,
        real_uid: None,
        owner: false,
        process: Process::Unknown,
    };

    #[test]
    fn root_and_the_owner_of_an_unprivileged_guardd_may_do_everything() {
        let root = Caller {
            uid: 0,
            gid: 0,
            pid: None,
            real_uid: None,
            owner: false,
            process: Process::default(),
        };
        let owner = Caller {
            uid: 1000,
            owner: true,
            ..NOBODY
        };
        for a in [
            Action::Login,
            Action::List,
            Action::Enroll,
            Action::Delete,
            Action::Admin,
        ] {
            assert!(authorize(&root, a, false, false, false).is_ok());
            assert!(authorize(&owner, a, false, false, false).is_ok());
            assert!(authorize(&NOBODY, a, false, false, false).is_err());
        }
        // Only the uid guardd runs as is its owner, and never for a root guardd.
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(Caller::from_cred(me, 0, None).owner, me != 0);
        assert!(!Caller::from_cred(me.wrapping_add(1), 0, None).owner);
    }

    #[test]
    fn a_user_may_log_in_only_as_themself() {
        assert!(authorize(&NOBODY, Action::Login, true, false, false).is_ok());
        assert!(authorize(&NOBODY, Action::Login, false, false, true).is_err());
    }

    #[test]
    fn self_service_needs_the_flag_and_admin_calls_need_admin() {
        assert!(authorize(&NOBODY, Action::Enroll, true, false, true).is_ok());
        assert!(authorize(&NOBODY, Action::Enroll, true, false, false).is_err());
        assert!(authorize(&NOBODY, Action::List, false, false, true).is_err());
        assert!(authorize(&NOBODY, Action::List, false, true, false).is_ok());
        assert!(authorize(&NOBODY, Action::Admin, true, false, true).is_err());
        assert!(authorize(&NOBODY, Action::Admin, false, true, false).is_ok());
    }

    #[test]
    fn real_uid_is_read_from_proc() {
        let me = Caller::from_cred(0, 0, Some(std::process::id() as i32));
        assert_eq!(me.real_uid, Some(nix::unistd::getuid().as_raw()));
        assert_eq!(Caller::from_cred(0, 0, Some(i32::MAX)).real_uid, None);
    }

    #[test]
    fn an_unprivileged_caller_costs_no_proc_read() {
        // This process, seen as connected by a uid without root's rights: nothing is read.
        let euid = nix::unistd::geteuid().as_raw();
        let other = if euid == 0 { 1000 } else { euid + 1 };
        let user = Caller::from_cred(other, 0, Some(std::process::id() as i32));
        assert_eq!(user.real_uid, None);
        assert!(matches!(user.process, Process::Unknown));
    }

    /// A setuid-root program (sudo, su) connects with euid 0 and its user's real uid. Both ways
    /// of reading that uid name the user: the pidfd where the kernel describes one (6.13 and
    /// later: checked to be the way taken there), and /proc/PID/status otherwise. Once the
    /// process is gone, the pidfd describes nothing.
    #[test]
    #[ignore = "needs root"]
    fn as_root_a_setuid_caller_is_seen_with_its_real_uid_by_pidfd_or_by_proc() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import os, socket, sys\n\
                 os.setresuid(1000, 0, 0)\n\
                 s = socket.socket(socket.AF_UNIX)\n\
                 s.connect(sys.argv[1])\n\
                 s.recv(1)",
            ])
            .arg(&path)
            .spawn()
            .expect("python3");
        let (conn, _) = listener.accept().unwrap();
        let cred = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
            .unwrap();
        assert_eq!(cred.uid(), 0);
        let pid = Some(cred.pid());
        let by_pidfd = Caller::accepted(0, 0, pid, || crate::pidfd::of_peer(&conn));
        let by_proc = Caller::accepted(0, 0, pid, || None);
        assert_eq!(by_pidfd.real_uid, Some(1000));
        assert_eq!(by_proc.real_uid, Some(1000));
        assert_eq!(by_pidfd.budget_keys(None), vec![Key::Uid(1000)]);

        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut version = release.split(|c: char| !c.is_ascii_digit());
        let major: u32 = version.next().unwrap().parse().unwrap();
        let minor: u32 = version.next().unwrap().parse().unwrap();
        let pidfd = crate::pidfd::of_peer(&conn);
        if (major, minor) >= (6, 13) {
            let fd = pidfd.as_ref().expect("SO_PEERPIDFD on this kernel");
            assert_eq!(
                crate::pidfd::describe(fd),
                crate::pidfd::Described::As {
                    pid: cred.pid() as u32,
                    real_uid: 1000
                }
            );
        }
        drop(conn);
        assert!(child.wait().unwrap().success());
        if let Some(fd) = &pidfd {
            assert_eq!(crate::pidfd::describe(fd), crate::pidfd::Described::Gone);
        }
    }

    /// A caller whose process exited, and was reaped, before its connection was accepted: where
    /// the kernel still hands out a pidfd for it (6.16 and later) it is known as gone, since its
    /// pid may be another process's by then; nothing is read by pid, and the server refuses it.
    /// Runs as anyone: a process of guardd's own uid is the owner, with root's rights here.
    #[test]
    fn a_caller_gone_before_accept_is_not_read_by_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let connected = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])",
            ])
            .arg(&path)
            .status()
            .expect("python3");
        assert!(connected.success());
        let (conn, _) = listener.accept().unwrap();
        let cred = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
            .unwrap();
        let caller = Caller::accepted(cred.uid(), cred.gid(), Some(cred.pid()), || {
            crate::pidfd::of_peer(&conn)
        });
        assert!(
            caller.is_root(),
            "the test's own uid has root's rights here"
        );
        assert_eq!(caller.real_uid, None);
        assert_eq!(caller.login_session(Some(cred.uid())), None);
        if crate::pidfd::of_peer(&conn).is_some() {
            assert!(caller.is_gone(), "{caller:?}");
        }
    }

    #[test]
    fn root_callers_count_against_the_user_behind_them_and_the_target() {
        let sudo = Caller {
            uid: 0,
            real_uid: Some(1000),
            ..NOBODY
        };
        assert_eq!(
            sudo.budget_keys(Some("root")),
            vec![Key::Uid(1000), Key::User("root".into())]
        );
        let sshd = Caller {
            uid: 0,
            real_uid: Some(0),
            ..NOBODY
        };
        assert_eq!(sshd.budget_keys(Some("ann")), vec![Key::User("ann".into())]);
        assert_eq!(NOBODY.budget_keys(Some("root")), vec![Key::Uid(65534)]);
        assert_eq!(
            sshd.login_keys("ann", "192.0.2.7"),
            vec![Key::Remote("ann".into(), "192.0.2.7".into())]
        );
        assert_eq!(
            NOBODY.login_keys("nobody", "192.0.2.7"),
            vec![Key::Uid(65534)]
        );
    }
}
