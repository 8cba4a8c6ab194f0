//! Token administration: enrolment (by an admin, by the user with proof, by invitation) and
//! its confirmation, listing, deletion, enabling and disabling, HOTP resynchronisation,
//! unlocking, backup codes.

use proto::v1::{
    BackupCodesReply, BackupCodesRequest, ConfirmReply, ConfirmRequest, DeleteReply, DeleteRequest,
    EnrollReply, EnrollRequest, ListReply, ListRequest, LoginContext, ResyncRequest,
    SetEnabledRequest, Token, TokenReply, UnlockReply, UnlockRequest,
};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::{
    admin_audit, consume_code, count_failure, foreign_reason, validate_name, GuardService,
    ServiceError,
};
use crate::accounts::{Account, PasswordState};
use crate::audit::{self, Event};
use crate::backup;
use crate::caller::{Action, Caller};
use crate::otp::{self, HashAlg, Kind, OtpParams};
use crate::policy::{Unenrolled, Verdict as Rule};
use crate::store::{NewToken, TokenInfo, TokenState};

/// How far ahead `Resync` searches for two consecutive HOTP codes.
const RESYNC_WINDOW: u64 = 1000;

/// Checks the user name and that the caller may administer (root or the admin group; no
/// self-service): the preamble of disable/enable, resync, unlock and backup codes.
pub(super) async fn admin_only(
    svc: &GuardService,
    caller: &Caller,
    user: &str,
    action: &'static str,
) -> Result<(), ServiceError> {
    validate_name("user", user)?;
    svc.authorize(
        caller,
        Action::Admin,
        Some(user.to_owned()),
        action,
        |_, _| Ok(false),
    )
    .await
}

/// How long an invitation to self-enrol stays valid, in seconds.
const INVITATION_TTL: u64 = 24 * 3600;
/// Tokens (of every state) a user may hold and still enrol another themself. Without a bound,
/// a user with an HOTP token (whose codes they can compute at will) could enrol tokens as fast
/// as guardd answers, and every later check of that user's codes unseals and tries each one on
/// the store thread that every login waits for. Admins may enrol past it.
const MAX_OWN_TOKENS: usize = 10;

/// What a self-enrolment proved, checked again inside the store call that creates the token.
enum Proof {
    /// Root or the admin group enrols someone: no proof from the user.
    Admin,
    /// The user enrols themself.
    Own {
        /// SHA-256 of the invitation that replaces the password, used up by the same step.
        invitation: Option<[u8; 32]>,
        /// A code of an active token, where the rules ask for one before a further token.
        code: Option<Zeroizing<Vec<u8>>>,
        /// The rules allow it only while the user has no active token: checked atomically.
        first_only: bool,
    },
}

pub(super) async fn enroll(
    svc: &GuardService,
    req: Request<EnrollRequest>,
) -> Result<Response<EnrollReply>, ServiceError> {
    let caller = Caller::of(&req)?;
    let EnrollRequest {
        user,
        label,
        kind,
        algorithm,
        digits,
        period,
        password,
        invitation,
        invite,
        code,
    } = req.into_inner();
    let (password, invitation, code) = (
        Zeroizing::new(password),
        Zeroizing::new(invitation),
        Zeroizing::new(code),
    );
    validate_name("user", &user)?;
    validate_label(&label)?;
    let (kind, params) = token_kind(&kind, &algorithm, digits, period)?;
    let account = require_account(svc, &caller, &user)
        .await
        .inspect_err(|_| audit::refused(&caller, "enroll", &user, "no such user"))?;
    let user = account.name.clone();
    let admin = svc.is_admin(&caller).await?;
    if invite {
        if !admin {
            audit::refused(&caller, "invite", &user, "not an administrator");
            return Err(Status::permission_denied(
                "permission denied: only root or the guardd admin group may invite",
            )
            .into());
        }
        return issue_invitation(svc, caller, account).await;
    }
    let proof = if admin {
        Proof::Admin
    } else if caller.uid == account.uid {
        own_proof(svc, &caller, &account, password, invitation, code).await?
    } else {
        audit::refused(&caller, "enroll", &user, "another user's account");
        return Err(Status::permission_denied(
            "permission denied: run this as root or as a member of the guardd admin group",
        )
        .into());
    };
    let issuer = svc.issuer.clone();
    let (now, uid) = (svc.clock.now(), account.uid);
    let (windows, backoff) = (svc.windows, svc.backoff);
    let (u, host) = (user.clone(), svc.host.clone());
    let created = svc
        .store(move |store| {
            if let Some(other) = store.foreign_uid(&u, &host, Some(uid))? {
                return Ok(Err(Status::failed_precondition(foreign_reason(
                    Some(other),
                    &u,
                    Some(uid),
                ))));
            }
            if let Proof::Own {
                invitation,
                code,
                first_only,
            } = &proof
            {
                // Checked before anything is used up: a refusal here costs no code or invitation.
                // A pending token does not count: this enrolment replaces it.
                let tokens = store.list(Some(&u))?;
                let held = tokens
                    .iter()
                    .filter(|t| t.state != TokenState::Pending)
                    .count();
                if held >= MAX_OWN_TOKENS {
                    return Ok(Err(Status::failed_precondition(format!(
                        "you already have {held} tokens; ask your administrator to delete one you no longer use"
                    ))));
                }
                if let Some(hash) = invitation {
                    // Wrong invitations count toward the back-off: once it runs, none is tried.
                    if let Some(wait) = store.lock_attempts(&u)?.remaining(now as i64) {
                        return Ok(Err(locked_status(wait)));
                    }
                    if !store.use_invitation(&u, uid, hash, now as i64)? {
                        count_failure(store, &u, Some(uid), &backoff, now as i64)?;
                        return Ok(Err(Status::permission_denied(
                            "the invitation is wrong, expired or already used; ask your administrator for a new one",
                        )));
                    }
                }
                if let Some(code) = code {
                    if let Some(wait) = store.lock_attempts(&u)?.remaining(now as i64) {
                        return Ok(Err(locked_status(wait)));
                    }
                    let used =
                        consume_code(store, &u, TokenState::Active, code, now, windows)?;
                    if used.is_none() {
                        count_failure(store, &u, Some(uid), &backoff, now as i64)?;
                        return Ok(Err(Status::permission_denied(
                            "the code of your active token is wrong, expired or already used",
                        )));
                    }
                } else if *first_only && store.has_active(&u)? {
                    return Ok(Err(Status::failed_precondition(
                        "you already have an active token: enrolling another needs a code from it (guardctl enroll --code)",
                    )));
                }
                // One pending enrolment at a time: a new one replaces it.
                for t in tokens.iter().filter(|t| t.state == TokenState::Pending) {
                    store.delete(&u, &t.id)?;
                }
            }
            let secret = otp::new_secret()
                .map_err(|_| Status::internal("the system random source failed"))?;
            let info = store.add_pending(
                NewToken {
                    user: &u,
                    uid: Some(uid),
                    label: &label,
                    kind,
                    params,
                    secret: &secret,
                },
                now as i64,
            )?;
            // Binds the name, on this host, to the account that enrolled.
            store.foreign_uid(&u, &host, Some(uid))?;
            let uri = otp::otpauth_uri(&issuer, &u, &secret, kind, params);
            Ok(Ok((info, uri)))
        })
        .await?;
    let (info, uri) = match created {
        Ok(created) => created,
        Err(status) => {
            audit::refused(&caller, "enroll", &user, status.message());
            return Err(status.into());
        }
    };
    audit::record(
        &Event {
            action: "enroll",
            user: &info.user,
            outcome: "ok",
            reason: "pending token created",
            token: &info.id,
            ..Event::default()
        }
        .caller(&caller),
    );
    Ok(Response::new(EnrollReply {
        token: Some(token_message(info)),
        uri: uri.to_string(),
        ..EnrollReply::default()
    }))
}

/// What a user enrolling their own token must prove, by the rules for the service `enroll`:
/// the account's password (checked through the system's PAM stack, the failure counted first)
/// or an admin's invitation, and, where the rules ask for an OTP from a user who has a token,
/// a code of it. guardd builds the request the rules see; nothing of it comes from the caller.
async fn own_proof(
    svc: &GuardService,
    caller: &Caller,
    account: &Account,
    password: Zeroizing<Vec<u8>>,
    invitation: Zeroizing<Vec<u8>>,
    code: Zeroizing<Vec<u8>>,
) -> Result<Proof, ServiceError> {
    let user = account.name.clone();
    let ctx = LoginContext {
        user: user.clone(),
        service: "enroll".into(),
        ..LoginContext::default()
    };
    let (_, decision, facts) = svc.decide(caller, &ctx, Some(account)).await?;
    let refuse = |status: Status| -> Result<Proof, ServiceError> {
        audit::refused(caller, "enroll", &user, status.message());
        Err(status.into())
    };
    let (needs_code, first_only) = match &decision.verdict {
        Rule::Deny { message } => {
            return refuse(Status::permission_denied(
                message
                    .clone()
                    .unwrap_or_else(|| "the site's rules do not allow you to enrol a token yourself; ask your administrator".into()),
            ))
        }
        Rule::Permit => (false, false),
        Rule::Otp { .. } if facts.record().active => (true, false),
        Rule::Otp {
            unenrolled: Unenrolled::Permit,
        } => (false, true),
        Rule::Otp {
            unenrolled: Unenrolled::Deny,
        } => {
            return refuse(Status::permission_denied(
                "the site's rules let only an administrator enrol your first token",
            ))
        }
    };
    if needs_code && code.is_empty() {
        return refuse(Status::failed_precondition(
            "you already have an active token: enrolling another needs a code from it (guardctl enroll --code)",
        ));
    }
    let code = needs_code.then_some(code);
    if !invitation.is_empty() {
        let Some(normal) = backup::normalize(&invitation) else {
            return refuse(Status::invalid_argument(
                "an invitation looks like xxxxx-xxxxx",
            ));
        };
        return Ok(Proof::Own {
            invitation: Some(invitation_hash(&normal)),
            code,
            first_only,
        });
    }
    let (accounts, u) = (svc.accounts.clone(), user.clone());
    let state = svc
        .blocking(caller, move || Ok(accounts.password_state(&u)))
        .await?;
    if matches!(state, PasswordState::Locked | PasswordState::Empty) {
        return refuse(Status::failed_precondition(
            "your account has no usable password (it is locked or empty), so it cannot prove itself here; ask your administrator for an invitation (guardctl enroll USER --invite)",
        ));
    }
    if password.is_empty() {
        return refuse(Status::failed_precondition(
            "enrolling your own token needs your current password (guardctl asks for it), or an invitation from your administrator",
        ));
    }
    let one_at_a_time = svc
        .password_budget
        .acquire(caller.budget_keys(None), caller.is_root())
        .map_err(ServiceError::from)?;
    // Counted before the slow check, forgiven after a right password: no password oracle.
    let (backoff, now, uid) = (svc.backoff, svc.clock.now() as i64, account.uid);
    let u = user.clone();
    let locked = svc
        .store(move |store| {
            if let Some(wait) = store.lock_attempts(&u)?.remaining(now) {
                return Ok(Some(wait));
            }
            count_failure(store, &u, Some(uid), &backoff, now)?;
            Ok(None)
        })
        .await?;
    if let Some(wait) = locked {
        return refuse(locked_status(wait));
    }
    let (accounts, u) = (svc.accounts.clone(), user.clone());
    let right = svc
        .blocking(caller, move || {
            // Held by the check itself: a call cut short does not end it.
            let _one_at_a_time = one_at_a_time;
            accounts
                .check_password(&u, &password)
                .map_err(|e| {
                    tracing::error!(user = u, "{e}");
                    Status::unavailable("the password could not be checked; see the guardd log")
                })
                .map_err(ServiceError::from)
        })
        .await?;
    if !right {
        return refuse(Status::permission_denied("the password is wrong"));
    }
    let u = user.clone();
    svc.store(move |store| Ok(store.forgive_failure(&u, &backoff)?))
        .await?;
    Ok(Proof::Own {
        invitation: None,
        code,
        first_only,
    })
}

/// An admin's invitation for `account` to enrol from its own session: a single-use code, bound
/// to the account's uid, valid for a day. Only its hash is kept.
async fn issue_invitation(
    svc: &GuardService,
    caller: Caller,
    account: Account,
) -> Result<Response<EnrollReply>, ServiceError> {
    let code = backup::random_code().map_err(ServiceError::from)?;
    let normal = backup::normalize(code.as_bytes())
        .ok_or_else(|| Status::internal("an invitation could not be made"))?;
    let hash = invitation_hash(&normal);
    let expires = (svc.clock.now() + INVITATION_TTL) as i64;
    let (user, uid) = (account.name.clone(), account.uid);
    svc.store(move |store| Ok(store.add_invitation(&user, uid, &hash, expires)?))
        .await?;
    audit::record(
        &Event {
            action: "invite",
            user: &account.name,
            outcome: "ok",
            reason: "single-use invitation to self-enrol issued",
            ..Event::default()
        }
        .caller(&caller),
    );
    Ok(Response::new(EnrollReply {
        invitation: code.to_string(),
        invitation_expires: expires,
        ..EnrollReply::default()
    }))
}

fn invitation_hash(normal: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(normal.as_bytes()).into()
}

fn locked_status(wait: i64) -> Status {
    Status::permission_denied(format!("too many failed attempts; try again in {wait} s"))
}

pub(super) async fn confirm(
    svc: &GuardService,
    req: Request<ConfirmRequest>,
) -> Result<Response<ConfirmReply>, ServiceError> {
    let caller = Caller::of(&req)?;
    let ConfirmRequest { user, code } = req.into_inner();
    let code = Zeroizing::new(code);
    validate_name("user", &user)?;
    svc.authorize(
        &caller,
        Action::Enroll,
        Some(user.clone()),
        "confirm",
        |_, _| Ok(true),
    )
    .await?;
    let (windows, backoff, now) = (svc.windows, svc.backoff, svc.clock.now());
    let u = user.clone();
    let confirmed = svc
        .store(move |store| {
            // A wrong confirmation counts toward the back-off like a wrong login.
            if let Some(wait) = store.lock_attempts(&u)?.remaining(now as i64) {
                return Err(locked_status(wait).into());
            }
            let id = consume_code(store, &u, TokenState::Pending, &code, now, windows)?;
            match id {
                Some(id) => Ok(Ok(store.get(&u, &id)?)),
                None => {
                    let none = store.secrets(&u, TokenState::Pending)?.is_empty();
                    if !none {
                        count_failure(store, &u, None, &backoff, now as i64)?;
                    }
                    Ok(Err(none))
                }
            }
        })
        .await?;
    let (outcome, reason, token) = match &confirmed {
        Ok(Some(t)) => ("ok", "token activated", t.id.as_str()),
        _ => ("refused", "code did not match a pending token", ""),
    };
    audit::record(
        &Event {
            action: "confirm",
            user: &user,
            outcome,
            reason,
            token,
            ..Event::default()
        }
        .caller(&caller),
    );
    match confirmed {
        Ok(Some(info)) => Ok(Response::new(ConfirmReply {
            token: Some(token_message(info)),
        })),
        Ok(None) => Err(Status::not_found("the token was deleted meanwhile").into()),
        Err(true) => Err(Status::failed_precondition(format!(
            "{user} has no pending token; run `guardctl enroll {user}` first"
        )).into()),
        Err(false) => Err(Status::invalid_argument(
            "the code does not match the pending token; check the phone's clock and type the code it shows now",
        ).into()),
    }
}

pub(super) async fn list(
    svc: &GuardService,
    req: Request<ListRequest>,
) -> Result<Response<ListReply>, ServiceError> {
    let caller = Caller::of(&req)?;
    let user = Some(req.into_inner().user).filter(|u| !u.is_empty());
    if let Some(u) = &user {
        validate_name("user", u)?;
    }
    svc.authorize(&caller, Action::List, user.clone(), "list", |_, _| Ok(true))
        .await?;
    let who = user.clone().unwrap_or_else(|| "*".into());
    let tokens = svc
        .store(move |store| Ok(store.list(user.as_deref())?))
        .await?;
    admin_audit(&caller, "list", &who, true, "");
    Ok(Response::new(ListReply {
        tokens: tokens.into_iter().map(token_message).collect(),
    }))
}

pub(super) async fn delete(
    svc: &GuardService,
    req: Request<DeleteRequest>,
) -> Result<Response<DeleteReply>, ServiceError> {
    let caller = Caller::of(&req)?;
    let DeleteRequest { user, token_id } = req.into_inner();
    validate_name("user", &user)?;
    validate_name("token id", &token_id)?;
    // Users may withdraw their own unconfirmed enrolment, not an active token.
    let id = token_id.clone();
    svc.authorize(
        &caller,
        Action::Delete,
        Some(user.clone()),
        "delete",
        move |s, u| {
            Ok(s.get(u, &id)?
                .is_some_and(|t| t.state == TokenState::Pending))
        },
    )
    .await?;
    let (u, id) = (user.clone(), token_id.clone());
    let deleted = svc
        .store(move |store| {
            // The user's reuse grants end with any of their tokens: an OTP proven with a
            // token that is gone proves nothing now.
            let deleted = store.delete(&u, &id)?;
            if deleted {
                store.forget(&u)?;
            }
            Ok(deleted)
        })
        .await?;
    audit::record(
        &Event {
            action: "delete",
            user: &user,
            outcome: if deleted { "ok" } else { "refused" },
            reason: if deleted {
                "token deleted"
            } else {
                "no such token"
            },
            token: &token_id,
            ..Event::default()
        }
        .caller(&caller),
    );
    if deleted {
        Ok(Response::new(DeleteReply {}))
    } else {
        Err(Status::not_found(format!(
            "{user} has no token {token_id}; see `guardctl list {user}`"
        ))
        .into())
    }
}

pub(super) async fn set_enabled(
    svc: &GuardService,
    req: Request<SetEnabledRequest>,
) -> Result<Response<TokenReply>, ServiceError> {
    let caller = Caller::of(&req)?;
    let SetEnabledRequest {
        user,
        token_id,
        enabled,
    } = req.into_inner();
    validate_name("token id", &token_id)?;
    let action = if enabled { "enable" } else { "disable" };
    admin_only(svc, &caller, &user, action).await?;
    let (from, to) = if enabled {
        (TokenState::Disabled, TokenState::Active)
    } else {
        (TokenState::Active, TokenState::Disabled)
    };
    let (u, id) = (user.clone(), token_id.clone());
    let token = svc
        .store(move |store| {
            if store.set_state(&u, &id, from, to)? {
                if to == TokenState::Disabled {
                    store.forget(&u)?;
                }
                Ok(store.get(&u, &id)?)
            } else {
                Ok(None)
            }
        })
        .await?;
    admin_audit(&caller, action, &user, token.is_some(), &token_id);
    match token {
        Some(t) => Ok(Response::new(TokenReply {
            token: Some(token_message(t)),
        })),
        None => Err(Status::failed_precondition(format!(
            "{user} has no {} token {token_id}; see `guardctl list {user}`",
            from.as_str()
        ))
        .into()),
    }
}

pub(super) async fn resync(
    svc: &GuardService,
    req: Request<ResyncRequest>,
) -> Result<Response<TokenReply>, ServiceError> {
    let caller = Caller::of(&req)?;
    let ResyncRequest {
        user,
        token_id,
        first,
        second,
    } = req.into_inner();
    let (first, second) = (Zeroizing::new(first), Zeroizing::new(second));
    validate_name("token id", &token_id)?;
    admin_only(svc, &caller, &user, "resync").await?;
    let (u, id, now) = (user.clone(), token_id.clone(), svc.clock.now());
    let result = svc
        .store(move |store| {
            let tokens = store.secrets(&u, TokenState::Active)?;
            let Some(token) = tokens.into_iter().find(|t| t.id == id) else {
                return Err(Status::not_found(format!(
                    "{u} has no active token {id}; see `guardctl list {u}`"
                )).into());
            };
            if token.counter.kind != Kind::Hotp {
                return Err(Status::failed_precondition(
                    "only HOTP tokens need resynchronising; TOTP tokens follow the clock",
                ).into());
            }
            let counter = otp::resync(&token.secret, token.counter, &first, &second, RESYNC_WINDOW)
                .map_err(|e| Status::internal(e.to_string()))?
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "the two codes are not consecutive codes of token {id} within {RESYNC_WINDOW} counters"
                    ))
                })?;
            if !store.accept(&id, TokenState::Active, counter, 0, now as i64)? {
                return Err(Status::aborted("the token changed meanwhile; try again").into());
            }
            Ok(store.get(&u, &id)?)
        })
        .await;
    admin_audit(&caller, "resync", &user, result.is_ok(), &token_id);
    Ok(Response::new(TokenReply {
        token: result?.map(token_message),
    }))
}

pub(super) async fn unlock(
    svc: &GuardService,
    req: Request<UnlockRequest>,
) -> Result<Response<UnlockReply>, ServiceError> {
    let caller = Caller::of(&req)?;
    let user = req.into_inner().user;
    admin_only(svc, &caller, &user, "unlock").await?;
    let u = user.clone();
    let was_locked = svc
        .store(move |store| Ok(store.clear_failures(&u)?))
        .await?;
    admin_audit(&caller, "unlock", &user, true, "");
    Ok(Response::new(UnlockReply { was_locked }))
}

pub(super) async fn issue_backup_codes(
    svc: &GuardService,
    req: Request<BackupCodesRequest>,
) -> Result<Response<BackupCodesReply>, ServiceError> {
    let caller = Caller::of(&req)?;
    let user = req.into_inner().user;
    admin_only(svc, &caller, &user, "backup-codes").await?;
    let now = svc.clock.now();
    let account = require_account(svc, &caller, &user).await?;
    // Stored under the account's own name, which logins look up (not the name as typed).
    let (user, uid) = (account.name, account.uid);
    // Hashing ten codes with Argon2 takes a while: on the hasher thread, not the store's.
    let (codes, hashes) = {
        let _holding = svc
            .hashing_budget
            .acquire(caller.budget_keys(Some(&user)), caller.is_root())
            .map_err(ServiceError::from)?;
        svc.hasher.generate().await.map_err(ServiceError::from)?
    };
    let (u, host) = (user.clone(), svc.host.clone());
    svc.store(move |store| {
        if let Some(other) = store.foreign_uid(&u, &host, Some(uid))? {
            return Err(
                Status::failed_precondition(foreign_reason(Some(other), &u, Some(uid))).into(),
            );
        }
        store.replace_backup_codes(&u, Some(uid), &hashes, now as i64)?;
        // Codes are reissued when they leaked: the reuse grants end with them, as with a
        // disabled or deleted token (a grant proven by an old code proves nothing now).
        store.forget(&u)?;
        store.foreign_uid(&u, &host, Some(uid))?;
        Ok(())
    })
    .await?;
    admin_audit(&caller, "backup-codes", &user, true, "");
    Ok(Response::new(BackupCodesReply {
        codes: codes.iter().map(|c| c.to_string()).collect(),
    }))
}

/// The account of `user`: tokens and codes are only issued to users the system knows (NSS).
async fn require_account(
    svc: &GuardService,
    caller: &Caller,
    user: &str,
) -> Result<Account, ServiceError> {
    svc.account(caller, user)
        .await?
        .ok_or_else(|| {
            Status::not_found(format!(
                "no such user: {user} (enroll only users the system knows)"
            ))
        })
        .map_err(ServiceError::from)
}

/// Reads the token kind and parameters of an enrolment; empty or zero fields take defaults.
fn token_kind(
    kind: &str,
    algorithm: &str,
    digits: u32,
    period: u32,
) -> Result<(Kind, OtpParams), ServiceError> {
    let defaults = OtpParams::default();
    let kind = match kind {
        "" => Kind::Totp,
        k => Kind::parse(k).ok_or_else(|| Status::invalid_argument("kind must be totp or hotp"))?,
    };
    let algorithm = match algorithm {
        "" => defaults.algorithm,
        a => HashAlg::parse(&a.to_ascii_uppercase())
            .ok_or_else(|| Status::invalid_argument("algorithm must be SHA1, SHA256 or SHA512"))?,
    };
    let digits = match digits {
        0 => defaults.digits,
        d @ 6..=8 => d as u8,
        _ => return Err(Status::invalid_argument("digits must be 6, 7 or 8").into()),
    };
    let period = match period {
        0 => defaults.period,
        p @ 15..=120 => u64::from(p),
        _ => return Err(Status::invalid_argument("period must be 15 to 120 seconds").into()),
    };
    Ok((
        kind,
        OtpParams {
            algorithm,
            digits,
            period,
        },
    ))
}

fn token_message(t: TokenInfo) -> Token {
    Token {
        id: t.id,
        user: t.user,
        label: t.label,
        kind: t.kind,
        state: t.state.as_str().into(),
        created: t.created,
        last_used: t.last_used.unwrap_or(0),
    }
}

fn validate_label(label: &str) -> Result<(), ServiceError> {
    if label.chars().count() > 64 || label.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "the label must be at most 64 characters without control characters",
        )
        .into());
    }
    Ok(())
}
