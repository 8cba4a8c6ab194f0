use pam::constants::PamResultCode;
use proto::v1::{step, DenyReason, LoginContext, Step};
use zeroize::Zeroizing;

use crate::options::{FailMode, FirstPass, Options};
use crate::wire::{self, WireError};

/// The PAM service guardd runs its own password checks under; the module steps aside there.
const PASSWORD_SERVICE: &str = "soffid-otp";

/// The most steps one login may take; a daemon that never ends the conversation is cut off.
const MAX_STEPS: usize = 16;

/// PAM items the module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    Service,
    RHost,
    RUser,
    Tty,
}

/// How a conversation message is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Ask with the input hidden (codes).
    EchoOff,
    /// Ask with the input shown.
    EchoOn,
    /// Show information.
    Info,
    /// Show an error.
    Error,
}

/// What the module needs from libpam; the FFI layer implements it over the real handle and
/// tests implement it with a script.
pub trait PamHandle {
    /// The user being authenticated (PAM_USER, asking the application if unset).
    fn user(&mut self) -> Result<String, PamResultCode>;
    /// A PAM item, or None when unset.
    fn item(&self, item: Item) -> Option<String>;
    /// PAM_AUTHTOK as set by an earlier module in the stack, if any.
    fn authtok(&self) -> Option<Zeroizing<Vec<u8>>>;
    /// A variable of the PAM environment (e.g. SSH_CONNECTION set by sshd).
    fn env(&self, name: &str) -> Option<String>;
    /// Sends one message through the application's conversation function; prompts return the
    /// user's reply.
    fn converse(
        &self,
        style: Style,
        text: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, PamResultCode>;
}

/// Why guardd gave no decision. Only [`DaemonError::Absent`] lets `failmode=safe` step aside:
/// everything else fails closed in every failmode (docs/architecture.md#failure-modes).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No guardd was running when the conversation started: its socket does not exist or
    /// nobody listens on it (connect(2): ENOENT or ECONNREFUSED), found before Begin was sent.
    #[error("guardd is not running ({0})")]
    Absent(String),
    /// guardd is there but did not answer in time: connecting, the handshake, or a call.
    #[error("guardd did not answer within {0:?}")]
    TimedOut(std::time::Duration),
    /// guardd is there but failing: overloaded (RESOURCE_EXHAUSTED; also EAGAIN on connect, a
    /// full listen backlog), any other error status, a broken connection or protocol, a failed
    /// reconnect, or gone in the middle of a conversation.
    #[error("guardd failed: {0}")]
    Failed(String),
    /// guardd refused the request itself: an answer, not an outage.
    #[error("guardd refused the request: {0}")]
    Refused(String),
}

impl From<WireError> for DaemonError {
    /// What the module's client met: only connect(2) finding no guardd is `Absent`; a gRPC
    /// status that is guardd refusing the request is `Refused`; every other answer of a running
    /// guardd (overloaded, unavailable, internal, ...) is `Failed`, never a reason to step aside.
    fn from(e: WireError) -> Self {
        match e {
            WireError::Absent { .. } => DaemonError::Absent(e.to_string()),
            WireError::TimedOut(timeout) => DaemonError::TimedOut(timeout),
            WireError::Status {
                code: wire::PERMISSION_DENIED | wire::INVALID_ARGUMENT | wire::UNAUTHENTICATED,
                message,
            } => DaemonError::Refused(message),
            other => DaemonError::Failed(other.to_string()),
        }
    }
}

impl DaemonError {
    /// The same error met once connected: guardd was there when the conversation started, so a
    /// daemon that is gone now failed; it is never a reason to step aside.
    fn connected(self) -> DaemonError {
        match self {
            DaemonError::Absent(why) => DaemonError::Failed(format!("guardd went away: {why}")),
            other => other,
        }
    }

    /// Refusals are PAM_AUTH_ERR. An absent daemon is PAM_IGNORE (the rest of the stack
    /// decides) under failmode=safe; every other failure is PAM_AUTHINFO_UNAVAIL (the login is
    /// refused) in every failmode.
    fn pam_code(&self, failmode: FailMode) -> PamResultCode {
        match (self, failmode) {
            (DaemonError::Refused(_), _) => PamResultCode::PAM_AUTH_ERR,
            (DaemonError::Absent(_), FailMode::Safe) => PamResultCode::PAM_IGNORE,
            _ => PamResultCode::PAM_AUTHINFO_UNAVAIL,
        }
    }
}

/// The daemon side of the conversation.
pub trait Daemon {
    fn begin(&mut self, context: LoginContext) -> Result<Step, DaemonError>;
    fn answer(
        &mut self,
        challenge: String,
        response: Zeroizing<Vec<u8>>,
    ) -> Result<Step, DaemonError>;
    /// Whether the rules refuse this user on this service outright (account stage).
    fn check(&mut self, context: LoginContext) -> Result<Step, DaemonError>;
    /// The session stage: guardd binds this login's reuse grants to its login session.
    fn open_session(&mut self, context: LoginContext) -> Result<u32, DaemonError>;
}

/// Who is logging in, from libpam. Err is the PAM code to return without asking guardd.
fn login_context<H: PamHandle>(
    pamh: &mut H,
    host: &str,
    options: &Options,
) -> Result<LoginContext, PamResultCode> {
    // guardd checks passwords (before self-enrolment) through this PAM service: asking guardd
    // from inside that check would call back into it.
    if pamh.item(Item::Service).as_deref() == Some(PASSWORD_SERVICE) {
        return Err(PamResultCode::PAM_IGNORE);
    }
    let user = match pamh.user() {
        Ok(user) if !user.is_empty() => user,
        Ok(_) => return Err(PamResultCode::PAM_USER_UNKNOWN),
        Err(code) => return Err(code),
    };
    if options.ignore_unknown_user && unknown_to_the_system(nix::unistd::User::from_name(&user)) {
        debug(
            options,
            &format!("user={user}: unknown to the system, ignored"),
        );
        return Err(PamResultCode::PAM_IGNORE);
    }
    Ok(LoginContext {
        user,
        service: pamh.item(Item::Service).unwrap_or_default(),
        rhost: pamh.item(Item::RHost).unwrap_or_default(),
        ruser: pamh.item(Item::RUser).unwrap_or_default(),
        tty: pamh.item(Item::Tty).unwrap_or_default(),
        host: host.to_owned(),
        ssh_connection: pamh.env("SSH_CONNECTION").unwrap_or_default(),
        command: pamh.env("SUDO_COMMAND").unwrap_or_default(),
        // What sshd says authenticated the connection; guardd parses it (and believes it only
        // from sshd). One that is too long is left out, which names no key.
        ssh_auth_info: pamh
            .env("SSH_AUTH_INFO_0")
            .filter(|i| i.len() <= proto::MAX_SSH_AUTH_INFO)
            .unwrap_or_default(),
    })
}

/// Whether an NSS look-up found that the user does not exist. A look-up that failed (a
/// directory that is down, no descriptor left in the host process, whose limits the user may
/// have lowered before running a setuid program) says nothing about the user: the module asks
/// guardd as usual rather than stepping aside, or `ignore_unknown_user` would skip the OTP
/// whenever NSS can be made to fail.
fn unknown_to_the_system(lookup: nix::Result<Option<nix::unistd::User>>) -> bool {
    matches!(lookup, Ok(None))
}

fn debug(options: &Options, message: &str) {
    if options.debug {
        crate::log::info(message);
    }
}

/// Logs a daemon failure (loudly when failing open) and maps it to a PAM code.
fn daemon_failure(who: &str, e: &DaemonError, options: &Options) -> PamResultCode {
    let code = e.pam_code(options.failmode);
    match code {
        PamResultCode::PAM_IGNORE => crate::log::error(&format!(
            "{who}: {e}; failmode=safe: NOT asking for an OTP, the rest of the stack decides"
        )),
        PamResultCode::PAM_AUTH_ERR => crate::log::error(&format!("{who}: {e}")),
        _ => crate::log::error(&format!("{who}: {e}; refusing the login")),
    }
    code
}

/// Runs one authentication: tells guardd who logs in, relays its prompts, and maps its verdict
/// to a PAM code. `connect` is called only once the login context is known. With `silent`
/// (PAM_SILENT), informational and error messages are not shown; prompts still are.
pub fn authenticate<H, D>(
    pamh: &mut H,
    host: &str,
    silent: bool,
    options: &Options,
    connect: impl FnOnce() -> Result<D, DaemonError>,
) -> PamResultCode
where
    H: PamHandle,
    D: Daemon,
{
    let context = match login_context(pamh, host, options) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let who = format!("user={} service={}", context.user, context.service);
    debug(options, &format!("{who}: asking guardd"));
    // Only connect() may find guardd absent; from Begin on, every failure fails closed.
    let result = connect().and_then(|mut daemon| {
        let step = daemon.begin(context).map_err(DaemonError::connected)?;
        Ok(converse(pamh, &mut daemon, step, silent, options))
    });
    let code = match result {
        Ok(code) => code,
        Err(e) => daemon_failure(&who, &e, options),
    };
    debug(options, &format!("{who}: {code:?}"));
    code
}

/// The account stage: refuses a user whom the rules deny on this service outright, so a deny
/// rule also holds for logins that never reach the auth stack (public-key-only ssh).
pub fn account<H, D>(
    pamh: &mut H,
    host: &str,
    silent: bool,
    options: &Options,
    connect: impl FnOnce() -> Result<D, DaemonError>,
) -> PamResultCode
where
    H: PamHandle,
    D: Daemon,
{
    let context = match login_context(pamh, host, options) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let who = format!("user={} service={}", context.user, context.service);
    let checked =
        connect().and_then(|mut daemon| daemon.check(context).map_err(DaemonError::connected));
    match checked {
        Ok(Step {
            kind: Some(step::Kind::Deny(deny)),
        }) => {
            show(pamh, Style::Error, &deny.message, silent);
            PamResultCode::PAM_PERM_DENIED
        }
        Ok(_) => PamResultCode::PAM_SUCCESS,
        Err(e) => match daemon_failure(&who, &e, options) {
            PamResultCode::PAM_IGNORE => PamResultCode::PAM_IGNORE,
            _ => PamResultCode::PAM_PERM_DENIED,
        },
    }
}

/// The session stage of an ssh login (the module in sshd's `session` stack, after
/// pam_loginuid): tells guardd that this login's session is open, so the reuse grants its OTP
/// made are bound to it (guardd reads the session from /proc, never from here). Never fails
/// the session: a login whose grants are not bound is only asked for a code again later. A
/// stack without SSH_CONNECTION (sudo, su, cron) has nothing to bind and costs no call.
pub fn open_session<H, D>(
    pamh: &mut H,
    host: &str,
    options: &Options,
    connect: impl FnOnce() -> Result<D, DaemonError>,
) -> PamResultCode
where
    H: PamHandle,
    D: Daemon,
{
    if pamh.env("SSH_CONNECTION").is_none_or(|c| c.is_empty()) {
        return PamResultCode::PAM_IGNORE;
    }
    let context = match login_context(pamh, host, options) {
        Ok(c) => c,
        Err(_) => return PamResultCode::PAM_IGNORE,
    };
    let who = format!("user={} service={}", context.user, context.service);
    match connect().and_then(|mut daemon| daemon.open_session(context)) {
        Ok(bound) => {
            debug(
                options,
                &format!("{who}: session open, {bound} grant(s) bound"),
            );
            PamResultCode::PAM_SUCCESS
        }
        Err(e) => {
            crate::log::error(&format!("{who}: session: {e}; reuse grants not bound"));
            PamResultCode::PAM_IGNORE
        }
    }
}

/// Follows the daemon's steps until a verdict.
fn converse<H: PamHandle, D: Daemon>(
    pamh: &H,
    daemon: &mut D,
    mut step: Step,
    silent: bool,
    options: &Options,
) -> PamResultCode {
    // use_first_pass / try_first_pass: the first prompt takes PAM_AUTHTOK from an earlier module.
    let mut stacked = match options.first_pass {
        FirstPass::Ask => None,
        FirstPass::Use | FirstPass::Try => pamh.authtok(),
    };
    for _ in 0..MAX_STEPS {
        match step.kind {
            Some(step::Kind::Permit(permit)) => {
                show(pamh, Style::Info, &permit.message, silent);
                return PamResultCode::PAM_SUCCESS;
            }
            Some(step::Kind::Deny(deny)) => {
                show(pamh, Style::Error, &deny.message, silent);
                return if deny.reason == DenyReason::MaxTries as i32 {
                    PamResultCode::PAM_MAXTRIES
                } else {
                    PamResultCode::PAM_AUTH_ERR
                };
            }
            Some(step::Kind::Prompt(prompt)) => {
                let response = if let Some(token) = stacked.take() {
                    token
                } else if options.first_pass == FirstPass::Use {
                    // use_first_pass never prompts: no stacked token, or it was wrong.
                    return PamResultCode::PAM_AUTH_ERR;
                } else {
                    show(pamh, Style::Info, &prompt.info, silent);
                    let style = if prompt.echo {
                        Style::EchoOn
                    } else {
                        Style::EchoOff
                    };
                    let text = options.prompt.as_deref().unwrap_or(&prompt.text);
                    match pamh.converse(style, text) {
                        Ok(Some(response)) => response,
                        Ok(None) => return PamResultCode::PAM_CONV_ERR,
                        Err(code) => return code,
                    }
                };
                step = match daemon.answer(prompt.challenge, response) {
                    Ok(next) => next,
                    Err(e) => return daemon_failure("answer", &e.connected(), options),
                };
            }
            None => {
                crate::log::error("guardd sent an empty step; refusing the login");
                return PamResultCode::PAM_AUTHINFO_UNAVAIL;
            }
        }
    }
    crate::log::error("guardd did not finish the conversation; refusing the login");
    PamResultCode::PAM_AUTHINFO_UNAVAIL
}

fn show<H: PamHandle>(pamh: &H, style: Style, text: &str, silent: bool) {
    if !silent && !text.is_empty() {
        // A display failure must not change the verdict.
        let _ = pamh.converse(style, text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::{Deny, Permit, Prompt};
    use std::cell::RefCell;
    use std::collections::VecDeque;

    /// A PAM handle whose user answers prompts from a script and records what was shown.
    #[derive(Default)]
    struct FakePam {
        user: Option<String>,
        authtok: Option<&'static str>,
        answers: Script,
        shown: RefCell<Vec<(Style, String)>>,
    }

    /// The user's scripted answers, in order. Dropping a script with answers left fails the
    /// test: a test whose answers are never asked for does not check what it says.
    #[derive(Default)]
    struct Script(RefCell<VecDeque<Result<Option<&'static str>, PamResultCode>>>);

    impl Drop for Script {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                let left = self.0.get_mut();
                assert!(
                    left.is_empty(),
                    "scripted answers never asked for: {left:?}"
                );
            }
        }
    }

    impl PamHandle for FakePam {
        fn user(&mut self) -> Result<String, PamResultCode> {
            self.user.clone().ok_or(PamResultCode::PAM_USER_UNKNOWN)
        }
        fn item(&self, item: Item) -> Option<String> {
            match item {
                Item::Service => Some("sshd".into()),
                Item::RHost => Some("192.0.2.7".into()),
                Item::Tty => Some("ssh".into()),
                Item::RUser => None,
            }
        }
        fn authtok(&self) -> Option<Zeroizing<Vec<u8>>> {
            self.authtok.map(|t| Zeroizing::new(t.as_bytes().to_vec()))
        }
        fn env(&self, name: &str) -> Option<String> {
            (name == "SSH_CONNECTION").then(|| "192.0.2.7 5555 192.0.2.1 22".into())
        }
        fn converse(
            &self,
            style: Style,
            text: &str,
        ) -> Result<Option<Zeroizing<Vec<u8>>>, PamResultCode> {
            self.shown.borrow_mut().push((style, text.to_owned()));
            match style {
                Style::EchoOff | Style::EchoOn => self
                    .answers
                    .0
                    .borrow_mut()
                    .pop_front()
                    .unwrap_or(Ok(None))
                    .map(|a| a.map(|a| Zeroizing::new(a.as_bytes().to_vec()))),
                _ => Ok(None),
            }
        }
    }

    /// A daemon that replays scripted steps and records what it received.
    #[derive(Default)]
    struct FakeDaemon {
        steps: VecDeque<Result<Step, DaemonError>>,
        begun: Vec<LoginContext>,
        answers: Vec<(String, Vec<u8>)>,
    }

    impl Daemon for &mut FakeDaemon {
        fn begin(&mut self, context: LoginContext) -> Result<Step, DaemonError> {
            self.begun.push(context);
            self.steps.pop_front().expect("unexpected begin")
        }
        fn answer(&mut self, c: String, r: Zeroizing<Vec<u8>>) -> Result<Step, DaemonError> {
            self.answers.push((c, r.to_vec()));
            self.steps.pop_front().expect("unexpected answer")
        }
        fn check(&mut self, context: LoginContext) -> Result<Step, DaemonError> {
            self.begun.push(context);
            self.steps.pop_front().expect("unexpected check")
        }
        fn open_session(&mut self, context: LoginContext) -> Result<u32, DaemonError> {
            self.begun.push(context);
            Ok(1)
        }
    }

    fn prompt(challenge: &str) -> Step {
        Step {
            kind: Some(step::Kind::Prompt(Prompt {
                challenge: challenge.into(),
                text: "Verification code: ".into(),
                echo: false,
                info: String::new(),
                kind: 0,
            })),
        }
    }
    fn permit() -> Step {
        Step {
            kind: Some(step::Kind::Permit(Permit::default())),
        }
    }
    fn deny(msg: &str) -> Step {
        Step {
            kind: Some(step::Kind::Deny(Deny {
                message: msg.into(),
                reason: 0,
            })),
        }
    }

    fn pam(answers: Vec<Result<Option<&'static str>, PamResultCode>>) -> FakePam {
        FakePam {
            user: Some("ann".into()),
            answers: Script(RefCell::new(answers.into())),
            ..FakePam::default()
        }
    }

    fn run(pamh: &mut FakePam, daemon: &mut FakeDaemon, silent: bool) -> PamResultCode {
        run_with(pamh, daemon, silent, &Options::default())
    }

    fn run_with(
        pamh: &mut FakePam,
        daemon: &mut FakeDaemon,
        silent: bool,
        options: &Options,
    ) -> PamResultCode {
        authenticate(pamh, "srv1", silent, options, || Ok(daemon))
    }

    fn options(args: &[&str]) -> Options {
        Options::parse(args).0
    }

    fn deny_with(reason: DenyReason) -> Step {
        Step {
            kind: Some(step::Kind::Deny(Deny {
                message: "no".into(),
                reason: reason as i32,
            })),
        }
    }

    #[test]
    fn only_a_look_up_that_found_nothing_makes_a_user_unknown() {
        assert!(unknown_to_the_system(Ok(None)));
        assert!(!unknown_to_the_system(Err(nix::errno::Errno::EMFILE)));
        assert!(!unknown_to_the_system(Err(nix::errno::Errno::EIO)));
        let root = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(0));
        assert!(!unknown_to_the_system(root));
    }

    #[test]
    fn prompt_then_permit_succeeds_and_relays_context_and_code() {
        let mut p = pam(vec![Ok(Some("123456"))]);
        let mut d = FakeDaemon {
            steps: vec![Ok(prompt("c1")), Ok(permit())].into(),
            ..FakeDaemon::default()
        };
        assert_eq!(run(&mut p, &mut d, false), PamResultCode::PAM_SUCCESS);
        let ctx = &d.begun[0];
        assert_eq!(
            (
                &*ctx.user,
                &*ctx.service,
                &*ctx.rhost,
                &*ctx.tty,
                &*ctx.host
            ),
            ("ann", "sshd", "192.0.2.7", "ssh", "srv1")
        );
        assert_eq!(d.answers, vec![("c1".to_string(), b"123456".to_vec())]);
        assert_eq!(p.shown.borrow()[0].0, Style::EchoOff);
    }

    #[test]
    fn deny_fails_and_shows_the_message_unless_silent() {
        for silent in [false, true] {
            let mut p = pam(vec![Ok(Some("000000"))]);
            let mut d = FakeDaemon {
                steps: vec![Ok(prompt("c")), Ok(deny("wrong code"))].into(),
                ..FakeDaemon::default()
            };
            assert_eq!(run(&mut p, &mut d, silent), PamResultCode::PAM_AUTH_ERR);
            let shown_error = p
                .shown
                .borrow()
                .iter()
                .any(|(s, t)| *s == Style::Error && t == "wrong code");
            assert_eq!(shown_error, !silent);
        }
    }

    #[test]
    fn absent_daemon_is_authinfo_unavail_and_refusal_is_auth_err() {
        let mut p = pam(vec![]);
        let absent = || Err::<&mut FakeDaemon, _>(DaemonError::Absent("no socket".into()));
        let code = authenticate(&mut p, "h", false, &Options::default(), absent);
        assert_eq!(code, PamResultCode::PAM_AUTHINFO_UNAVAIL);
        let code = authenticate(&mut p, "h", false, &options(&["failmode=secure"]), absent);
        assert_eq!(code, PamResultCode::PAM_AUTHINFO_UNAVAIL);
        let code = authenticate(&mut p, "h", false, &options(&["failmode=safe"]), absent);
        assert_eq!(code, PamResultCode::PAM_IGNORE);
        let mut d = FakeDaemon {
            steps: vec![Err(DaemonError::from(status(wire::PERMISSION_DENIED)))].into(),
            ..FakeDaemon::default()
        };
        assert_eq!(run(&mut p, &mut d, false), PamResultCode::PAM_AUTH_ERR);
        let mut d = FakeDaemon {
            steps: vec![
                Ok(prompt("c")),
                Err(DaemonError::TimedOut(Default::default())),
            ]
            .into(),
            ..FakeDaemon::default()
        };
        let mut p = pam(vec![Ok(Some("1"))]);
        assert_eq!(
            run(&mut p, &mut d, false),
            PamResultCode::PAM_AUTHINFO_UNAVAIL
        );
    }

    #[test]
    fn conversation_failures_fail_the_login() {
        let mut p = pam(vec![Ok(None)]);
        let mut d = FakeDaemon {
            steps: vec![Ok(prompt("c"))].into(),
            ..FakeDaemon::default()
        };
        assert_eq!(run(&mut p, &mut d, false), PamResultCode::PAM_CONV_ERR);
        let mut p = pam(vec![Err(PamResultCode::PAM_CONV_ERR)]);
        let mut d = FakeDaemon {
            steps: vec![Ok(prompt("c"))].into(),
            ..FakeDaemon::default()
        };
        assert_eq!(run(&mut p, &mut d, false), PamResultCode::PAM_CONV_ERR);
        assert!(d.answers.is_empty());
    }

    #[test]
    fn an_empty_step_is_cut_off() {
        let mut p = pam(vec![]);
        let mut d = FakeDaemon {
            steps: vec![Ok(Step { kind: None })].into(),
            ..FakeDaemon::default()
        };
        assert_eq!(
            run(&mut p, &mut d, false),
            PamResultCode::PAM_AUTHINFO_UNAVAIL
        );
    }

    #[test]
    fn an_endless_conversation_is_cut_off_after_max_steps() {
        let mut p = pam((0..MAX_STEPS).map(|_| Ok(Some("1"))).collect());
        let mut d = FakeDaemon {
            steps: (0..=MAX_STEPS)
                .map(|i| Ok(prompt(&i.to_string())))
                .collect(),
            ..FakeDaemon::default()
        };
        assert_eq!(
            run(&mut p, &mut d, false),
            PamResultCode::PAM_AUTHINFO_UNAVAIL
        );
        assert_eq!(d.answers.len(), MAX_STEPS);
    }

    #[test]
    fn missing_user_is_user_unknown_and_never_contacts_the_daemon() {
        let mut p = FakePam::default();
        let code = authenticate(
            &mut p,
            "h",
            false,
            &Options::default(),
            || -> Result<&mut FakeDaemon, _> { panic!("must not connect") },
        );
        assert_eq!(code, PamResultCode::PAM_USER_UNKNOWN);
    }

    #[test]
    fn sends_ssh_connection_and_overrides_the_prompt_text() {
        let mut p = pam(vec![Ok(Some("1"))]);
        let mut d = FakeDaemon {
            steps: vec![Ok(prompt("c")), Ok(permit())].into(),
            ..FakeDaemon::default()
        };
        let o = options(&["prompt=Token: "]);
        assert_eq!(
            run_with(&mut p, &mut d, false, &o),
            PamResultCode::PAM_SUCCESS
        );
        assert_eq!(d.begun[0].ssh_connection, "192.0.2.7 5555 192.0.2.1 22");
        assert_eq!(p.shown.borrow()[0], (Style::EchoOff, "Token: ".to_string()));
    }

    #[test]
    fn wrong_codes_reprompt_with_the_daemon_info_then_maxtries() {
        let mut p = pam(vec![Ok(Some("1")), Ok(Some("2"))]);
        let mut retry = prompt("c2");
        if let Some(step::Kind::Prompt(pr)) = &mut retry.kind {
            pr.info = "Wrong code, 1 try left.".into();
        }
        let mut d = FakeDaemon {
            steps: vec![
                Ok(prompt("c1")),
                Ok(retry),
                Ok(deny_with(DenyReason::MaxTries)),
            ]
            .into(),
            ..FakeDaemon::default()
        };
        assert_eq!(run(&mut p, &mut d, false), PamResultCode::PAM_MAXTRIES);
        assert_eq!(d.answers.len(), 2);
        assert!(p
            .shown
            .borrow()
            .iter()
            .any(|(s, t)| *s == Style::Info && t == "Wrong code, 1 try left."));
    }

    #[test]
    fn first_pass_options_take_the_stacked_token() {
        // use_first_pass: the stacked token answers; a retry is not prompted.
        let mut p = FakePam {
            authtok: Some("654321"),
            ..pam(vec![])
        };
        let mut d = FakeDaemon {
            steps: vec![Ok(prompt("c1")), Ok(prompt("c2"))].into(),
            ..FakeDaemon::default()
        };
        let code = run_with(&mut p, &mut d, false, &options(&["use_first_pass"]));
        assert_eq!(code, PamResultCode::PAM_AUTH_ERR);
        assert_eq!(d.answers, vec![("c1".to_string(), b"654321".to_vec())]);
        assert!(p.shown.borrow().is_empty(), "use_first_pass never prompts");
        // try_first_pass: the stacked token first, then the user.
        let mut p = FakePam {
            authtok: Some("654321"),
            ..pam(vec![Ok(Some("111111"))])
        };
        let mut d = FakeDaemon {
            steps: vec![Ok(prompt("c1")), Ok(prompt("c2")), Ok(permit())].into(),
            ..FakeDaemon::default()
        };
        let code = run_with(&mut p, &mut d, false, &options(&["try_first_pass"]));
        assert_eq!(code, PamResultCode::PAM_SUCCESS);
        assert_eq!(d.answers[1], ("c2".to_string(), b"111111".to_vec()));
        // use_first_pass without a stacked token fails without prompting.
        let mut p = pam(vec![]);
        let mut d = FakeDaemon {
            steps: vec![Ok(prompt("c1"))].into(),
            ..FakeDaemon::default()
        };
        let code = run_with(&mut p, &mut d, false, &options(&["use_first_pass"]));
        assert_eq!(code, PamResultCode::PAM_AUTH_ERR);
    }

    #[test]
    fn account_stage_refuses_only_rule_denials() {
        let mut p = pam(vec![]);
        let mut d = FakeDaemon {
            steps: vec![Ok(deny("not from there"))].into(),
            ..FakeDaemon::default()
        };
        let code = account(&mut p, "h", false, &Options::default(), || Ok(&mut d));
        assert_eq!(code, PamResultCode::PAM_PERM_DENIED);
        assert!(p.shown.borrow().iter().any(|(_, t)| t == "not from there"));
        let mut d = FakeDaemon {
            steps: vec![Ok(permit())].into(),
            ..FakeDaemon::default()
        };
        let code = account(&mut p, "h", false, &Options::default(), || Ok(&mut d));
        assert_eq!(code, PamResultCode::PAM_SUCCESS);
        let absent = || Err::<&mut FakeDaemon, _>(DaemonError::Absent("no socket".into()));
        assert_eq!(
            account(&mut p, "h", false, &Options::default(), absent),
            PamResultCode::PAM_PERM_DENIED
        );
        assert_eq!(
            account(&mut p, "h", false, &options(&["failmode=safe"]), absent),
            PamResultCode::PAM_IGNORE
        );
        let slow = || Err::<&mut FakeDaemon, _>(DaemonError::TimedOut(Default::default()));
        for args in [&["failmode=safe"][..], &["failmode=secure"]] {
            let code = account(&mut p, "h", false, &options(args), slow);
            assert_eq!(code, PamResultCode::PAM_PERM_DENIED, "{args:?}");
        }
    }

    /// What a running guardd may answer instead of a step: overloaded, unavailable, broken, slow.
    fn outages() -> Vec<DaemonError> {
        vec![
            // RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED.
            DaemonError::from(status(8)),
            DaemonError::from(status(13)),
            DaemonError::from(status(14)),
            DaemonError::from(status(4)),
            DaemonError::from(WireError::Failed("guardd closed the connection".into())),
            DaemonError::TimedOut(std::time::Duration::from_secs(5)),
        ]
    }

    /// A guardd that is there but fails on Begin (or Check) is refused in every failmode: an
    /// overload that any local user can cause must not turn failmode=safe into no OTP at all.
    #[test]
    fn a_failing_begin_fails_closed_in_every_failmode() {
        for args in [&["failmode=safe"][..], &["failmode=secure"], &[]] {
            for outage in outages() {
                let why = format!("{args:?} {outage}");
                let mut p = pam(vec![]);
                let mut d = FakeDaemon {
                    steps: vec![Err(outage)].into(),
                    ..FakeDaemon::default()
                };
                let code = run_with(&mut p, &mut d, false, &options(args));
                assert_eq!(code, PamResultCode::PAM_AUTHINFO_UNAVAIL, "{why}");
            }
            for outage in outages() {
                let why = format!("{args:?} {outage}");
                let mut p = pam(vec![]);
                let mut d = FakeDaemon {
                    steps: vec![Err(outage)].into(),
                    ..FakeDaemon::default()
                };
                let code = account(&mut p, "h", false, &options(args), || Ok(&mut d));
                assert_eq!(code, PamResultCode::PAM_PERM_DENIED, "{why}");
            }
        }
    }

    /// Once Begin went out, guardd was there: any failure after it fails closed.
    #[test]
    fn a_failing_answer_fails_closed_in_safe_mode() {
        for outage in outages() {
            let why = outage.to_string();
            let mut p = pam(vec![Ok(Some("123456"))]);
            let mut d = FakeDaemon {
                steps: vec![Ok(prompt("c")), Err(outage)].into(),
                ..FakeDaemon::default()
            };
            let code = run_with(&mut p, &mut d, false, &options(&["failmode=safe"]));
            assert_eq!(code, PamResultCode::PAM_AUTHINFO_UNAVAIL, "{why}");
            assert_eq!(d.answers.len(), 1);
        }
    }

    /// Only connecting may find guardd absent. A daemon that reports `Absent` once connected
    /// (a reconnect that finds the socket gone) was there when the conversation began: it failed.
    #[test]
    fn absence_after_connecting_fails_closed_in_safe_mode() {
        let safe = options(&["failmode=safe"]);
        let gone = || DaemonError::Absent("socket removed".into());
        let mut p = pam(vec![]);
        let mut d = FakeDaemon {
            steps: vec![Err(gone())].into(),
            ..FakeDaemon::default()
        };
        let code = run_with(&mut p, &mut d, false, &safe);
        assert_eq!(code, PamResultCode::PAM_AUTHINFO_UNAVAIL);
        let mut p = pam(vec![Ok(Some("123456"))]);
        let mut d = FakeDaemon {
            steps: vec![Ok(prompt("c")), Err(gone())].into(),
            ..FakeDaemon::default()
        };
        let code = run_with(&mut p, &mut d, false, &safe);
        assert_eq!(code, PamResultCode::PAM_AUTHINFO_UNAVAIL);
        let mut d = FakeDaemon {
            steps: vec![Err(gone())].into(),
            ..FakeDaemon::default()
        };
        let code = account(&mut p, "h", false, &safe, || Ok(&mut d));
        assert_eq!(code, PamResultCode::PAM_PERM_DENIED);
    }

    /// A connection that cannot be opened for any reason but absence (timed out, EAGAIN on a full
    /// backlog, a failed handshake) fails closed in failmode=safe.
    #[test]
    fn a_failing_connect_fails_closed_in_safe_mode() {
        let safe = options(&["failmode=safe"]);
        let slow = || Err::<&mut FakeDaemon, _>(DaemonError::TimedOut(Default::default()));
        let full = || Err::<&mut FakeDaemon, _>(DaemonError::Failed("EAGAIN".into()));
        let mut p = pam(vec![]);
        for connect in [slow, full] {
            assert_eq!(
                authenticate(&mut p, "h", false, &safe, connect),
                PamResultCode::PAM_AUTHINFO_UNAVAIL
            );
            assert_eq!(
                account(&mut p, "h", false, &safe, connect),
                PamResultCode::PAM_PERM_DENIED
            );
        }
    }

    /// A gRPC status `code` as guardd would send it.
    fn status(code: u32) -> WireError {
        WireError::Status {
            code,
            message: "from guardd".into(),
        }
    }

    /// How connect(2)'s outcome reaches the PAM code: only an absent guardd may step aside.
    #[test]
    fn connect_errors_keep_absence_apart() {
        let absent = WireError::Absent {
            path: "/run/x.sock".into(),
            errno: nix::errno::Errno::ENOENT,
        };
        let failed = WireError::Failed("connect: EACCES".into());
        let slow = WireError::TimedOut(std::time::Duration::from_secs(5));
        assert!(matches!(DaemonError::from(absent), DaemonError::Absent(_)));
        assert!(matches!(DaemonError::from(failed), DaemonError::Failed(_)));
        assert!(matches!(DaemonError::from(slow), DaemonError::TimedOut(_)));
        assert!(matches!(
            DaemonError::from(status(wire::INVALID_ARGUMENT)),
            DaemonError::Refused(_)
        ));
    }
}
