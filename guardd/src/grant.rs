//! Reuse grants: an OTP proven under a rule with a `reuse` obligation lets later logins of the
//! same user in without a code, until the window ends, when the attributes the rule names are
//! equal to those of the login that proved it (docs/rules.md#reuse).
//!
//! Only root callers (sshd, sudo, su, login) make or use grants; an attribute that is absent on
//! either side never matches. Grants live in the store, so a fleet on a shared store reuses
//! across hosts only where a rule leaves `host` out of its scope.

use crate::policy::{Reuse, Scope};

/// Grants kept per user: the newest; older ones are dropped when a new one is made.
pub const MAX_PER_USER: usize = 16;

/// How long after the proving login its ssh session may still be bound to its grants (sshd
/// opens the session right after authentication; LoginGraceTime is 2 minutes by default).
pub const BIND_WINDOW: i64 = 300;

/// The attributes of a login that a grant can be bound to. `None`: absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    pub host: Option<String>,
    pub service: Option<String>,
    pub rhost: Option<String>,
    pub tty: Option<String>,
    /// The SHA256 fingerprints of the keys that authenticated, joined by `,`.
    pub ssh_key: Option<String>,
    /// The login session, qualified by boot and host: `BOOT_ID/HOST/SESSIONID`.
    pub session: Option<String>,
}

impl Attributes {
    pub fn get(&self, scope: Scope) -> Option<&str> {
        match scope {
            Scope::Host => self.host.as_deref(),
            Scope::Service => self.service.as_deref(),
            Scope::Rhost => self.rhost.as_deref(),
            Scope::Tty => self.tty.as_deref(),
            Scope::SshKey => self.ssh_key.as_deref(),
            Scope::Session => self.session.as_deref(),
        }
    }

    /// The `session` attribute of login session `id` on `host` in this boot.
    pub fn session_name(host: &str, id: Option<u32>) -> Option<String> {
        let boot = crate::procfs::boot_id()?;
        id.map(|id| format!("{boot}/{host}/{id}"))
    }
}

/// One grant, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Random; names the grant in `guardctl explain`.
    pub id: String,
    pub user: String,
    /// The rule that made it, and that rule's digest then.
    pub rule: String,
    pub digest: String,
    /// The audit id of the login that proved the OTP.
    pub proof: String,
    pub created: i64,
    pub expires: i64,
    pub attributes: Attributes,
    /// sshd's SSH_CONNECTION of the proving login: how its session, opened by another sshd
    /// process, finds it (see `BIND_WINDOW`).
    pub ssh_connection: Option<String>,
}

impl Grant {
    /// Whether this grant lets in a login with `login`'s attributes at `now` under `reuse`: the
    /// same rule in the same form, not expired, and every attribute of the scope present on
    /// both sides and equal.
    pub fn applies(&self, reuse: &Reuse, login: &Attributes, now: i64) -> bool {
        self.rule == reuse.rule
            && self.digest == reuse.digest
            && now < self.expires
            && reuse.scope.iter().all(
                |&s| matches!((self.attributes.get(s), login.get(s)), (Some(a), Some(b)) if a == b),
            )
    }
}

/// The grant that lets in a login needing `reuse` (every deciding rule's), if each obligation
/// has one: the proving login's id, and when the earliest of them ends.
pub fn find<'a>(
    grants: &'a [Grant],
    reuse: &[Reuse],
    login: &Attributes,
    now: i64,
) -> Option<(&'a Grant, i64)> {
    let mut found: Option<&Grant> = None;
    let mut until = i64::MAX;
    for r in reuse {
        let g = grants
            .iter()
            .filter(|g| g.applies(r, login, now))
            .max_by_key(|g| g.expires)?;
        until = until.min(g.expires);
        found.get_or_insert(g);
    }
    found.map(|g| (g, until))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reuse(scope: &[Scope]) -> Reuse {
        Reuse {
            rule: "ssh".into(),
            digest: "d1".into(),
            window: 600,
            scope: scope.to_vec(),
        }
    }

    fn attrs(key: Option<&str>, session: Option<&str>) -> Attributes {
        Attributes {
            host: Some("h1".into()),
            service: Some("sshd".into()),
            rhost: Some("192.0.2.7".into()),
            tty: None,
            ssh_key: key.map(Into::into),
            session: session.map(Into::into),
        }
    }

    fn grant(attributes: Attributes) -> Grant {
        Grant {
            id: "g1".into(),
            user: "ann".into(),
            rule: "ssh".into(),
            digest: "d1".into(),
            proof: "p1".into(),
            created: 1000,
            expires: 1600,
            attributes,
            ssh_connection: None,
        }
    }

    #[test]
    fn equal_attributes_of_the_scope_within_the_window_apply() {
        let g = grant(attrs(Some("SHA256:k1"), None));
        let r = reuse(&[Scope::Rhost, Scope::SshKey]);
        assert!(g.applies(&r, &attrs(Some("SHA256:k1"), Some("s")), 1599));
        assert!(
            !g.applies(&r, &attrs(Some("SHA256:k1"), None), 1600),
            "expired"
        );
        assert!(
            !g.applies(&r, &attrs(Some("SHA256:k2"), None), 1200),
            "another key"
        );
    }

    #[test]
    fn absent_is_not_equal_to_absent() {
        let g = grant(attrs(None, None));
        assert!(!g.applies(&reuse(&[Scope::SshKey]), &attrs(None, None), 1200));
        assert!(!g.applies(&reuse(&[Scope::Tty]), &attrs(None, None), 1200));
        assert!(!g.applies(&reuse(&[Scope::Session]), &attrs(None, None), 1200));
    }

    #[test]
    fn a_changed_or_other_rule_ends_the_grant() {
        let g = grant(attrs(Some("SHA256:k1"), None));
        let login = attrs(Some("SHA256:k1"), None);
        let mut changed = reuse(&[Scope::SshKey]);
        changed.digest = "d2".into();
        assert!(!g.applies(&changed, &login, 1200));
        let mut other = reuse(&[Scope::SshKey]);
        other.rule = "sudo".into();
        assert!(!g.applies(&other, &login, 1200));
    }

    #[test]
    fn several_obligations_need_a_grant_each_and_end_with_the_first() {
        let login = attrs(Some("SHA256:k1"), None);
        let a = grant(login.clone());
        let mut b = grant(login.clone());
        b.rule = "sudo".into();
        b.expires = 1300;
        let mut sudo = reuse(&[Scope::SshKey]);
        sudo.rule = "sudo".into();
        let both = [reuse(&[Scope::SshKey]), sudo];
        assert_eq!(find(std::slice::from_ref(&a), &both, &login, 1200), None);
        let grants = [a, b];
        let (g, until) = find(&grants, &both, &login, 1200).unwrap();
        assert_eq!((g.id.as_str(), until), ("g1", 1300));
        assert_eq!(find(&grants, &[], &login, 1200), None);
    }
}
