use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::v1::guard_server::Guard;
use proto::v1::{
    step, AnswerRequest, BeginRequest, ConfirmReply, ConfirmRequest, DeleteReply, DeleteRequest,
    Deny, DenyReason, EnrollReply, EnrollRequest, ListReply, ListRequest, LoginContext, Permit,
    Prompt, Step, Token,
};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::audit::{self, Event};
use crate::caller::{authorize, Action, Caller};
use crate::config::Config;
use crate::otp::{self, TotpParams};
use crate::store::{Store, StoreError, TokenInfo, TokenState};

/// How long a user has to type the code after the prompt appears.
const SESSION_TTL: Duration = Duration::from_secs(300);
/// Open conversations at most; beyond this, Begin is refused until some finish or expire.
const MAX_SESSIONS: usize = 4096;
/// Longest accepted context field or label, in bytes.
const MAX_FIELD: usize = 256;

const PROMPT_TEXT: &str = "Verification code: ";
/// The same words for an unknown user and a user without a token: no user enumeration.
const NOT_ENROLLED_MESSAGE: &str =
    "Access denied: this login requires a one-time password and none is set up for the account.";
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
}

/// The `Guard` gRPC service. Until the policy engine lands the decision is fixed: a user with an
/// active token must give a code; anyone else is denied (fail closed).
pub struct GuardService {
    store: Arc<Store>,
    sessions: Mutex<HashMap<String, Session>>,
    admin_group: String,
    issuer: String,
    skew: u8,
    clock: Clock,
}

impl GuardService {
    pub fn new(store: Store, config: &Config, clock: Clock) -> Self {
        GuardService {
            store: Arc::new(store),
            sessions: Mutex::new(HashMap::new()),
            admin_group: config.admin_group.clone(),
            issuer: config.issuer(),
            skew: config.skew,
            clock,
        }
    }

    /// Runs blocking work (SQLite, NSS look-ups) off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|_| Status::internal("internal error; see the guardd log"))?
    }

    /// Checks the caller against the access table; refusals are audited.
    async fn authorize(
        &self,
        caller: Caller,
        action: Action,
        user: Option<String>,
        name: &'static str,
        self_service: impl FnOnce(&Store, &str) -> Result<bool, StoreError> + Send + 'static,
    ) -> Result<(), Status> {
        let group = self.admin_group.clone();
        let u = user.clone();
        let result = self
            .blocking(move |store| {
                let own = match &u {
                    Some(u) if caller.is_user(u) => self_service(store, u).map_err(store_status)?,
                    _ => false,
                };
                authorize(&caller, action, u.as_deref(), &group, own)
            })
            .await;
        if let Err(status) = &result {
            audit::record(
                &Event {
                    action: name,
                    user: user.as_deref().unwrap_or("*"),
                    outcome: "refused",
                    reason: status.message(),
                    ..Event::default()
                }
                .caller(&caller),
            );
        }
        result
    }

    fn open_session(&self, context: LoginContext, caller_uid: u32) -> Result<String, Status> {
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
            "begin",
            |_, _| Ok(false),
        )
        .await?;
        let user = ctx.user.clone();
        let enrolled = self
            .blocking(move |store| store.has_active(&user).map_err(store_status))
            .await?;
        let event = |outcome, reason| {
            audit::record(
                &Event {
                    action: "begin",
                    user: &ctx.user,
                    service: &ctx.service,
                    rhost: &ctx.rhost,
                    tty: &ctx.tty,
                    outcome,
                    reason,
                    ..Event::default()
                }
                .caller(&caller),
            )
        };
        if !enrolled {
            event("deny", "no active token");
            return Ok(Response::new(deny(
                NOT_ENROLLED_MESSAGE,
                DenyReason::NotEnrolled,
            )));
        }
        event("prompt", "otp required");
        let challenge = self.open_session(ctx.clone(), caller.uid)?;
        Ok(Response::new(Step {
            kind: Some(step::Kind::Prompt(Prompt {
                challenge,
                text: PROMPT_TEXT.into(),
                echo: false,
                info: String::new(),
            })),
        }))
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
        let ctx = session.context;
        let user = ctx.user.clone();
        let (skew, now) = (self.skew, self.clock.now());
        let accepted = self
            .blocking(move |store| {
                consume_code(store, &user, TokenState::Active, &response, now, skew)
                    .map_err(store_status)
            })
            .await?;
        let (outcome, reason, token) = match &accepted {
            Some(id) => ("permit", "otp verified", id.as_str()),
            None => ("deny", "wrong, expired or replayed code", ""),
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
        Ok(Response::new(match accepted {
            Some(_) => Step {
                kind: Some(step::Kind::Permit(Permit::default())),
            },
            None => deny(WRONG_CODE_MESSAGE, DenyReason::WrongCode),
        }))
    }

    async fn enroll(&self, req: Request<EnrollRequest>) -> Result<Response<EnrollReply>, Status> {
        let caller = Caller::of(&req)?;
        let EnrollRequest { user, label } = req.into_inner();
        validate_name("user", &user)?;
        validate_label(&label)?;
        // Self-service enrolment only while the user has no token at all: a user who has one
        // must not be able to add a second from a session that did not prove the first.
        self.authorize(
            caller,
            Action::Enroll,
            Some(user.clone()),
            "enroll",
            |s, u| Ok(s.list(Some(u))?.is_empty()),
        )
        .await?;
        let issuer = self.issuer.clone();
        let now = self.clock.now();
        let (info, uri) = self
            .blocking(move |store| {
                if !matches!(nix::unistd::User::from_name(&user), Ok(Some(_))) {
                    return Err(Status::not_found(format!(
                        "no such user: {user} (enroll only users the system knows)"
                    )));
                }
                let secret = otp::new_secret()
                    .map_err(|_| Status::internal("the system random source failed"))?;
                let params = TotpParams::default();
                let info = store
                    .add_pending(&user, &label, &secret, params, now as i64)
                    .map_err(store_status)?;
                let uri = otp::otpauth_uri(&issuer, &user, &secret, params);
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
        }))
    }

    async fn confirm(
        &self,
        req: Request<ConfirmRequest>,
    ) -> Result<Response<ConfirmReply>, Status> {
        let caller = Caller::of(&req)?;
        let ConfirmRequest { user, code } = req.into_inner();
        let code = Zeroizing::new(code);
        validate_name("user", &user)?;
        self.authorize(
            caller,
            Action::Enroll,
            Some(user.clone()),
            "confirm",
            |_, _| Ok(true),
        )
        .await?;
        let (skew, now) = (self.skew, self.clock.now());
        let u = user.clone();
        let confirmed = self
            .blocking(move |store| {
                let id = consume_code(store, &u, TokenState::Pending, &code, now, skew)
                    .map_err(store_status)?;
                match id {
                    Some(id) => Ok(Ok(store.get(&u, &id).map_err(store_status)?)),
                    None => Ok(Err(store
                        .secrets(&u, TokenState::Pending)
                        .map_err(store_status)?
                        .is_empty())),
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

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListReply>, Status> {
        let caller = Caller::of(&req)?;
        let user = Some(req.into_inner().user).filter(|u| !u.is_empty());
        if let Some(u) = &user {
            validate_name("user", u)?;
        }
        self.authorize(caller, Action::List, user.clone(), "list", |_, _| Ok(true))
            .await?;
        let tokens = self
            .blocking(move |store| store.list(user.as_deref()).map_err(store_status))
            .await?;
        Ok(Response::new(ListReply {
            tokens: tokens.into_iter().map(token_message).collect(),
        }))
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Result<Response<DeleteReply>, Status> {
        let caller = Caller::of(&req)?;
        let DeleteRequest { user, token_id } = req.into_inner();
        validate_name("user", &user)?;
        validate_name("token id", &token_id)?;
        // Users may withdraw their own unconfirmed enrolment, not an active token.
        let id = token_id.clone();
        self.authorize(
            caller,
            Action::Delete,
            Some(user.clone()),
            "delete",
            move |s, u| Ok(s.get(u, &id)?.is_some_and(|t| t.state == "pending")),
        )
        .await?;
        let (u, id) = (user.clone(), token_id.clone());
        let deleted = self
            .blocking(move |store| store.delete(&u, &id).map_err(store_status))
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
            )))
        }
    }
}

/// Verifies `code` against `user`'s tokens in `state` and, on a match, records the time step in
/// the same atomic update that makes it unusable again. Returns the id of the accepting token.
fn consume_code(
    store: &Store,
    user: &str,
    state: TokenState,
    code: &[u8],
    now: u64,
    skew: u8,
) -> Result<Option<String>, StoreError> {
    for token in store.secrets(user, state)? {
        match otp::verify_totp(&token.secret, token.params, code, now, skew) {
            Ok(Some(step)) => {
                if store.accept_step(&token.id, state, step, now as i64)? {
                    return Ok(Some(token.id));
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(token = token.id, "skipping unusable token: {e}"),
        }
    }
    Ok(None)
}

fn deny(message: &str, reason: DenyReason) -> Step {
    Step {
        kind: Some(step::Kind::Deny(Deny {
            message: message.into(),
            reason: reason.into(),
        })),
    }
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

/// Maps a store failure to a status without leaking internals beyond one clear line.
fn store_status(e: StoreError) -> Status {
    tracing::error!("{e}");
    match e {
        StoreError::Busy => Status::unavailable(e.to_string()),
        _ => Status::internal("the token database failed; see the guardd log"),
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
    ] {
        if value.len() > MAX_FIELD {
            return Err(Status::invalid_argument(format!("{name} is too long")));
        }
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

fn validate_label(label: &str) -> Result<(), Status> {
    if label.chars().count() > 64 || label.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "the label must be at most 64 characters without control characters",
        ));
    }
    Ok(())
}
