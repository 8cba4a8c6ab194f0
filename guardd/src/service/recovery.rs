//! Password recovery by OTP (DESIGN §7): the rules and the device are checked, the code is
//! verified like a login's, then the new password is asked twice and set with chpasswd.

use super::*;

/// `Recover`: for one's own account (the caller's uid) or, as root, anyone's; the rules see the
/// service `recovery`. Ends in an OTP prompt whose answer goes through `Answer`.
pub(super) async fn begin(
    svc: &GuardService,
    req: Request<RecoverRequest>,
) -> Result<Response<Step>, Status> {
    let caller = Caller::of(&req)?;
    let requested = req.into_inner().user;
    let own = requested.is_empty();
    let user = if own {
        system(move || {
            caller
                .name()
                .ok_or_else(|| Status::permission_denied("your uid has no user name"))
        })
        .await?
    } else {
        requested
    };
    validate_name("user", &user)?;
    // Root (help desk, console) may recover anyone; everyone else only themselves.
    svc.authorize(
        caller,
        Action::Login,
        Some(user.clone()),
        "recover",
        |_, _| Ok(false),
    )
    .await?;
    let ctx = LoginContext {
        user: user.clone(),
        service: "recovery".into(),
        ..LoginContext::default()
    };
    let (policy, decision, _) = svc.decide(&ctx).await?;
    // Recovery always needs an OTP: the rules may only forbid it. Unknown users and users
    // without a device take the same path (both look-ups always run).
    let u = user.clone();
    let known = system(move || Ok(matches!(nix::unistd::User::from_name(&u), Ok(Some(_))))).await?;
    let u = user.clone();
    let device = svc
        .store(move |store| Ok(store.has_active(&u)? || !store.backup_codes(&u)?.is_empty()))
        .await?;
    let has_device = known && device;
    let rule = decision.rule_label();
    let event = |outcome, reason: &str| {
        audit::record(
            &Event {
                action: "recover",
                user: &user,
                service: "recovery",
                outcome,
                reason,
                rule: &rule,
                policy: policy.digest(),
                ..Event::default()
            }
            .caller(&caller),
        )
    };
    if let Rule::Deny { message } = &decision.verdict {
        event("deny", "rules deny recovery");
        return Ok(Response::new(deny(
            message
                .as_deref()
                .unwrap_or("Password recovery is not allowed for this account."),
            DenyReason::Policy,
        )));
    }
    if !has_device {
        event("deny", "no otp device");
        let message = if own {
            "No OTP device is configured for your account; contact your administrator."
        } else {
            "No OTP device is configured for this account (or there is no such user); nothing was changed."
        };
        return Ok(Response::new(deny(message, DenyReason::NotEnrolled)));
    }
    event("prompt", "otp required for recovery");
    let challenge = svc.open_session(ctx, caller.uid, svc.max_tries, Flow::RecoverCode)?;
    Ok(Response::new(prompt(
        challenge,
        PROMPT_TEXT,
        String::new(),
        PromptKind::Code,
    )))
}

/// The password stages of recovery, after the OTP was verified.
pub(super) async fn password(
    svc: &GuardService,
    caller: Caller,
    ctx: LoginContext,
    flow: Flow,
    response: Zeroizing<Vec<u8>>,
) -> Result<Step, Status> {
    let audit = |outcome, reason: &str| {
        audit::record(
            &Event {
                action: "recover",
                user: &ctx.user,
                service: "recovery",
                outcome,
                reason,
                ..Event::default()
            }
            .caller(&caller),
        )
    };
    let typed = match crate::recovery::new_password(&response) {
        Ok(p) => p,
        Err(e) => {
            audit("deny", "unusable new password");
            return Ok(deny(
                &format!("{e}; nothing was changed."),
                DenyReason::Policy,
            ));
        }
    };
    match flow {
        Flow::RecoverNew => {
            let challenge =
                svc.open_session(ctx.clone(), caller.uid, 1, Flow::RecoverConfirm(typed))?;
            Ok(prompt(
                challenge,
                "Retype new password: ",
                String::new(),
                PromptKind::ConfirmPassword,
            ))
        }
        Flow::RecoverConfirm(first) => {
            if !bool::from(first.as_bytes().ct_eq(typed.as_bytes())) {
                audit("deny", "confirmation did not match");
                return Ok(deny(
                    "The passwords do not match; nothing was changed.",
                    DenyReason::Policy,
                ));
            }
            let user = ctx.user.clone();
            let result = system(move || Ok(crate::recovery::set_password(&user, &first))).await?;
            match result {
                Ok(()) => {
                    audit("ok", "password changed");
                    Ok(Step {
                        kind: Some(step::Kind::Permit(Permit {
                            message: format!("The password of {} was changed.", ctx.user),
                        })),
                    })
                }
                Err(e) => {
                    tracing::warn!(user = ctx.user, "password not changed: {e}");
                    audit("deny", "the system refused the password");
                    Ok(deny(
                        &format!("{e}; nothing was changed."),
                        DenyReason::Policy,
                    ))
                }
            }
        }
        Flow::Login | Flow::RecoverCode => Err(Status::internal("unexpected recovery stage")),
    }
}
