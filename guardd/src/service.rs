use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use proto::v1::guard_server::Guard;
use proto::v1::{
    step, AnswerRequest, BackupCodesReply, BackupCodesRequest, BeginRequest, ConfirmReply,
    ConfirmRequest, DeleteReply, DeleteRequest, Deny, DenyReason, EnrollReply, EnrollRequest,
    ExplainReply, ExplainRequest, ForgetReply, ForgetRequest, ListReply, ListRequest, LoginContext,
    OpenSessionReply, Permit, Prompt, PromptKind, RecoverRequest, ReloadReply, ReloadRequest,
    ResyncRequest, SetEnabledRequest, StatusReply, StatusRequest, Step, TokenReply, UnlockReply,
    UnlockRequest,
};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::accounts::{Account, Accounts, System};
use crate::audit::{self, Event};
use crate::backup::{self, Hasher};
use crate::budget::{Budget, Holding, Limits};
use crate::caller::{authorize, Action, Caller};
use crate::config::Config;
use crate::lockout::Backoff;
use crate::otp::{self, Windows};
use crate::policy::{
    self as rules, Facts, LookupError, Policy, PolicyError, Unenrolled, Verdict as Rule,
};
use crate::store::{LoginRecord, Runner, Store, StoreError, TokenState};

mod admin;
mod error;
mod explain;
mod recovery;
mod reuse;
mod status;
pub use error::ServiceError;
pub use status::Snapshot;
#[cfg(test)]
mod tests;

/// How long a user has to type the code after the prompt appears, in seconds.
const SESSION_TTL: u64 = 300;
/// Open conversations: per caller (an unprivileged uid, or the user behind and the user targeted
/// by a root caller), for unprivileged callers together, and in all; the rest is root's reserve.
const SESSIONS: Limits = Limits {
    per_key: 64,
    shared: 2048,
    total: 4096,
};
/// Blocking work (NSS look-ups, chpasswd, the password check) in flight, on tokio's blocking
/// pool.
const BLOCKING: Limits = Limits {
    per_key: 8,
    shared: 32,
    total: 64,
};
/// How long an account look-up is reused, and how many names are kept at most.
const ACCOUNT_TTL: std::time::Duration = std::time::Duration::from_secs(1);
const ACCOUNT_CACHE: usize = 4096;
/// Password checks running (each runs the site's PAM stack in a child process): one per caller,
/// so a user who knows their own password (a right one never locks) cannot keep several of
/// root's CPUs busy with checks.
const PASSWORD_CHECKS: Limits = Limits {
    per_key: 1,
    shared: 2,
    total: 4,
};
/// Argon2 hashes queued or running (one thread computes them; see `backup::Hasher`).
const HASHING: Limits = Limits {
    per_key: 1,
    shared: 3,
    total: 4,
};
/// Longest accepted context field or label, in bytes.
const MAX_FIELD: usize = 256;

const PROMPT_TEXT: &str = "Verification code: ";
/// The same words for an unknown user and a user without a token: no user enumeration.
const NOT_ENROLLED_MESSAGE: &str = "Access denied: this login requires a one-time password and none is set up for the account; ask your administrator to enroll a token.";
/// Shown for a deny rule without a message, and for a decision that could not be made.
const POLICY_DENY_MESSAGE: &str = "Access denied by the site's rules.";
const WRONG_CODE_MESSAGE: &str = "Access denied: the code is wrong, expired or already used.";
const EXPIRED_MESSAGE: &str = "Access denied: the login took too long; please start again.";
/// For a name whose records belong to another uid (an account deleted and a new one made with
/// the same name): never treated as unenrolled. The admin's fix is in the audit line.
const FOREIGN_MESSAGE: &str = "Access denied: this account's one-time-password records belong to an earlier account of the same name; ask your administrator.";

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
    /// Unix time (by the service's `Clock`) after which the answer is refused.
    expires: u64,
    /// Answers still allowed in this conversation, this one included.
    tries_left: u32,
    flow: Flow,
    /// The uid the user's account had when the conversation began.
    uid: Option<u32>,
    /// Its place in the sessions budget, given back when the conversation ends.
    holding: Holding,
}

/// The conversations waiting for an answer, by challenge id.
#[derive(Default)]
struct Sessions {
    open: HashMap<String, Session>,
    /// When expired sessions were last swept out.
    swept: u64,
}

/// Which conversation a session belongs to, and where in it.
enum Flow {
    /// A login: the answer is an OTP, which may leave reuse grants behind (root callers, rules
    /// with `reuse`).
    Login(Option<Box<reuse::Proving>>),
    /// Password recovery: the OTP, then the new password, then its confirmation.
    RecoverCode,
    RecoverNew,
    RecoverConfirm(Zeroizing<String>),
}

/// The `Guard` gRPC service: every login is decided by the rules in force (permit, deny, or an
/// OTP prompt), codes are verified against the store, and every call is audited.
pub struct GuardService {
    /// Where store calls run: the SQLite store's thread or the PostgreSQL pool.
    store: Runner,
    /// The rules in force; replaced whole by a reload, never left half-loaded.
    policy: RwLock<Arc<Policy>>,
    /// Where reloads read the rules from.
    config: Config,
    /// This server's name for `host` rules (the daemon's own, not the client's word).
    host: String,
    /// `ssh_services`, compiled once: they are matched on every login's Begin.
    ssh_services: Vec<wildmatch::WildMatch>,
    sessions: Mutex<Sessions>,
    /// Budgets of the shared resources a call can hold (see `budget`).
    session_budget: Arc<Budget>,
    blocking_budget: Arc<Budget>,
    hashing_budget: Arc<Budget>,
    password_budget: Arc<Budget>,
    /// The one thread that computes Argon2 hashes.
    hasher: Hasher,
    /// NSS, the password state and check, chpasswd.
    accounts: Arc<dyn Accounts>,
    /// Recent account look-ups by name (see `account`).
    account_cache: Mutex<HashMap<String, (Option<Account>, std::time::Instant)>>,
    account_ttl: std::time::Duration,
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
    /// The failure is already counted (before the slow compare), so a burst of guesses gets
    /// no more compares than the free failures.
    Backup(Zeroizing<String>, Vec<(i64, String)>),
}

/// The outcome of checking one answer.
enum Verdict {
    /// Refused unchecked: the user must wait this many seconds.
    Locked(i64),
    /// Refused unchecked: the records are an earlier account's (the uid they belong to).
    Foreign(u32),
    /// A token accepted the code.
    Otp(String),
    /// A backup code was used up.
    Backup,
    /// Nothing accepted it; the failure was counted.
    Wrong,
}

impl GuardService {
    pub fn new(
        store: Runner,
        hasher: Hasher,
        config: &Config,
        policy: Policy,
        clock: Clock,
    ) -> Self {
        GuardService {
            store,
            policy: RwLock::new(Arc::new(policy)),
            config: config.clone(),
            host: config.host(),
            ssh_services: config
                .ssh_services
                .iter()
                .map(|s| wildmatch::WildMatch::new(s))
                .collect(),
            sessions: Mutex::default(),
            session_budget: Budget::new("logins in progress", SESSIONS),
            blocking_budget: Budget::new("system look-ups", BLOCKING),
            hashing_budget: Budget::new("backup-code checks", HASHING),
            password_budget: Budget::new("password checks", PASSWORD_CHECKS),
            hasher,
            accounts: Arc::new(System {
                password_service: config.password_service.clone(),
            }),
            account_cache: Mutex::default(),
            account_ttl: ACCOUNT_TTL,
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

    /// The same service over another view of the system's accounts (tests use a fake
    /// directory: case-insensitive names, reused names, passwords).
    /// Such a directory's changes are seen at once (no reuse of answers).
    pub fn with_accounts(mut self, accounts: Arc<dyn Accounts>) -> Self {
        self.accounts = accounts;
        self.account_ttl = std::time::Duration::ZERO;
        self
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
                crate::metrics::policy_loaded(false, Ok(()));
                Ok(policy)
            }
            Err(e) => {
                tracing::error!("rules not reloaded, the previous ones stay in force: {e}");
                crate::metrics::policy_loaded(false, Err(e.to_string()));
                Err(e)
            }
        }
    }

    /// Runs `f` as one atomic store call.
    async fn store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, ServiceError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        self.store.run(f).await
    }

    /// Checks the caller against the access table (docs/architecture.md#callers); refusals are
    /// audited.
    async fn authorize(
        &self,
        caller: &Caller,
        action: Action,
        user: Option<String>,
        name: &'static str,
        self_service: impl FnOnce(&dyn Store, &str) -> Result<bool, StoreError> + Send + 'static,
    ) -> Result<(), ServiceError> {
        if caller.is_root() {
            // Root may do everything (docs/architecture.md#callers): no look-up, no hop to a
            // blocking thread.
            return Ok(());
        }
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
            let is_self = match u.as_deref() {
                Some(name) => self
                    .account(caller, name)
                    .await?
                    .is_some_and(|a| a.uid == caller.uid),
                None => false,
            };
            let admin = action != Action::Login && self.is_admin(caller).await?;
            authorize(caller, action, is_self, admin, own).map_err(ServiceError::from)
        }
        .await;
        if let Err(e) = &result {
            audit::refused(caller, name, user.as_deref().unwrap_or("*"), &e.to_string());
        }
        result
    }

    /// Runs blocking system work (NSS look-ups, chpasswd, the password check) on tokio's
    /// blocking threads, within `caller`'s share of them. The work is short and bounded, so it
    /// is counted by who runs it (a uid, the user behind a root caller), not by target user.
    /// The place is held by the work itself: a call cut short (guardd's time limit) cannot end
    /// a blocking thread, so its place stays taken until the thread is done.
    async fn blocking<T: Send + 'static>(
        &self,
        caller: &Caller,
        f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        let holding = self
            .blocking_budget
            .acquire(caller.budget_keys(None), caller.is_root())
            .map_err(ServiceError::from)?;
        tokio::task::spawn_blocking(move || {
            let _holding = holding;
            f()
        })
        .await
        .map_err(|_| Status::internal("internal error; see the guardd log"))?
    }

    /// Compares a backup code with `hashes` on the hasher thread, within `caller`'s share.
    async fn find_backup_code(
        &self,
        caller: &Caller,
        user: &str,
        code: Zeroizing<String>,
        hashes: Vec<(i64, String)>,
    ) -> Result<Option<i64>, ServiceError> {
        let holding = self
            .hashing_budget
            .acquire(caller.budget_keys(Some(user)), caller.is_root())
            .map_err(ServiceError::from)?;
        // Held by the hasher's job until it is done, even if this call is cut short first.
        self.hasher
            .find(code, hashes, Box::new(holding))
            .await
            .map_err(ServiceError::from)
    }

    /// Stores a conversation waiting for an answer under a fresh challenge id. `holding` carries
    /// the place of a conversation that goes on (a retry, the next stage of recovery); a new
    /// one takes a place in `caller`'s share of the sessions budget.
    fn open_conversation(
        &self,
        context: LoginContext,
        caller: &Caller,
        tries_left: u32,
        flow: Flow,
        uid: Option<u32>,
        holding: Option<Holding>,
    ) -> Result<String, ServiceError> {
        let now = self.clock.now();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if now > sessions.swept {
            // At most once a second: expired conversations give their places back.
            sessions.open.retain(|_, s| s.expires > now);
            sessions.swept = now;
        }
        let holding = match holding {
            Some(holding) => holding,
            None => self
                .session_budget
                .acquire(
                    caller.login_keys(&context.user, &context.rhost),
                    caller.is_root(),
                )
                .map_err(ServiceError::from)?,
        };
        let challenge =
            otp::random_hex(16).map_err(|_| Status::internal("the system random source failed"))?;
        sessions.open.insert(
            challenge.clone(),
            Session {
                context,
                caller_uid: caller.uid,
                expires: now + SESSION_TTL,
                tries_left,
                flow,
                uid,
                holding,
            },
        );
        Ok(challenge)
    }

    /// Removes and returns the live session for `challenge` if `caller_uid` began it.
    fn take_session(&self, challenge: &str, caller_uid: u32) -> Option<Session> {
        let now = self.clock.now();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.open.get(challenge) {
            Some(s) if s.caller_uid == caller_uid => {
                sessions.open.remove(challenge).filter(|s| s.expires > now)
            }
            _ => None,
        }
    }
}

#[tonic::async_trait]
impl Guard for GuardService {
    async fn begin(&self, req: Request<BeginRequest>) -> Result<Response<Step>, Status> {
        edge(async move {
            let (caller, ctx, account) = self.login_request(req, "begin").await?;
            let uid = account.as_ref().map(|a| a.uid);
            let (policy, decision, facts) = self.decide(&caller, &ctx, account.as_ref()).await?;
            let record = facts.record();
            let can_answer = record.can_answer;
            let rule = decision.rule_label();
            let event_login = |outcome, reason: &str, login: &str| {
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
                        login,
                        ..Event::default()
                    }
                    .caller(&caller),
                )
            };
            let event = |outcome, reason: &str| event_login(outcome, reason, "");
            let step = match decision.verdict {
                // The records of another account: not a permit, not "unenrolled", whatever the
                // rules say about this login (a deny stays a deny).
                Rule::Permit | Rule::Otp { .. } if record.foreign.is_some() => {
                    event("deny", &foreign_reason(record.foreign, &ctx.user, uid));
                    deny(FOREIGN_MESSAGE, DenyReason::Policy)
                }
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
                    let proving = match self
                        .reuse_or_prove(&caller, &ctx, uid, &decision, &facts.ssh_keys)
                        .await?
                    {
                        reuse::Reused::Granted(proof) => {
                            event_login("permit", "reuse", &proof);
                            return Ok(Response::new(Step {
                                kind: Some(step::Kind::Permit(Permit::default())),
                            }));
                        }
                        reuse::Reused::Prove(proving) => proving,
                    };
                    // sshd's auth info (up to 16 KiB) has served: the keys are in `proving`. A
                    // waiting conversation keeps only what its answer needs, so open prompts
                    // cannot hold 16 KiB each.
                    let waiting = LoginContext {
                        ssh_auth_info: String::new(),
                        ..ctx.clone()
                    };
                    let opened = self.open_conversation(
                        waiting,
                        &caller,
                        self.max_tries,
                        Flow::Login(proving),
                        uid,
                        None,
                    );
                    let challenge = match opened {
                        Ok(challenge) => challenge,
                        Err(e) => {
                            event("refused", &e.to_string());
                            return Err(e);
                        }
                    };
                    event("prompt", "otp required");
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
        })
        .await
    }

    async fn recover(&self, req: Request<RecoverRequest>) -> Result<Response<Step>, Status> {
        edge(async move { recovery::begin(self, req).await }).await
    }

    async fn check(&self, req: Request<BeginRequest>) -> Result<Response<Step>, Status> {
        edge(async move {
            let (caller, ctx, account) = self.login_request(req, "check").await?;
            let (policy, decision, _) = self.decide(&caller, &ctx, account.as_ref()).await?;
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
        })
        .await
    }

    async fn explain(
        &self,
        req: Request<ExplainRequest>,
    ) -> Result<Response<ExplainReply>, Status> {
        edge(async move { explain::explain(self, req).await }).await
    }

    async fn reload(&self, req: Request<ReloadRequest>) -> Result<Response<ReloadReply>, Status> {
        edge(async move {
            let caller = Caller::of(&req)?;
            self.authorize(&caller, Action::Admin, None, "reload", |_, _| Ok(false))
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
                ))
                .into()),
            }
        })
        .await
    }

    async fn answer(&self, req: Request<AnswerRequest>) -> Result<Response<Step>, Status> {
        edge(async move {
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
            let holding = session.holding;
            let uid = session.uid;
            let flow = match session.flow {
                flow @ (Flow::Login(_) | Flow::RecoverCode) => flow,
                other => {
                    return recovery::password(
                        self,
                        caller,
                        session.context,
                        other,
                        response,
                        uid,
                        holding,
                    )
                    .await
                    .map(Response::new)
                }
            };
            let ctx = session.context;
            let verdict = self.check_answer(&caller, &ctx.user, uid, response).await?;
            let foreign;
            let (outcome, reason, token) = match &verdict {
                Verdict::Otp(id) => ("permit", "otp verified", id.as_str()),
                Verdict::Backup => ("permit", "backup code used", ""),
                Verdict::Locked(_) => ("deny", "locked after repeated failures", ""),
                Verdict::Foreign(other) => {
                    foreign = foreign_reason(Some(*other), &ctx.user, uid);
                    ("deny", foreign.as_str(), "")
                }
                Verdict::Wrong => ("deny", "wrong, expired or replayed code", ""),
            };
            // A proven OTP leaves the grants its rules ask for; after a wrong code the next try
            // of the same conversation still may.
            let verified = matches!(verdict, Verdict::Otp(_) | Verdict::Backup);
            let (proof, flow) = match flow {
                Flow::Login(Some(proving)) if verified => (
                    self.make_grants(&caller, &ctx.user, uid, *proving).await,
                    Flow::Login(None),
                ),
                flow => (None, flow),
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
                    login: proof.as_deref().unwrap_or_default(),
                    ..Event::default()
                }
                .caller(&caller),
            );
            Ok(Response::new(match verdict {
                Verdict::Otp(_) | Verdict::Backup if matches!(flow, Flow::RecoverCode) => {
                    let challenge = self.open_conversation(
                        ctx,
                        &caller,
                        1,
                        Flow::RecoverNew,
                        uid,
                        Some(holding),
                    )?;
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
                Verdict::Foreign(_) => deny(FOREIGN_MESSAGE, DenyReason::Policy),
                Verdict::Wrong if tries_left > 1 => {
                    // Another try in the same conversation, under a new challenge id.
                    let left = tries_left - 1;
                    let challenge =
                        self.open_conversation(ctx, &caller, left, flow, uid, Some(holding))?;
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
        })
        .await
    }

    async fn open_session(
        &self,
        req: Request<BeginRequest>,
    ) -> Result<Response<OpenSessionReply>, Status> {
        edge(async move { reuse::open_session(self, req).await }).await
    }

    async fn forget(&self, req: Request<ForgetRequest>) -> Result<Response<ForgetReply>, Status> {
        edge(async move { reuse::forget(self, req).await }).await
    }

    async fn enroll(&self, req: Request<EnrollRequest>) -> Result<Response<EnrollReply>, Status> {
        edge(async move { admin::enroll(self, req).await }).await
    }

    async fn confirm(
        &self,
        req: Request<ConfirmRequest>,
    ) -> Result<Response<ConfirmReply>, Status> {
        edge(async move { admin::confirm(self, req).await }).await
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListReply>, Status> {
        edge(async move { admin::list(self, req).await }).await
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Result<Response<DeleteReply>, Status> {
        edge(async move { admin::delete(self, req).await }).await
    }

    async fn set_enabled(
        &self,
        req: Request<SetEnabledRequest>,
    ) -> Result<Response<TokenReply>, Status> {
        edge(async move { admin::set_enabled(self, req).await }).await
    }

    async fn resync(&self, req: Request<ResyncRequest>) -> Result<Response<TokenReply>, Status> {
        edge(async move { admin::resync(self, req).await }).await
    }

    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<UnlockReply>, Status> {
        edge(async move { admin::unlock(self, req).await }).await
    }

    async fn issue_backup_codes(
        &self,
        req: Request<BackupCodesRequest>,
    ) -> Result<Response<BackupCodesReply>, Status> {
        edge(async move { admin::issue_backup_codes(self, req).await }).await
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        edge(async move { status::status(self, req).await }).await
    }
}

/// The facts a decision may need, gathered before it is made (the rules themselves never
/// block): from the store whether the user has an active token, and through NSS the user's
/// groups, looked up only once a rule asks for them.
#[derive(Default)]
struct LoginFacts {
    /// What the store knows about the user, once read.
    stored: Option<LoginRecord>,
    /// Set when a rule asked for a stored fact not read yet.
    wanted_stored: Cell<bool>,
    groups: Option<Result<Vec<String>, LookupError>>,
    /// Set when a rule asked for groups not looked up yet.
    wanted_groups: Cell<bool>,
    /// The keys sshd says authenticated the login (see `ssh_keys`), parsed once per decision.
    ssh_keys: Vec<String>,
}

impl LoginFacts {
    /// The stored facts, or none held (no token, no foreign records) while the store was not
    /// read: only a deny, or a permit while the store is unreachable, leaves it unread.
    fn record(&self) -> LoginRecord {
        self.stored.unwrap_or_default()
    }
}

impl Facts for LoginFacts {
    fn groups(&self) -> Result<Vec<String>, LookupError> {
        match &self.groups {
            Some(groups) => groups.clone(),
            None => {
                self.wanted_groups.set(true);
                Err(LookupError::NotYet("groups"))
            }
        }
    }

    fn enrolled(&self) -> Result<bool, LookupError> {
        match &self.stored {
            Some(record) => Ok(record.active),
            None => {
                self.wanted_stored.set(true);
                Err(LookupError::NotYet("the token store"))
            }
        }
    }
}

/// The audit reason of a refusal for records that belong to another uid, with the fix.
fn foreign_reason(foreign: Option<u32>, user: &str, uid: Option<u32>) -> String {
    let recorded = match foreign {
        Some(u32::MAX) | None => "an unknown uid".to_owned(),
        Some(other) => format!("uid {other}"),
    };
    let now = uid.map_or_else(|| "no account".to_owned(), |u| format!("uid {u}"));
    format!(
        "records of {user} belong to {recorded} but the name now has {now}: check the account, then `guardctl delete` its tokens, `guardctl unlock` and reissue backup codes"
    )
}

impl GuardService {
    /// The caller and the validated login context of a Begin or Check, if the caller may act
    /// for that user (root, or the user themself).
    ///
    /// The user becomes the account's canonical name (NSS), so that a differently-cased name
    /// under a case-insensitive directory is the same user to the rules and the store.
    async fn login_request(
        &self,
        req: Request<BeginRequest>,
        action: &'static str,
    ) -> Result<(Caller, LoginContext, Option<Account>), ServiceError> {
        let caller = Caller::of(&req)?;
        let mut ctx = req
            .into_inner()
            .context
            .ok_or_else(|| Status::invalid_argument("the login context is missing"))?;
        validate_context(&ctx)?;
        self.authorize(
            &caller,
            Action::Login,
            Some(ctx.user.clone()),
            action,
            |_, _| Ok(false),
        )
        .await?;
        let account = self.account(&caller, &ctx.user).await?;
        if let Some(a) = &account {
            ctx.user = a.name.clone();
        }
        Ok((caller, ctx, account))
    }

    /// Whether `caller` is root or its uid's account is in the admin group by NSS (the account's
    /// primary and supplementary groups): the connecting process's gid does not count, so a
    /// setgid program or `setpriv --regid` makes no administrator.
    async fn is_admin(&self, caller: &Caller) -> Result<bool, ServiceError> {
        if caller.is_root() {
            return Ok(true);
        }
        let (accounts, group, uid) = (self.accounts.clone(), self.admin_group.clone(), caller.uid);
        self.blocking(caller, move || {
            Ok(matches!(accounts.by_uid(uid), Ok(Some(account))
                if accounts.groups(&account).is_ok_and(|g| g.contains(&group))))
        })
        .await
    }

    /// The account called `name`, by NSS (on the blocking pool, within the caller's budget).
    /// An answer is reused for `ACCOUNT_TTL`: a login storm costs one look-up per user and
    /// second, not a hop to the blocking pool per call; a renamed or re-created account is seen
    /// within that second.
    async fn account(&self, caller: &Caller, name: &str) -> Result<Option<Account>, ServiceError> {
        let now = std::time::Instant::now();
        if let Some((account, at)) = self
            .account_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            if now.duration_since(*at) < self.account_ttl {
                return Ok(account.clone());
            }
        }
        let (accounts, n) = (self.accounts.clone(), name.to_owned());
        let account = self
            .blocking(caller, move || {
                accounts
                    .by_name(&n)
                    .map_err(|e| {
                        tracing::error!("{e}");
                        Status::unavailable("the account look-up failed; see the guardd log")
                    })
                    .map_err(ServiceError::from)
            })
            .await?;
        let mut cache = self.account_cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= ACCOUNT_CACHE {
            // Names sprayed by a caller cannot grow it: start over.
            cache.clear();
        }
        cache.insert(name.to_owned(), (account.clone(), now));
        Ok(account)
    }

    /// Decides a login by the rules in force. Also tells whether the user could answer an OTP
    /// prompt (an active token or backup codes), which only an `otp` verdict needs.
    async fn decide(
        &self,
        caller: &Caller,
        ctx: &LoginContext,
        account: Option<&Account>,
    ) -> Result<(Arc<Policy>, rules::Decision, LoginFacts), ServiceError> {
        let policy = self.policy();
        let ssh_keys = self.ssh_keys(caller, ctx);
        let request = self.rules_request(ctx, self.clock.now() as i64, ssh_keys.clone());
        let uid = account.map(|a| a.uid);
        // Facts are fetched only when a rule asks for them, so rules that need none (a deny, a
        // break-glass permit) are decided while the store or NSS is down.
        let mut facts = LoginFacts {
            ssh_keys,
            ..LoginFacts::default()
        };
        let mut decision = policy.evaluate(&request, &facts, false);
        loop {
            if facts.wanted_stored.get() && facts.stored.is_none() {
                facts.stored = Some(self.stored_facts(&ctx.user, uid).await?);
            } else if facts.wanted_groups.get() && facts.groups.is_none() {
                // NSS may be slow: looked up only for a rule that asks.
                facts.groups = Some(self.groups(caller, account).await?);
            } else {
                break;
            }
            decision = policy.evaluate(&request, &facts, false);
        }
        let permit = matches!(decision.verdict, Rule::Permit);
        if facts.stored.is_none() && !matches!(decision.verdict, Rule::Deny { .. }) {
            // A permit or a prompt still needs the records: whose they are, what can answer.
            match self.stored_facts(&ctx.user, uid).await {
                Ok(record) => facts.stored = Some(record),
                Err(ServiceError::Store(StoreError::Unavailable(_))) if permit => {
                    audit::warn_limited(
                        "permit-without-store",
                        "the token store is unreachable; logins permitted by rules that need no stored fact go on",
                    );
                }
                Err(status) => return Err(status),
            }
        }
        Ok((policy, decision, facts))
    }

    /// The groups of `account` by NSS (none for an unknown user).
    async fn groups(
        &self,
        caller: &Caller,
        account: Option<&Account>,
    ) -> Result<Result<Vec<String>, LookupError>, ServiceError> {
        let Some(account) = account.cloned() else {
            return Ok(Ok(Vec::new()));
        };
        let accounts = self.accounts.clone();
        self.blocking(caller, move || Ok(accounts.groups(&account)))
            .await
    }

    /// What the store knows about `user` for a decision, read in one call.
    async fn stored_facts(
        &self,
        user: &str,
        uid: Option<u32>,
    ) -> Result<LoginRecord, ServiceError> {
        let (u, host) = (user.to_owned(), self.host.clone());
        self.store(move |store| Ok(store.login_record(&u, &host, uid)?))
            .await
    }

    /// Checks one answer for `user` (see `check_code`); a backup code is compared on a blocking
    /// thread and then used up, unless a lockout began meanwhile.
    async fn check_answer(
        &self,
        caller: &Caller,
        user: &str,
        uid: Option<u32>,
        response: Zeroizing<Vec<u8>>,
    ) -> Result<Verdict, ServiceError> {
        let (windows, backoff, now) = (self.windows, self.backoff, self.clock.now());
        let (u, host) = (user.to_owned(), self.host.clone());
        let checked = self
            .store(move |store| {
                let who = Who {
                    user: &u,
                    host: &host,
                    uid,
                };
                Ok(check_code(store, who, &response, now, windows, &backoff)?)
            })
            .await?;
        let (code, hashes) = match checked {
            Checked::Done(verdict) => return Ok(verdict),
            Checked::Backup(code, hashes) => (code, hashes),
        };
        let compared = hashes.clone();
        let Some(id) = self.find_backup_code(caller, user, code, hashes).await? else {
            return Ok(Verdict::Wrong);
        };
        let Some((_, hash)) = compared.into_iter().find(|(i, _)| *i == id) else {
            return Ok(Verdict::Wrong);
        };
        let u = user.to_owned();
        self.store(move |store| {
            // The failure counted before the compare is forgiven with the rest: a backup code
            // is a second factor like a token's code. Used once, also by two racing logins, and
            // only if it was not reissued meanwhile.
            if store.use_backup_code(id, &hash)? {
                store.clear_failures(&u)?;
                return Ok(Verdict::Backup);
            }
            Ok(Verdict::Wrong)
        })
        .await
    }

    /// The request the rules see for a login context. The host is this daemon's own name.
    fn rules_request(
        &self,
        ctx: &LoginContext,
        time: i64,
        ssh_keys: Vec<String>,
    ) -> rules::Request {
        let present = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
        rules::Request {
            user: ctx.user.clone(),
            service: ctx.service.clone(),
            host: self.host.clone(),
            rhost: present(&ctx.rhost),
            tty: present(&ctx.tty),
            command: present(&ctx.command),
            ssh_keys,
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
    who: Who<'_>,
    response: &[u8],
    now: u64,
    windows: Windows,
    backoff: &Backoff,
) -> Result<Checked, StoreError> {
    let Who { user, host, uid } = who;
    if let Some(other) = store.foreign_uid(user, host, uid)? {
        return Ok(Checked::Done(Verdict::Foreign(other)));
    }
    // Checks of this user on other hosts wait from here to the end of this call.
    let lockout = store.lock_attempts(user)?;
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
    // Counted now, before any slow compare: a burst of guesses stops at the free failures.
    count_failure(store, user, uid, backoff, now as i64)?;
    if let Some(code) = backup::normalize(response) {
        let hashes = store.backup_codes(user)?;
        if !hashes.is_empty() {
            return Ok(Checked::Backup(code, hashes));
        }
    }
    Ok(Checked::Done(Verdict::Wrong))
}

/// Counts a failed proof (a code, an invitation, a password) of `user`. A back-off that starts
/// ends the user's reuse grants: whoever is guessing gets no shortcut either.
fn count_failure(
    store: &dyn Store,
    user: &str,
    uid: Option<u32>,
    backoff: &Backoff,
    now: i64,
) -> Result<(), StoreError> {
    if store.record_failure(user, uid, backoff, now)?.until > now {
        store.forget(user)?;
    }
    Ok(())
}

/// Whose answer a store call checks: the name, this host, and the uid the name has here.
#[derive(Clone, Copy)]
struct Who<'a> {
    user: &'a str,
    host: &'a str,
    uid: Option<u32>,
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

/// The edge of every call: what went wrong is logged once and becomes the caller's status.
async fn edge<T>(
    call: impl std::future::Future<Output = Result<T, ServiceError>>,
) -> Result<T, Status> {
    call.await.map_err(ServiceError::into_status)
}

/// Checks a login context's fields before anything else sees them (public for the fuzz targets).
pub fn validate_context(ctx: &LoginContext) -> Result<(), Status> {
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
    if ctx.ssh_auth_info.len() > crate::ssh_auth::MAX_AUTH_INFO {
        return Err(Status::invalid_argument("ssh_auth_info is too long"));
    }
    Ok(())
}

/// A user name or id: non-empty, bounded, no control characters.
pub fn validate_name(what: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() || value.len() > MAX_FIELD || value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{what} must be 1 to {MAX_FIELD} bytes without control characters"
        )));
    }
    Ok(())
}
