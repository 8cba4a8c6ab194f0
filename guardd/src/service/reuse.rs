//! Reuse grants in the login conversation (see `grant`): which attributes a login has, whether a
//! grant lets it in without a code, the grants an OTP makes, the ssh session stage that binds
//! them to a login session, and `guardctl forget`.

use proto::v1::{BeginRequest, ForgetReply, ForgetRequest, LoginContext, OpenSessionReply};
use tonic::{Request, Response};

use super::admin::admin_only;
use super::{admin_audit, GuardService, ServiceError};
use crate::audit::{self, Event};
use crate::caller::Caller;
use crate::grant::{self, Attributes, Grant, BIND_WINDOW};
use crate::policy::{Decision, Reuse};
use crate::ssh_auth;

/// What an OTP proven in a conversation may leave behind: the obligations of the rules that
/// asked for it, and the attributes of the login that began it.
#[derive(Debug)]
pub(super) struct Proving {
    pub reuse: Vec<Reuse>,
    pub attributes: Attributes,
    pub ssh_connection: Option<String>,
}

/// What an `otp` decision comes to before its prompt, for its `reuse` obligations.
pub(super) enum Reused {
    /// A grant lets the login in: the audit id of the login that proved the OTP.
    Granted(String),
    /// On to the prompt, with what a proof will leave behind (none for a decision without
    /// `reuse` or a caller without root's rights).
    Prove(Option<Box<Proving>>),
}

impl GuardService {
    /// Looks for a grant that lets this login (by `caller`, of the account with `uid`, with
    /// the ssh keys the decision saw) in under `decision`'s obligations; if none does, what its
    /// proof of an OTP should leave.
    pub(super) async fn reuse_or_prove(
        &self,
        caller: &Caller,
        ctx: &LoginContext,
        uid: Option<u32>,
        decision: &Decision,
        ssh_keys: &[String],
    ) -> Result<Reused, ServiceError> {
        if decision.reuse.is_empty() || !caller.is_root() {
            return Ok(Reused::Prove(None));
        }
        let attributes = self.attributes(caller, ctx, ssh_keys, uid);
        if let Some((grant, _)) = self
            .reusable(caller, &ctx.user, &attributes, &decision.reuse)
            .await?
        {
            return Ok(Reused::Granted(grant.proof));
        }
        let ssh_connection =
            Some(ctx.ssh_connection.clone()).filter(|c| !c.is_empty() && self.is_sshd(caller, ctx));
        Ok(Reused::Prove(Some(Box::new(Proving {
            reuse: decision.reuse.clone(),
            attributes,
            ssh_connection,
        }))))
    }

    /// Whether a login context comes from sshd: a root caller under one of the PAM services
    /// `ssh_services` names. Only then are its SSH_AUTH_INFO_0 and SSH_CONNECTION believed (a
    /// setuid program a user starts cannot choose its PAM service).
    pub(super) fn is_sshd(&self, caller: &Caller, ctx: &LoginContext) -> bool {
        caller.is_root() && self.ssh_services.iter().any(|s| s.matches(&ctx.service))
    }

    /// The fingerprints of the ssh keys that authenticated this login, if sshd says so.
    pub(super) fn ssh_keys(&self, caller: &Caller, ctx: &LoginContext) -> Vec<String> {
        if self.is_sshd(caller, ctx) {
            ssh_auth::fingerprints(&ctx.ssh_auth_info)
        } else {
            Vec::new()
        }
    }

    /// The attributes a grant can be bound to, for a login by `caller`; all absent for a
    /// caller without root's rights, whose logins never make or use a grant. The session is
    /// read from /proc now (checked against the process that connected), except sshd's: it
    /// authenticates before the login's session exists, so the session its own process is in
    /// (one inherited from whoever started sshd: an init script run from an admin's shell, a
    /// container started from a login) is never the login's. An ssh login's grants get their
    /// session from `open_session`.
    pub(super) fn attributes(
        &self,
        caller: &Caller,
        ctx: &LoginContext,
        ssh_keys: &[String],
        uid: Option<u32>,
    ) -> Attributes {
        if !caller.is_root() {
            return Attributes::default();
        }
        let present = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
        Attributes {
            host: present(&self.host),
            service: present(&ctx.service),
            rhost: present(&ctx.rhost),
            tty: present(&ctx.tty),
            ssh_key: present(&ssh_keys.join(",")),
            session: if self.is_sshd(caller, ctx) {
                None
            } else {
                Attributes::session_name(&self.host, caller.login_session(uid))
            },
        }
    }

    /// The grant that lets this login in without a code, with when it ends; none for a
    /// non-root caller or a decision without reuse.
    pub(super) async fn reusable(
        &self,
        caller: &Caller,
        user: &str,
        attributes: &Attributes,
        reuse: &[Reuse],
    ) -> Result<Option<(Grant, i64)>, ServiceError> {
        if reuse.is_empty() || !caller.is_root() {
            return Ok(None);
        }
        let (u, now) = (user.to_owned(), self.clock.now() as i64);
        let grants = self
            .store(move |store| {
                // None during a back-off: its start ends the grants stored then, but one stored
                // just after (by a login whose code was checked just before) would outlive it.
                if store.lockout(&u)?.remaining(now).is_some() {
                    return Ok(Vec::new());
                }
                Ok(store.grants(&u, now)?)
            })
            .await?;
        Ok(grant::find(&grants, reuse, attributes, now).map(|(g, until)| (g.clone(), until)))
    }

    /// After an OTP proven in `proving`'s conversation (of the account with `uid`): one grant
    /// per obligation, bound to the attributes of the login (its session, if it began in one,
    /// read again from the caller that answered, which must still be in it).
    /// Returns the proving login's audit id. A grant that cannot be stored only costs the
    /// user a code next time: the login itself goes on.
    pub(super) async fn make_grants(
        &self,
        caller: &Caller,
        user: &str,
        uid: Option<u32>,
        proving: Proving,
    ) -> Option<String> {
        if !caller.is_root() || proving.reuse.is_empty() {
            return None;
        }
        let proof = crate::otp::random_hex(8).ok()?;
        let now = self.clock.now() as i64;
        let mut attributes = proving.attributes;
        attributes.session = attributes.session.filter(|s| {
            Attributes::session_name(&self.host, caller.login_session(uid)).as_ref() == Some(s)
        });
        let mut grants = Vec::with_capacity(proving.reuse.len());
        for r in &proving.reuse {
            grants.push(Grant {
                id: crate::otp::random_hex(8).ok()?,
                user: user.to_owned(),
                rule: r.rule.clone(),
                digest: r.digest.clone(),
                proof: proof.clone(),
                created: now,
                expires: now.saturating_add(r.window as i64),
                attributes: attributes.clone(),
                ssh_connection: proving.ssh_connection.clone(),
            });
        }
        match self
            .store(move |store| Ok(store.add_grants(&grants, now)?))
            .await
        {
            Ok(()) => Some(proof),
            Err(e) => {
                tracing::warn!("reuse grants not stored (the next login asks again): {e}");
                None
            }
        }
    }
}

/// The session stage of an ssh login: the grants its OTP made (in sshd's authentication
/// process, matched here by SSH_CONNECTION and keys, within `BIND_WINDOW`) are bound to the
/// login session that sshd just opened, read from /proc, never from the request.
pub(super) async fn open_session(
    svc: &GuardService,
    req: Request<BeginRequest>,
) -> Result<Response<OpenSessionReply>, ServiceError> {
    let (caller, ctx, account) = svc.login_request(req, "session").await?;
    // After pam_loginuid: the session sshd just opened for this account.
    let uid = account.map(|a| a.uid);
    let session = if svc.is_sshd(&caller, &ctx) && !ctx.ssh_connection.is_empty() {
        Attributes::session_name(&svc.host, caller.login_session(uid))
    } else {
        None
    };
    let Some(session) = session else {
        return Ok(Response::new(OpenSessionReply { bound: 0 }));
    };
    let keys = Some(svc.ssh_keys(&caller, &ctx).join(",")).filter(|k| !k.is_empty());
    let since = svc.clock.now() as i64 - BIND_WINDOW;
    let (u, connection) = (ctx.user.clone(), ctx.ssh_connection.clone());
    let bound = svc
        .store(move |store| {
            Ok(store.bind_session(&u, &connection, keys.as_deref(), since, &session)?)
        })
        .await?;
    if bound > 0 {
        audit::record(
            &Event {
                action: "session",
                user: &ctx.user,
                service: &ctx.service,
                rhost: &ctx.rhost,
                tty: &ctx.tty,
                outcome: "ok",
                reason: "reuse grants bound to the login session",
                ..Event::default()
            }
            .caller(&caller),
        );
    }
    Ok(Response::new(OpenSessionReply {
        bound: u32::try_from(bound).unwrap_or(u32::MAX),
    }))
}

/// `guardctl forget USER`: ends the user's grants at once.
pub(super) async fn forget(
    svc: &GuardService,
    req: Request<ForgetRequest>,
) -> Result<Response<ForgetReply>, ServiceError> {
    let caller = Caller::of(&req)?;
    let user = req.into_inner().user;
    admin_only(svc, &caller, &user, "forget").await?;
    let u = user.clone();
    let forgotten = svc.store(move |store| Ok(store.forget(&u)?)).await?;
    admin_audit(&caller, "forget", &user, true, "");
    Ok(Response::new(ForgetReply {
        forgotten: u32::try_from(forgotten).unwrap_or(u32::MAX),
    }))
}

/// The reuse line of an explanation: the obligations, and whether one of `user`'s grants would
/// let a login with `attributes` in (a session-bound grant applies only inside its session,
/// which a hypothetical login has not).
pub(super) fn describe(
    reuse: &[Reuse],
    grants: &[Grant],
    attributes: &Attributes,
    now: i64,
) -> String {
    if reuse.is_empty() {
        return String::new();
    }
    let obligations = reuse
        .iter()
        .map(|r| {
            let scope: Vec<&str> = r.scope.iter().map(|s| s.as_str()).collect();
            format!("{}: {} s within [{}]", r.rule, r.window, scope.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ");
    let live = grants
        .iter()
        .filter(|g| {
            reuse
                .iter()
                .any(|r| g.rule == r.rule && g.digest == r.digest)
        })
        .count();
    let verdict = match grant::find(grants, reuse, attributes, now) {
        Some((g, until)) => format!(
            "a grant applies (proved by login {}) until {}",
            g.proof,
            jiff::Timestamp::from_second(until)
                .map(|t| t.to_string())
                .unwrap_or_default()
        ),
        None => format!("no grant applies ({live} live under these rules)"),
    };
    format!("reuse {obligations}; {verdict}")
}
