use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::v1::guard_server::Guard;
use proto::v1::{
    step, AnswerRequest, BackupCodesReply, BackupCodesRequest, BeginRequest, ConfirmReply,
    ConfirmRequest, DeleteReply, DeleteRequest, Deny, DenyReason, EnrollReply, EnrollRequest,
    ExplainReply, ExplainRequest, ListReply, ListRequest, LoginContext, Permit, Prompt, PromptKind,
    RecoverRequest, ReloadReply, ReloadRequest, ResyncRequest, RuleLine, SetEnabledRequest, Step,
    Token, TokenReply, UnlockReply, UnlockRequest,
};
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::audit::{self, Event};
use crate::backup;
use crate::caller::{authorize, Action, Caller};
use crate::config::Config;
use crate::lockout::Backoff;
use crate::otp::{self, HashAlg, Kind, OtpParams, Windows};
use crate::policy::{
    self as rules, Facts, LookupError, Outcome, Policy, PolicyError, Unenrolled, Verdict as Rule,
};
use crate::store::{NewToken, Store, StoreError, StoreThread, TokenInfo, TokenState};

mod admin;
mod explain;
mod recovery;

/// How long a user has to type the code after the prompt appears.
const SESSION_TTL: Duration = Duration::from_secs(300);
/// Open conversations at most; beyond this, Begin is refused until some finish or expire.
const MAX_SESSIONS: usize = 4096;
/// Longest accepted context field or label, in bytes.
const MAX_FIELD: usize = 256;

const PROMPT_TEXT: &str = "Verification code: ";
/// The same words for an unknown user and a user without a token: no user enumeration.
const NOT_ENROLLED_MESSAGE: &str = "Access denied: this login requires a one-time password and none is set up for the account; ask your administrator to enroll a token.";
/// Shown for a deny rule without a message, and for a decision that could not be made.
const POLICY_DENY_MESSAGE: &str = "Access denied by the site's rules.";
const WRONG_CODE_MESSAGE: &str = "Access denied: the code is wrong, expired or already used.";
const EXPIRED_MESSAGE: &str = "Access denied: the login took too long; please start again.";

/// Where the service reads the time (Unix seconds). The daemon always uses the system clock;
/// benchmarks that need many logins in one 30 s step link the library and bring their own.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    pub fn system() -> Clock {
        Clock(Arc::new(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        }))
    }

    pub fn from_fn(f: impl Fn() -> u64 + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(f))
    }

    pub fn now(&self) -> u64 {
        (self.0)()
    }
}

/// A login waiting for its answer.
struct Session {
    context: LoginContext,
    /// Only the process owner that began the conversation may answer it.
    caller_uid: u32,
    expires: Instant,
    /// Answers still allowed in this conversation, this one included.
    tries_left: u32,
    flow: Flow,
}

/// Which conversation a session belongs to, and where in it.
enum Flow {
    /// A login: the answer is an OTP.
    Login,
    /// Password recovery: the OTP, then the new password, then its confirmation.
    RecoverCode,
    RecoverNew,
    RecoverConfirm(Zeroizing<String>),
}

/// The `Guard` gRPC service: every login is decided by the rules in force (permit, deny, or an
/// OTP prompt), codes are verified against the store, and every call is audited.
pub struct GuardService {
    /// Every store call runs on this one thread; see `StoreThread`.
    store: StoreThread,
    /// The rules in force; replaced whole by a reload, never left half-loaded.
    policy: RwLock<Arc<Policy>>,
    /// Where reloads read the rules from.
    config: Config,
    /// This server's name for `host` rules (the daemon's own, not the client's word).
    host: String,
    sessions: Mutex<HashMap<String, Session>>,
    admin_group: String,
    issuer: String,
    windows: Windows,
    backoff: Backoff,
    /// Answers allowed per conversation before it ends in a deny.
    max_tries: u32,
    clock: Clock,
}

/// What the store thread made of an answer.
enum Checked {
    Done(Verdict),
    /// It may be a backup code: compare it with these (id, hash) pairs off the store thread,
    /// since Argon2 takes milliseconds that every other login would wait for.
    Backup(Zeroizing<String>, Vec<(i64, String)>),
}

/// The outcome of checking one answer.
enum Verdict {
    /// Refused unchecked: the user must wait this many seconds.
    Locked(i64),
    /// A token accepted the code.
    Otp(String),
    /// A backup code was used up.
    Backup,
    /// Nothing accepted it; the failure was counted.
    Wrong,
}

impl GuardService {
    pub fn new(store: StoreThread, config: &Config, policy: Policy, clock: Clock) -> Self {
        GuardService {
            store,
            policy: RwLock::new(Arc::new(policy)),
            config: config.clone(),
            host: config.host(),
            sessions: Mutex::new(HashMap::new()),
            admin_group: config.admin_group.clone(),
            issuer: config.issuer(),
            windows: Windows {
                skew: config.skew,
                look_ahead: config.hotp_look_ahead,
            },
            backoff: config.backoff(),
            max_tries: config.max_tries,
            clock,
        }
    }

    /// The rules in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the rules file. A file that does not load is refused and the rules in force stay.
    pub fn reload(&self) -> Result<Arc<Policy>, PolicyError> {
        match self.config.load_policy() {
            Ok(policy) => {
                let policy = Arc::new(policy);
                for w in policy.warnings() {
                    tracing::warn!("{w}");
                }
                tracing::info!(
                    policy = policy.digest(),
                    file = policy.file(),
                    "rules reloaded"
                );
                *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy.clone();
                Ok(policy)
            }
            Err(e) => {
                tracing::error!("rules not reloaded, the previous ones stay in force: {e}");
                Err(e)
            }
        }
    }

    /// Runs `f` on the store thread, in the next group commit.
    async fn store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        self.store.run(f).await
    }

    /// Checks the caller against the access table; refusals are audited.
    async fn authorize(
        &self,
        caller: Caller,
        action: Action,
        user: Option<String>,
        name: &'static str,
        self_service: impl FnOnce(&dyn Store, &str) -> Result<bool, StoreError> + Send + 'static,
    ) -> Result<(), Status> {
        if caller.is_root() {
            // Root may do everything (DESIGN §3): no look-up, no hop to a blocking thread.
            return Ok(());
        }
        let group = self.admin_group.clone();
        let u = user.clone();
        let result = async {
            // Whether the user may do this to their own tokens; it only counts if the caller
            // turns out to be that user.
            let own = match u.clone() {
                Some(u) => {
                    self.store(move |store| Ok(self_service(store, &u)?))
                        .await?
                }
                None => false,
            };
            system(move || authorize(&caller, action, u.as_deref(), &group, own)).await
        }
        .await;
        if let Err(status) = &result {
            audit::refused(
                &caller,
                name,
                user.as_deref().unwrap_or("*"),
                status.message(),
            );
        }
        result
    }

    /// Stores a conversation waiting for an answer under a fresh challenge id.
    fn open_session(
        &self,
        context: LoginContext,
        caller_uid: u32,
        tries_left: u32,
        flow: Flow,
    ) -> Result<String, Status> {
        let challenge =
            otp::random_hex(16).map_err(|_| Status::internal("the system random source failed"))?;
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, s| s.expires > now);
        }
        if sessions.len() >= MAX_SESSIONS {
            return Err(Status::resource_exhausted(
                "too many logins in progress; try again shortly",
            ));
        }
        sessions.insert(
            challenge.clone(),
            Session {
                context,
                caller_uid,
                expires: now + SESSION_TTL,
                tries_left,
                flow,
            },
        );
        Ok(challenge)
    }

    /// Removes and returns the live session for `challenge` if `caller_uid` began it.
    fn take_session(&self, challenge: &str, caller_uid: u32) -> Option<Session> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.get(challenge) {
            Some(s) if s.caller_uid == caller_uid => sessions
                .remove(challenge)
                .filter(|s| s.expires > Instant::now()),
            _ => None,
        }
    }
}

#[tonic::async_trait]
impl Guard for GuardService {
    async fn begin(&self, req: Request<BeginRequest>) -> Result<Response<Step>, Status> {
        let (caller, ctx) = self.login_request(req, "begin").await?;
        let (policy, decision, can_answer) = self.decide(&ctx).await?;
        let rule = decision.rule_label();
        let event = |outcome, reason: &str| {
            audit::record(
                &Event {
                    action: "begin",
                    user: &ctx.user,
                    service: &ctx.service,
                    rhost: &ctx.rhost,
                    tty: &ctx.tty,
                    outcome,
                    reason,
                    rule: &rule,
                    policy: policy.digest(),
                    ..Event::default()
                }
                .caller(&caller),
            )
        };
        let step = match decision.verdict {
            Rule::Permit => {
                event("permit", "rules permit without otp");
                Step {
                    kind: Some(step::Kind::Permit(Permit::default())),
                }
            }
            Rule::Deny { message } => {
                match &decision.indeterminate {
                    Some(cause) => event("deny", &format!("indeterminate: {cause}")),
                    None => event("deny", "rules deny"),
                }
                deny(
                    message.as_deref().unwrap_or(POLICY_DENY_MESSAGE),
                    DenyReason::Policy,
                )
            }
            Rule::Otp { .. } if can_answer => {
                event("prompt", "otp required");
                let challenge =
                    self.open_session(ctx.clone(), caller.uid, self.max_tries, Flow::Login)?;
                prompt(challenge, PROMPT_TEXT, String::new(), PromptKind::Code)
            }
            Rule::Otp {
                unenrolled: Unenrolled::Permit,
            } => {
                event("permit", "otp required only of enrolled users");
                Step {
                    kind: Some(step::Kind::Permit(Permit::default())),
                }
            }
            Rule::Otp {
                unenrolled: Unenrolled::Deny,
            } => {
                event("deny", "otp required and no active token");
                deny(NOT_ENROLLED_MESSAGE, DenyReason::NotEnrolled)
            }
        };
        Ok(Response::new(step))
    }

    async fn recover(&self, req: Request<RecoverRequest>) -> Result<Response<Step>, Status> {
        recovery::begin(self, req).await
    }

    async fn check(&self, req: Request<BeginRequest>) -> Result<Response<Step>, Status> {
        let (caller, ctx) = self.login_request(req, "check").await?;
        let (policy, decision, _) = self.decide(&ctx).await?;
        let Rule::Deny { message } = &decision.verdict else {
            return Ok(Response::new(Step {
                kind: Some(step::Kind::Permit(Permit::default())),
            }));
        };
        let reason = match &decision.indeterminate {
            Some(cause) => format!("indeterminate: {cause}"),
            None => "rules deny".into(),
        };
        audit::record(
            &Event {
                action: "check",
                user: &ctx.user,
                service: &ctx.service,
                rhost: &ctx.rhost,
                tty: &ctx.tty,
                outcome: "deny",
                reason: &reason,
                rule: &decision.rule_label(),
                policy: policy.digest(),
                ..Event::default()
            }
            .caller(&caller),
        );
        Ok(Response::new(deny(
            message.as_deref().unwrap_or(POLICY_DENY_MESSAGE),
            DenyReason::Policy,
        )))
    }

    async fn explain(
        &self,
        req: Request<ExplainRequest>,
    ) -> Result<Response<ExplainReply>, Status> {
        explain::explain(self, req).await
    }

    async fn reload(&self, req: Request<ReloadRequest>) -> Result<Response<ReloadReply>, Status> {
        let caller = Caller::of(&req)?;
        self.authorize(caller, Action::Admin, None, "reload", |_, _| Ok(false))
            .await?;
        let result = self.reload();
        admin_audit(&caller, "reload", "*", result.is_ok(), "");
        match result {
            Ok(policy) => Ok(Response::new(ReloadReply {
                digest: policy.digest().to_owned(),
                warnings: policy.warnings().to_vec(),
            })),
            Err(e) => Err(Status::failed_precondition(format!(
                "{e} (the previous rules stay in force)"
            ))),
        }
    }

    async fn answer(&self, req: Request<AnswerRequest>) -> Result<Response<Step>, Status> {
        let caller = Caller::of(&req)?;
        let AnswerRequest {
            challenge,
            response,
        } = req.into_inner();
        let response = Zeroizing::new(response);
        let Some(session) = self.take_session(&challenge, caller.uid) else {
            audit::record(
                &Event {
                    action: "answer",
                    outcome: "deny",
                    reason: "unknown or expired challenge",
                    ..Event::default()
                }
                .caller(&caller),
            );
            return Ok(Response::new(deny(EXPIRED_MESSAGE, DenyReason::Expired)));
        };
        let tries_left = session.tries_left;
        let flow = match session.flow {
            Flow::Login => Flow::Login,
            Flow::RecoverCode => Flow::RecoverCode,
            other => {
                return recovery::password(self, caller, session.context, other, response)
                    .await
                    .map(Response::new)
            }
        };
        let ctx = session.context;
        let verdict = self.check_answer(&ctx.user, response).await?;
        let (outcome, reason, token) = match &verdict {
            Verdict::Otp(id) => ("permit", "otp verified", id.as_str()),
            Verdict::Backup => ("permit", "backup code used", ""),
            Verdict::Locked(_) => ("deny", "locked after repeated failures", ""),
            Verdict::Wrong => ("deny", "wrong, expired or replayed code", ""),
        };
        audit::record(
            &Event {
                action: "answer",
                user: &ctx.user,
                service: &ctx.service,
                rhost: &ctx.rhost,
                tty: &ctx.tty,
                outcome,
                reason,
                token,
                ..Event::default()
            }
            .caller(&caller),
        );
        Ok(Response::new(match verdict {
            Verdict::Otp(_) | Verdict::Backup if matches!(flow, Flow::RecoverCode) => {
                let challenge = self.open_session(ctx, caller.uid, 1, Flow::RecoverNew)?;
                prompt(
                    challenge,
                    "New password: ",
                    String::new(),
                    PromptKind::NewPassword,
                )
            }
            Verdict::Otp(_) | Verdict::Backup => Step {
                kind: Some(step::Kind::Permit(Permit::default())),
            },
            Verdict::Locked(wait) => deny(
                &format!("Access denied: too many failed attempts; try again in {wait} s."),
                DenyReason::Locked,
            ),
            Verdict::Wrong if tries_left > 1 => {
                // Another try in the same conversation, under a new challenge id.
                let left = tries_left - 1;
                let challenge = self.open_session(ctx, caller.uid, left, flow)?;
                prompt(
                    challenge,
                    PROMPT_TEXT,
                    wrong_code_info(left),
                    PromptKind::Code,
                )
            }
            Verdict::Wrong if self.max_tries > 1 => {
                deny("Access denied: too many wrong codes.", DenyReason::MaxTries)
            }
            Verdict::Wrong => deny(WRONG_CODE_MESSAGE, DenyReason::WrongCode),
        }))
    }

    async fn enroll(&self, req: Request<EnrollRequest>) -> Result<Response<EnrollReply>, Status> {
        admin::enroll(self, req).await
    }

    async fn confirm(
        &self,
        req: Request<ConfirmRequest>,
    ) -> Result<Response<ConfirmReply>, Status> {
        admin::confirm(self, req).await
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListReply>, Status> {
        admin::list(self, req).await
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Result<Response<DeleteReply>, Status> {
        admin::delete(self, req).await
    }

    async fn set_enabled(
        &self,
        req: Request<SetEnabledRequest>,
    ) -> Result<Response<TokenReply>, Status> {
        admin::set_enabled(self, req).await
    }

    async fn resync(&self, req: Request<ResyncRequest>) -> Result<Response<TokenReply>, Status> {
        admin::resync(self, req).await
    }

    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<UnlockReply>, Status> {
        admin::unlock(self, req).await
    }

    async fn issue_backup_codes(
        &self,
        req: Request<BackupCodesRequest>,
    ) -> Result<Response<BackupCodesReply>, Status> {
        admin::issue_backup_codes(self, req).await
    }
}

/// The facts a decision may need, gathered before it is made (the rules themselves never
/// block): from the store whether the user has an active token, and through NSS the user's
/// groups, looked up only once a rule asks for them.
struct LoginFacts {
    enrolled: bool,
    /// An active token or backup codes: the user can answer a prompt.
    can_answer: bool,
    groups: Option<Result<Vec<String>, LookupError>>,
    /// Set when a rule asked for groups not looked up yet.
    wanted_groups: Cell<bool>,
}

impl Facts for LoginFacts {
    fn groups(&self) -> Result<Vec<String>, LookupError> {
        match &self.groups {
            Some(groups) => groups.clone(),
            None => {
                self.wanted_groups.set(true);
                Err(LookupError("groups not looked up yet".into()))
            }
        }
    }

    fn enrolled(&self) -> Result<bool, LookupError> {
        Ok(self.enrolled)
    }
}

/// Runs blocking system work (NSS look-ups, chpasswd, Argon2) on tokio's blocking threads.
async fn system<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Status::internal("internal error; see the guardd log"))?
}

/// Primary and supplementary group names of `user` (none for an unknown user).
fn user_groups(user: &str) -> Result<Vec<String>, LookupError> {
    use nix::unistd::{getgrouplist, Group, User};
    let lookup = |e: nix::Error| LookupError(format!("NSS look-up failed: {e}"));
    let Some(u) = User::from_name(user).map_err(lookup)? else {
        return Ok(Vec::new());
    };
    let name = std::ffi::CString::new(user).map_err(|_| LookupError("bad user name".into()))?;
    let mut names = Vec::new();
    for gid in getgrouplist(&name, u.gid).map_err(lookup)? {
        if let Some(g) = Group::from_gid(gid).map_err(lookup)? {
            if !names.contains(&g.name) {
                names.push(g.name);
            }
        }
    }
    Ok(names)
}

impl GuardService {
    /// The caller and the validated login context of a Begin or Check, if the caller may act
    /// for that user (root, or the user themself).
    async fn login_request(
        &self,
        req: Request<BeginRequest>,
        action: &'static str,
    ) -> Result<(Caller, LoginContext), Status> {
        let caller = Caller::of(&req)?;
        let ctx = req
            .into_inner()
            .context
            .ok_or_else(|| Status::invalid_argument("the login context is missing"))?;
        validate_context(&ctx)?;
        self.authorize(
            caller,
            Action::Login,
            Some(ctx.user.clone()),
            action,
            |_, _| Ok(false),
        )
        .await?;
        Ok((caller, ctx))
    }

    /// Decides a login by the rules in force. Also tells whether the user could answer an OTP
    /// prompt (an active token or backup codes), which only an `otp` verdict needs.
    async fn decide(
        &self,
        ctx: &LoginContext,
    ) -> Result<(Arc<Policy>, rules::Decision, bool), Status> {
        let policy = self.policy();
        let request = self.rules_request(ctx, self.clock.now() as i64);
        let mut facts = self.facts(&ctx.user).await?;
        let mut decision = policy.evaluate(&request, &facts, false);
        if facts.wanted_groups.get() {
            // A rule asked for the groups: look them up (NSS may be slow) and decide again.
            let user = ctx.user.clone();
            facts.groups = Some(system(move || Ok(user_groups(&user))).await?);
            decision = policy.evaluate(&request, &facts, false);
        }
        Ok((policy, decision, facts.can_answer))
    }

    /// What the store knows about `user` for a decision, read in one call.
    async fn facts(&self, user: &str) -> Result<LoginFacts, Status> {
        let u = user.to_owned();
        let (enrolled, can_answer) = self
            .store(move |store| {
                let active = store.has_active(&u)?;
                Ok((active, active || !store.backup_codes(&u)?.is_empty()))
            })
            .await?;
        Ok(LoginFacts {
            enrolled,
            can_answer,
            groups: None,
            wanted_groups: Cell::new(false),
        })
    }

    /// Checks one answer for `user` (see `check_code`); a backup code is compared on a blocking
    /// thread and then used up, unless a lockout began meanwhile.
    async fn check_answer(
        &self,
        user: &str,
        response: Zeroizing<Vec<u8>>,
    ) -> Result<Verdict, Status> {
        let (windows, backoff, now) = (self.windows, self.backoff, self.clock.now());
        let u = user.to_owned();
        let checked = self
            .store(move |store| Ok(check_code(store, &u, &response, now, windows, &backoff)?))
            .await?;
        let (code, hashes) = match checked {
            Checked::Done(verdict) => return Ok(verdict),
            Checked::Backup(code, hashes) => (code, hashes),
        };
        let matched = system(move || {
            Ok(hashes
                .into_iter()
                .find(|(_, hash)| backup::matches(&code, hash))
                .map(|(id, _)| id))
        })
        .await?;
        let u = user.to_owned();
        self.store(move |store| {
            if let Some(wait) = store.lockout(&u)?.remaining(now as i64) {
                return Ok(Verdict::Locked(wait));
            }
            if let Some(id) = matched {
                if store.use_backup_code(id)? {
                    store.clear_failures(&u)?;
                    return Ok(Verdict::Backup);
                }
            }
            store.record_failure(&u, &backoff, now as i64)?;
            Ok(Verdict::Wrong)
        })
        .await
    }

    /// The request the rules see for a login context. The host is this daemon's own name.
    fn rules_request(&self, ctx: &LoginContext, time: i64) -> rules::Request {
        let present = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
        rules::Request {
            user: ctx.user.clone(),
            service: ctx.service.clone(),
            host: self.host.clone(),
            rhost: present(&ctx.rhost),
            tty: present(&ctx.tty),
            command: present(&ctx.command),
            time,
        }
    }
}

/// The audit line of an administrative call.
fn admin_audit(caller: &Caller, action: &str, user: &str, ok: bool, token: &str) {
    audit::record(
        &Event {
            action,
            user,
            outcome: if ok { "ok" } else { "refused" },
            token,
            ..Event::default()
        }
        .caller(caller),
    );
}

/// The store thread's part of checking an answer: refused unchecked while the user is locked
/// out; else a token code; else, if it looks like one, a backup code to compare; else a failure,
/// counted. An accepted code is used up in the same batch that answers.
fn check_code(
    store: &dyn Store,
    user: &str,
    response: &[u8],
    now: u64,
    windows: Windows,
    backoff: &Backoff,
) -> Result<Checked, StoreError> {
    let lockout = store.lockout(user)?;
    if let Some(wait) = lockout.remaining(now as i64) {
        return Ok(Checked::Done(Verdict::Locked(wait)));
    }
    if let Some(id) = consume_code(store, user, TokenState::Active, response, now, windows)? {
        // A success resets the failure count; with none recorded there is nothing to write.
        if lockout.failures > 0 {
            store.clear_failures(user)?;
        }
        return Ok(Checked::Done(Verdict::Otp(id)));
    }
    if let Some(code) = backup::normalize(response) {
        let hashes = store.backup_codes(user)?;
        if !hashes.is_empty() {
            return Ok(Checked::Backup(code, hashes));
        }
    }
    store.record_failure(user, backoff, now as i64)?;
    Ok(Checked::Done(Verdict::Wrong))
}

/// Verifies `code` against `user`'s tokens in `state` and, on a match, records the step or
/// counter in the same atomic update that makes it unusable again. Returns the accepting token.
fn consume_code(
    store: &dyn Store,
    user: &str,
    state: TokenState,
    code: &[u8],
    now: u64,
    windows: Windows,
) -> Result<Option<String>, StoreError> {
    for token in store.secrets(user, state)? {
        match otp::verify(&token.secret, token.counter, code, now, windows) {
            Ok(Some(accepted)) => {
                if store.accept(
                    &token.id,
                    state,
                    accepted.counter,
                    accepted.drift,
                    now as i64,
                )? {
                    return Ok(Some(token.id));
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(token = token.id, "skipping unusable token: {e}"),
        }
    }
    Ok(None)
}

fn prompt(challenge: String, text: &str, info: String, kind: PromptKind) -> Step {
    Step {
        kind: Some(step::Kind::Prompt(Prompt {
            challenge,
            text: text.into(),
            echo: false,
            info,
            kind: kind.into(),
        })),
    }
}

fn wrong_code_info(left: u32) -> String {
    format!(
        "Wrong code, {left} {} left.",
        if left == 1 { "try" } else { "tries" }
    )
}

fn deny(message: &str, reason: DenyReason) -> Step {
    Step {
        kind: Some(step::Kind::Deny(Deny {
            message: message.into(),
            reason: reason.into(),
        })),
    }
}

/// A store failure as a status: one clear line, the details only in the log.
impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        tracing::error!("{e}");
        match e {
            StoreError::Busy => Status::unavailable(e.to_string()),
            StoreError::Overloaded => Status::resource_exhausted(e.to_string()),
            _ => Status::internal("the token database failed; see the guardd log"),
        }
    }
}

fn validate_context(ctx: &LoginContext) -> Result<(), Status> {
    validate_name("user", &ctx.user)?;
    for (name, value) in [
        ("service", &ctx.service),
        ("rhost", &ctx.rhost),
        ("ruser", &ctx.ruser),
        ("tty", &ctx.tty),
        ("host", &ctx.host),
        ("ssh_connection", &ctx.ssh_connection),
    ] {
        if value.len() > MAX_FIELD {
            return Err(Status::invalid_argument(format!("{name} is too long")));
        }
    }
    if ctx.command.len() > 4096 {
        return Err(Status::invalid_argument("command is too long"));
    }
    Ok(())
}

/// A user name or id: non-empty, bounded, no control characters.
fn validate_name(what: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() || value.len() > MAX_FIELD || value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{what} must be 1 to {MAX_FIELD} bytes without control characters"
        )));
    }
    Ok(())
}
