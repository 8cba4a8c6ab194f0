use nix::unistd::{Gid, Group, Uid, User};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

/// The process on the other end of the socket, as the kernel reports it (SO_PEERCRED).
/// Never what the request claims: a client cannot lie about these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// What a caller asks to do, for the access table of DESIGN.md §3.
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
    /// Reads the peer credentials of the connection a request arrived on.
    pub fn of<T>(req: &Request<T>) -> Result<Caller, Status> {
        let cred = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .ok_or_else(|| Status::permission_denied("caller credentials are unavailable"))?;
        Ok(Caller {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        })
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// The caller's login name, if its uid has one.
    pub fn name(&self) -> Option<String> {
        User::from_uid(Uid::from_raw(self.uid))
            .ok()
            .flatten()
            .map(|u| u.name)
    }

    /// Whether the caller belongs to `group` (as primary group or as a listed member).
    pub fn in_group(&self, group: &str) -> bool {
        let Ok(Some(group)) = Group::from_name(group) else {
            return false;
        };
        if group.gid == Gid::from_raw(self.gid) {
            return true;
        }
        match User::from_uid(Uid::from_raw(self.uid)) {
            Ok(Some(user)) => user.gid == group.gid || group.mem.contains(&user.name),
            _ => false,
        }
    }

    /// Whether the caller is the Unix user `user`.
    pub fn is_user(&self, user: &str) -> bool {
        matches!(User::from_name(user), Ok(Some(u)) if u.uid.as_raw() == self.uid)
    }
}

/// Decides whether `caller` may do `action` for `user` (None: for every user).
/// `self_service` tells whether the user's own request is allowed in the current state
/// (for example, enrolling only while they have no active token).
pub fn authorize(
    caller: &Caller,
    action: Action,
    user: Option<&str>,
    admin_group: &str,
    self_service: bool,
) -> Result<(), Status> {
    if caller.is_root() {
        return Ok(());
    }
    let is_self = user.is_some_and(|u| caller.is_user(u));
    let allowed = match action {
        Action::Login => is_self,
        Action::List | Action::Enroll | Action::Delete => {
            caller.in_group(admin_group) || (is_self && self_service)
        }
        Action::Admin => caller.in_group(admin_group),
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
    };

    #[test]
    fn root_may_do_everything() {
        let root = Caller {
            uid: 0,
            gid: 0,
            pid: None,
        };
        for a in [
            Action::Login,
            Action::List,
            Action::Enroll,
            Action::Delete,
            Action::Admin,
        ] {
            assert!(authorize(&root, a, Some("anyone"), "nogroup-x", false).is_ok());
        }
    }

    #[test]
    fn a_user_may_log_in_only_as_themself() {
        assert!(authorize(&NOBODY, Action::Login, Some("nobody"), "x", false).is_ok());
        assert!(authorize(&NOBODY, Action::Login, Some("root"), "x", true).is_err());
        assert!(authorize(&NOBODY, Action::Login, Some("no-such-user-x"), "x", true).is_err());
    }

    #[test]
    fn self_service_needs_the_flag_and_lists_of_everyone_need_admin() {
        assert!(authorize(&NOBODY, Action::Enroll, Some("nobody"), "x", true).is_ok());
        assert!(authorize(&NOBODY, Action::Enroll, Some("nobody"), "x", false).is_err());
        assert!(authorize(&NOBODY, Action::List, None, "x", true).is_err());
        // nobody's primary group is nogroup (65534): membership by primary group counts.
        assert!(authorize(&NOBODY, Action::List, None, "nogroup", false).is_ok());
        assert!(authorize(&NOBODY, Action::Admin, Some("nobody"), "x", true).is_err());
    }
}
