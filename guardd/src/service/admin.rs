//! Token administration: enrolment and its confirmation, listing, deletion, enabling and
//! disabling, HOTP resynchronisation, unlocking, backup codes.

use super::*;

/// How far ahead `Resync` searches for two consecutive HOTP codes.
const RESYNC_WINDOW: u64 = 1000;

/// Checks the user name and that the caller may administer (root or the admin group; no
/// self-service): the preamble of disable/enable, resync, unlock and backup codes.
pub(super) async fn admin_only(
    svc: &GuardService,
    caller: Caller,
    user: &str,
    action: &'static str,
) -> Result<(), Status> {
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

pub(super) async fn enroll(
    svc: &GuardService,
    req: Request<EnrollRequest>,
) -> Result<Response<EnrollReply>, Status> {
    let caller = Caller::of(&req)?;
    let EnrollRequest {
        user,
        label,
        kind,
        algorithm,
        digits,
        period,
        ..
    } = req.into_inner();
    validate_name("user", &user)?;
    validate_label(&label)?;
    let (kind, params) = token_kind(&kind, &algorithm, digits, period)?;
    // Self-service enrolment only while the user has no token at all: a user who has one
    // must not be able to add a second from a session that did not prove the first.
    svc.authorize(
        caller,
        Action::Enroll,
        Some(user.clone()),
        "enroll",
        |s, u| Ok(s.list(Some(u))?.is_empty()),
    )
    .await?;
    let issuer = svc.issuer.clone();
    let now = svc.clock.now();
    let u = user.clone();
    system(move || require_system_user(&u)).await?;
    let (info, uri) = svc
        .store(move |store| {
            let secret = otp::new_secret()
                .map_err(|_| Status::internal("the system random source failed"))?;
            let info = store.add_pending(
                NewToken {
                    user: &user,
                    label: &label,
                    kind,
                    params,
                    secret: &secret,
                },
                now as i64,
            )?;
            let uri = otp::otpauth_uri(&issuer, &user, &secret, kind, params);
            Ok((info, uri))
        })
        .await?;
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

pub(super) async fn confirm(
    svc: &GuardService,
    req: Request<ConfirmRequest>,
) -> Result<Response<ConfirmReply>, Status> {
    let caller = Caller::of(&req)?;
    let ConfirmRequest { user, code } = req.into_inner();
    let code = Zeroizing::new(code);
    validate_name("user", &user)?;
    svc.authorize(
        caller,
        Action::Enroll,
        Some(user.clone()),
        "confirm",
        |_, _| Ok(true),
    )
    .await?;
    let (windows, now) = (svc.windows, svc.clock.now());
    let u = user.clone();
    let confirmed = svc
        .store(move |store| {
            let id = consume_code(store, &u, TokenState::Pending, &code, now, windows)?;
            match id {
                Some(id) => Ok(Ok(store.get(&u, &id)?)),
                None => Ok(Err(store.secrets(&u, TokenState::Pending)?.is_empty())),
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
        Ok(None) => Err(Status::not_found("the token was deleted meanwhile")),
        Err(true) => Err(Status::failed_precondition(format!(
            "{user} has no pending token; run `guardctl enroll {user}` first"
        ))),
        Err(false) => Err(Status::invalid_argument(
            "the code does not match the pending token; check the phone's clock and type the code it shows now",
        )),
    }
}

pub(super) async fn list(
    svc: &GuardService,
    req: Request<ListRequest>,
) -> Result<Response<ListReply>, Status> {
    let caller = Caller::of(&req)?;
    let user = Some(req.into_inner().user).filter(|u| !u.is_empty());
    if let Some(u) = &user {
        validate_name("user", u)?;
    }
    svc.authorize(caller, Action::List, user.clone(), "list", |_, _| Ok(true))
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
) -> Result<Response<DeleteReply>, Status> {
    let caller = Caller::of(&req)?;
    let DeleteRequest { user, token_id } = req.into_inner();
    validate_name("user", &user)?;
    validate_name("token id", &token_id)?;
    // Users may withdraw their own unconfirmed enrolment, not an active token.
    let id = token_id.clone();
    svc.authorize(
        caller,
        Action::Delete,
        Some(user.clone()),
        "delete",
        move |s, u| Ok(s.get(u, &id)?.is_some_and(|t| t.state == "pending")),
    )
    .await?;
    let (u, id) = (user.clone(), token_id.clone());
    let deleted = svc.store(move |store| Ok(store.delete(&u, &id)?)).await?;
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
        )))
    }
}

pub(super) async fn set_enabled(
    svc: &GuardService,
    req: Request<SetEnabledRequest>,
) -> Result<Response<TokenReply>, Status> {
    let caller = Caller::of(&req)?;
    let SetEnabledRequest {
        user,
        token_id,
        enabled,
    } = req.into_inner();
    validate_name("token id", &token_id)?;
    let action = if enabled { "enable" } else { "disable" };
    admin_only(svc, caller, &user, action).await?;
    let (from, to) = if enabled {
        (TokenState::Disabled, TokenState::Active)
    } else {
        (TokenState::Active, TokenState::Disabled)
    };
    let (u, id) = (user.clone(), token_id.clone());
    let token = svc
        .store(move |store| {
            if store.set_state(&u, &id, from, to)? {
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
        ))),
    }
}

pub(super) async fn resync(
    svc: &GuardService,
    req: Request<ResyncRequest>,
) -> Result<Response<TokenReply>, Status> {
    let caller = Caller::of(&req)?;
    let ResyncRequest {
        user,
        token_id,
        first,
        second,
    } = req.into_inner();
    let (first, second) = (Zeroizing::new(first), Zeroizing::new(second));
    validate_name("token id", &token_id)?;
    admin_only(svc, caller, &user, "resync").await?;
    let (u, id, now) = (user.clone(), token_id.clone(), svc.clock.now());
    let result = svc
        .store(move |store| {
            let tokens = store.secrets(&u, TokenState::Active)?;
            let Some(token) = tokens.into_iter().find(|t| t.id == id) else {
                return Err(Status::not_found(format!(
                    "{u} has no active token {id}; see `guardctl list {u}`"
                )));
            };
            if token.counter.kind != Kind::Hotp {
                return Err(Status::failed_precondition(
                    "only HOTP tokens need resynchronising; TOTP tokens follow the clock",
                ));
            }
            let counter = otp::resync(&token.secret, token.counter, &first, &second, RESYNC_WINDOW)
                .map_err(|e| Status::internal(e.to_string()))?
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "the two codes are not consecutive codes of token {id} within {RESYNC_WINDOW} counters"
                    ))
                })?;
            if !store.accept(&id, TokenState::Active, counter, 0, now as i64)? {
                return Err(Status::aborted("the token changed meanwhile; try again"));
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
) -> Result<Response<UnlockReply>, Status> {
    let caller = Caller::of(&req)?;
    let user = req.into_inner().user;
    admin_only(svc, caller, &user, "unlock").await?;
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
) -> Result<Response<BackupCodesReply>, Status> {
    let caller = Caller::of(&req)?;
    let user = req.into_inner().user;
    admin_only(svc, caller, &user, "backup-codes").await?;
    let (u, now) = (user.clone(), svc.clock.now());
    // Hashing ten codes with Argon2 takes a while: not on the store thread.
    let (codes, hashes) = system(move || {
        require_system_user(&u)?;
        backup::generate().map_err(|e| Status::internal(e.to_string()))
    })
    .await?;
    let u = user.clone();
    svc.store(move |store| Ok(store.replace_backup_codes(&u, &hashes, now as i64)?))
        .await?;
    admin_audit(&caller, "backup-codes", &user, true, "");
    Ok(Response::new(BackupCodesReply {
        codes: codes.iter().map(|c| c.to_string()).collect(),
    }))
}

/// Tokens and codes are only issued to users the system knows (NSS).
fn require_system_user(user: &str) -> Result<(), Status> {
    match nix::unistd::User::from_name(user) {
        Ok(Some(_)) => Ok(()),
        _ => Err(Status::not_found(format!(
            "no such user: {user} (enroll only users the system knows)"
        ))),
    }
}

/// Reads the token kind and parameters of an enrolment; empty or zero fields take defaults.
fn token_kind(
    kind: &str,
    algorithm: &str,
    digits: u32,
    period: u32,
) -> Result<(Kind, OtpParams), Status> {
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
        _ => return Err(Status::invalid_argument("digits must be 6, 7 or 8")),
    };
    let period = match period {
        0 => defaults.period,
        p @ 15..=120 => u64::from(p),
        _ => return Err(Status::invalid_argument("period must be 15 to 120 seconds")),
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
        state: t.state,
        created: t.created,
        last_used: t.last_used.unwrap_or(0),
    }
}

fn validate_label(label: &str) -> Result<(), Status> {
    if label.chars().count() > 64 || label.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "the label must be at most 64 characters without control characters",
        ));
    }
    Ok(())
}
