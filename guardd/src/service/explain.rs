//! `guardctl explain`: how the rules in force decide a login, rule by rule.

use proto::v1::{ExplainReply, ExplainRequest, RuleLine};
use tonic::{Request, Response, Status};

use super::{validate_context, GuardService, LoginFacts, ServiceError};
use crate::caller::{Action, Caller};
use crate::policy::{Facts, LookupError, Outcome, Unenrolled, Verdict as Rule};

pub(super) async fn explain(
    svc: &GuardService,
    req: Request<ExplainRequest>,
) -> Result<Response<ExplainReply>, ServiceError> {
    let caller = Caller::of(&req)?;
    let ExplainRequest { context, time } = req.into_inner();
    let ctx = context.ok_or_else(|| Status::invalid_argument("the login context is missing"))?;
    validate_context(&ctx)?;
    // Admins only: an explanation maps which logins skip the OTP.
    svc.authorize(
        &caller,
        Action::Admin,
        Some(ctx.user.clone()),
        "explain",
        |_, _| Ok(false),
    )
    .await?;
    let time = if time == 0 {
        svc.clock.now() as i64
    } else {
        time
    };
    // The keys as sshd would report them, believed here since only an admin explains.
    let keys = crate::ssh_auth::fingerprints(&ctx.ssh_auth_info);
    let mut request = svc.rules_request(&ctx, time, keys.clone());
    if !ctx.host.is_empty() {
        request.host = ctx.host.clone();
    }
    let policy = svc.policy();
    // An explanation shows the groups and the enrolment whether or not a rule asks.
    let account = svc.account(&caller, &request.user).await?;
    let facts = LoginFacts {
        stored: Some(
            svc.stored_facts(&request.user, account.as_ref().map(|a| a.uid))
                .await?,
        ),
        groups: Some(svc.groups(&caller, account.as_ref()).await?),
        ..LoginFacts::default()
    };
    let d = policy.evaluate(&request, &facts, true);
    let yes_no = |r: Result<bool, LookupError>| match r {
        Ok(true) => "yes".to_owned(),
        Ok(false) => "no".to_owned(),
        Err(e) => format!("unknown ({e})"),
    };
    let groups = match facts.groups() {
        Ok(g) => format!("[{}]", g.join(",")),
        Err(e) => format!("unknown ({e})"),
    };
    let when = jiff::Timestamp::from_second(request.time)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let request_line = format!(
        "user={} groups={groups} service={} rhost={} host={} tty={} enrolled={} time={when}",
        request.user,
        request.service,
        request.rhost.as_deref().unwrap_or("local"),
        request.host,
        request.tty.as_deref().unwrap_or("(none)"),
        yes_no(facts.enrolled()),
    );
    let decision = match (&d.verdict, &d.indeterminate) {
        (_, Some(cause)) => format!("Deny: Indeterminate ({cause})"),
        (Rule::Permit, _) => format!("Permit without OTP ({})", d.rule_label()),
        (Rule::Deny { message }, _) => format!(
            "Deny ({}){}",
            d.rule_label(),
            message
                .as_ref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ),
        (Rule::Otp { unenrolled }, _) => format!(
            "OTP required ({}; unenrolled={})",
            d.rule_label(),
            match unenrolled {
                Unenrolled::Deny => "deny",
                Unenrolled::Permit => "permit",
            }
        ),
    };
    let reuse = if matches!(d.verdict, Rule::Otp { .. }) && d.indeterminate.is_none() {
        let (u, now) = (request.user.clone(), svc.clock.now() as i64);
        let grants = svc.store(move |store| Ok(store.grants(&u, now)?)).await?;
        let mut attributes = svc.attributes(&Caller::from_cred(0, 0, None), &ctx, &keys, None);
        attributes.host = Some(request.host.clone());
        super::reuse::describe(&d.reuse, &grants, &attributes, now)
    } else {
        String::new()
    };
    Ok(Response::new(ExplainReply {
        reuse,
        request: request_line,
        policy: policy.summary(),
        rules: d
            .trace
            .iter()
            .enumerate()
            .map(|(i, t)| RuleLine {
                index: i as u32 + 1,
                id: t.id.clone(),
                line: t.line as u32,
                outcome: match &t.outcome {
                    Outcome::NotApplicable => "NotApplicable",
                    Outcome::Applicable => "Applicable",
                    Outcome::Indeterminate(_) => "Indeterminate",
                }
                .into(),
                why: t.why.clone(),
                decides: t.decides,
            })
            .collect(),
        decision,
    }))
}
