//! Password recovery by OTP: the rules and the device are checked, the code is verified like a
//! login's, then the new password is asked twice and set with chpasswd. A token is a second
//! factor, never a way to mint a first one: an account whose password is locked or empty gets
//! no password from it (`passwd -l` holds; root unlocks with the system's tools).

use proto::v1::{step, DenyReason, LoginContext, Permit, PromptKind, RecoverRequest, Step};
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::{
    deny, foreign_reason, prompt, validate_name, Flow, GuardService, ServiceError, FOREIGN_MESSAGE,
    PROMPT_TEXT,
};
use crate::accounts::{self, PasswordState};
use crate::audit::{self, Event};
use crate::budget::Holding;
use crate::caller::{Action, Caller};
use crate::policy::Verdict as Rule;

/// `Recover`: for one's own account (the caller's uid) or, as root, anyone's; the rules see the
/// service `recovery`. Ends in an OTP prompt whose answer goes through `Answer`.
pub(super) async fn begin(
    svc: &GuardService,
    req: Request<RecoverRequest>,
) -> Result<Response<Step>, ServiceError> {
    let caller = Caller::of(&req)?;
    let requested = req.into_inner().user;
    let own = requested.is_empty();
    let user = if own {
        let accounts = svc.accounts.clone();
        svc.blocking(&caller, move || match accounts.by_uid(caller.uid) {
            Ok(Some(account)) => Ok(account.name),
            _ => Err(Status::permission_denied("your uid has no user name").into()),
        })
        .await?
    } else {
        requested
    };
    validate_name("user", &user)?;
    // Root (help desk, console) may recover anyone; everyone else only themselves.
    svc.authorize(
        &caller,
        Action::Login,
        Some(user.clone()),
        "recover",
        |_, _| Ok(false),
    )
    .await?;
    // guardd builds the context itself: nothing of it comes from the caller but the name.
    let account = svc.account(&caller, &user).await?;
    let user = account.as_ref().map_or(user, |a| a.name.clone());
    let uid = account.as_ref().map(|a| a.uid);
    let ctx = LoginContext {
        user: user.clone(),
        service: "recovery".into(),
        ..LoginContext::default()
    };
    let (policy, decision, facts) = svc.decide(&caller, &ctx, account.as_ref()).await?;
    // Recovery always needs an OTP: the rules may only forbid it. Unknown users and users
    // without a device take the same path (both look-ups always run).
    let (accounts, u) = (svc.accounts.clone(), user.clone());
    let password = svc
        .blocking(&caller, move || Ok(accounts.password_state(&u)))
        .await?;
    let record = facts.record();
    let has_device = account.is_some() && record.can_answer && record.foreign.is_none();
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
    if record.foreign.is_some() {
        event("deny", &foreign_reason(record.foreign, &user, uid));
        return Ok(Response::new(deny(FOREIGN_MESSAGE, DenyReason::Policy)));
    }
    if has_device && password != PasswordState::Usable {
        let why = match password {
            PasswordState::Locked => "the password is locked",
            PasswordState::Empty => "the account has no password",
            _ => "the password is not a local one guardd can set",
        };
        event("deny", why);
        return Ok(Response::new(deny(
            &format!(
                "Password recovery is not possible: {why}. A one-time password does not create or unlock a password; ask your administrator."
            ),
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
    let challenge =
        svc.open_conversation(ctx, &caller, svc.max_tries, Flow::RecoverCode, uid, None)?;
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
    uid: Option<u32>,
    holding: Holding,
) -> Result<Step, ServiceError> {
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
    let typed = match accounts::new_password(&response) {
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
            let challenge = svc.open_conversation(
                ctx.clone(),
                &caller,
                1,
                Flow::RecoverConfirm(typed),
                uid,
                Some(holding),
            )?;
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
            // Checked again right before the change: the account may have been locked or
            // replaced while the user typed.
            let (accounts, user) = (svc.accounts.clone(), ctx.user.clone());
            let result = svc
                .blocking(&caller, move || {
                    let same = accounts
                        .by_name(&user)
                        .ok()
                        .flatten()
                        .is_some_and(|a| Some(a.uid) == uid);
                    if !same || accounts.password_state(&user) != PasswordState::Usable {
                        return Ok(Err(accounts::AccountError::Refused(
                            "the account changed or its password was locked meanwhile".into(),
                        )));
                    }
                    Ok(accounts.set_password(&user, &first))
                })
                .await?;
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
        Flow::Login(_) | Flow::RecoverCode => {
            Err(Status::internal("unexpected recovery stage").into())
        }
    }
}
