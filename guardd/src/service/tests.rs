//! The identity rules and budgets of the service, over a fake directory of accounts (what no
//! real test machine offers: a case-insensitive directory, a name reused with another uid) and a
//! real store on a temporary file.

use std::collections::HashMap;
use std::sync::Mutex;

use proto::v1::guard_server::Guard;

use super::*;
use crate::accounts::{AccountError, PasswordState};
use crate::otp::OtpParams;
use crate::store::{SqliteStore, StoreThread};

/// A directory that answers names case-insensitively, as some LDAP and AD setups do.
#[derive(Default)]
struct Directory {
    accounts: Mutex<HashMap<String, (Account, String)>>,
    checks: Mutex<u32>,
}

impl Directory {
    fn add(&self, name: &str, uid: u32, password: &str) {
        let account = Account {
            name: name.into(),
            uid,
            gid: uid,
        };
        self.accounts
            .lock()
            .unwrap()
            .insert(name.to_lowercase(), (account, password.into()));
    }
}

impl Accounts for Directory {
    fn by_name(&self, name: &str) -> Result<Option<Account>, LookupError> {
        let accounts = self.accounts.lock().unwrap();
        Ok(accounts.get(&name.to_lowercase()).map(|(a, _)| a.clone()))
    }
    fn by_uid(&self, uid: u32) -> Result<Option<Account>, LookupError> {
        let accounts = self.accounts.lock().unwrap();
        Ok(accounts
            .values()
            .find(|(a, _)| a.uid == uid)
            .map(|(a, _)| a.clone()))
    }
    fn groups(&self, _account: &Account) -> Result<Vec<String>, LookupError> {
        Ok(Vec::new())
    }
    fn password_state(&self, name: &str) -> PasswordState {
        match self.accounts.lock().unwrap().get(&name.to_lowercase()) {
            Some((_, p)) if p.is_empty() => PasswordState::Locked,
            Some(_) => PasswordState::Usable,
            None => PasswordState::Unknown,
        }
    }
    fn check_password(&self, name: &str, password: &[u8]) -> Result<bool, AccountError> {
        *self.checks.lock().unwrap() += 1;
        let accounts = self.accounts.lock().unwrap();
        Ok(accounts
            .get(&name.to_lowercase())
            .is_some_and(|(_, p)| !p.is_empty() && p.as_bytes() == password))
    }
    fn set_password(&self, _name: &str, _password: &str) -> Result<(), AccountError> {
        Ok(())
    }
}

const NOW: u64 = 1_800_000_000;

const RULES: &str = r#"
version = 1
default = "permit"

[[rule]]
id = "otp-if-enrolled"
effect = "otp"
unenrolled = "permit"
match = { service = ["sshd", "enroll"] }
"#;

struct Fixture {
    /// The service's clock, which `login` moves.
    now: Arc<std::sync::atomic::AtomicU64>,
    _dir: tempfile::TempDir,
    svc: GuardService,
    directory: Arc<Directory>,
}

fn fixture() -> Fixture {
    fixture_with(RULES)
}

fn fixture_with(rules: &str) -> Fixture {
    let now = Arc::new(std::sync::atomic::AtomicU64::new(NOW));
    let read = now.clone();
    let clock = Clock::from_fn(move || read.load(std::sync::atomic::Ordering::SeqCst));
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        database: dir.path().join("t.db").into(),
        key_file: dir.path().join("k"),
        ..Config::default()
    };
    let store = SqliteStore::open(&dir.path().join("t.db"), &config.key_file).unwrap();
    let directory = Arc::new(Directory::default());
    let svc = GuardService::new(
        Runner::Sqlite(StoreThread::start(store, 2).unwrap()),
        Hasher::start().unwrap(),
        &config,
        Policy::parse("rules.toml", rules).unwrap(),
        clock,
    )
    .with_accounts(directory.clone());
    Fixture {
        now,
        _dir: dir,
        svc,
        directory,
    }
}

const ROOT: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: None,
    real_uid: Some(0),
    owner: false,
    process: crate::caller::Process::Unknown,
};

fn user(uid: u32) -> Caller {
    Caller {
        uid,
        gid: uid,
        pid: None,
        real_uid: Some(uid),
        owner: false,
        process: crate::caller::Process::Unknown,
    }
}

fn request<T>(caller: Caller, message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.extensions_mut().insert(caller);
    r
}

fn begin(user: &str) -> BeginRequest {
    BeginRequest {
        context: Some(LoginContext {
            user: user.into(),
            service: "sshd".into(),
            ..LoginContext::default()
        }),
    }
}

fn kind(step: &Step) -> &'static str {
    match &step.kind {
        Some(step::Kind::Prompt(_)) => "prompt",
        Some(step::Kind::Permit(_)) => "permit",
        Some(step::Kind::Deny(_)) => "deny",
        None => "none",
    }
}

impl Fixture {
    /// Enrols `name` as root and activates the token with the previous step's code.
    async fn enroll_active(&self, name: &str) -> Vec<u8> {
        let reply = self
            .svc
            .enroll(request(
                ROOT,
                EnrollRequest {
                    user: name.into(),
                    ..EnrollRequest::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let b32 = reply
            .uri
            .split("secret=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        let secret = data_encoding::BASE32_NOPAD.decode(b32.as_bytes()).unwrap();
        let code = otp::totp_code(&secret, OtpParams::default(), NOW - 30).unwrap();
        self.svc
            .confirm(request(
                ROOT,
                ConfirmRequest {
                    user: name.into(),
                    code: code.into_bytes(),
                },
            ))
            .await
            .unwrap();
        secret
    }

    async fn begin(&self, caller: Caller, name: &str) -> Result<Step, Status> {
        self.svc
            .begin(request(caller, begin(name)))
            .await
            .map(Response::into_inner)
    }
}

#[tokio::test]
async fn a_differently_cased_name_is_the_same_account() {
    let f = fixture();
    f.directory.add("alice", 1000, "pw");
    f.enroll_active("alice").await;
    // Under a case-insensitive directory "ALICE" is alice: asked for her code, not let through
    // as a user without a token.
    assert_eq!(kind(&f.begin(ROOT, "ALICE").await.unwrap()), "prompt");
    assert_eq!(kind(&f.begin(ROOT, "Alice").await.unwrap()), "prompt");
}

#[tokio::test]
async fn a_name_reused_with_another_uid_is_refused_not_unenrolled() {
    let f = fixture();
    f.directory.add("bob", 1000, "pw");
    f.enroll_active("bob").await;
    // userdel bob; useradd bob (another uid): the old tokens are not the new account's.
    f.directory.add("bob", 1001, "pw");
    let step = f.begin(ROOT, "bob").await.unwrap();
    assert_eq!(kind(&step), "deny");
    let Some(step::Kind::Deny(d)) = step.kind else {
        unreachable!()
    };
    assert_eq!(d.message, FOREIGN_MESSAGE);
    // The name gone altogether: still refused.
    f.directory.accounts.lock().unwrap().clear();
    assert_eq!(kind(&f.begin(ROOT, "bob").await.unwrap()), "deny");
}

#[tokio::test]
async fn one_uid_cannot_hold_more_open_logins_than_its_share_and_root_is_served() {
    let f = fixture();
    f.directory.add("mallory", 1000, "pw");
    f.directory.add("root", 0, "pw");
    f.enroll_active("mallory").await;
    f.enroll_active("root").await;
    let mallory = user(1000);
    for _ in 0..SESSIONS.per_key {
        assert_eq!(
            kind(&f.begin(mallory.clone(), "mallory").await.unwrap()),
            "prompt"
        );
    }
    let refused = f.begin(mallory.clone(), "mallory").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(kind(&f.begin(ROOT, "root").await.unwrap()), "prompt");
    // sudo started by mallory is root, but counts against mallory's uid.
    let sudo = Caller {
        real_uid: Some(1000),
        ..ROOT
    };
    let refused = f.begin(sudo.clone(), "root").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
}

#[tokio::test]
async fn self_enrolment_counts_a_wrong_password_before_checking_and_stops_at_the_back_off() {
    let f = fixture();
    f.directory.add("carol", 1000, "right");
    let enroll = |password: &str| {
        request(
            user(1000),
            EnrollRequest {
                user: "carol".into(),
                password: password.as_bytes().to_vec(),
                ..EnrollRequest::default()
            },
        )
    };
    for _ in 0..5 {
        let e = f.svc.enroll(enroll("wrong")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    }
    // Locked out: the right password is not even checked.
    let checks = *f.directory.checks.lock().unwrap();
    let e = f.svc.enroll(enroll("right")).await.unwrap_err();
    assert!(e.message().contains("too many failed attempts"), "{e:?}");
    assert_eq!(*f.directory.checks.lock().unwrap(), checks);
}

#[tokio::test]
async fn a_right_password_enrols_once_and_is_forgiven() {
    let f = fixture();
    f.directory.add("dave", 1000, "right");
    let enroll = |password: &str| {
        request(
            user(1000),
            EnrollRequest {
                user: "dave".into(),
                password: password.as_bytes().to_vec(),
                ..EnrollRequest::default()
            },
        )
    };
    assert!(f.svc.enroll(enroll("wrong")).await.is_err());
    assert!(f.svc.enroll(enroll("right")).await.is_ok());
    let failures = f
        .svc
        .store(|s| Ok::<_, ServiceError>(s.lockout("dave")?.failures))
        .await
        .unwrap();
    assert_eq!(
        failures, 1,
        "the right password takes back only its own count"
    );
    // Another user cannot enrol dave, whatever the password.
    let e = f
        .svc
        .enroll(request(
            user(1001),
            EnrollRequest {
                user: "dave".into(),
                password: b"right".to_vec(),
                ..EnrollRequest::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn a_locked_password_cannot_enrol_and_explain_is_for_admins() {
    let f = fixture();
    f.directory.add("erin", 1000, "");
    let e = f
        .svc
        .enroll(request(
            user(1000),
            EnrollRequest {
                user: "erin".into(),
                password: b"anything".to_vec(),
                ..EnrollRequest::default()
            },
        ))
        .await
        .unwrap_err();
    assert!(e.message().contains("invitation"), "{e:?}");
    let e = f
        .svc
        .explain(request(
            user(1000),
            ExplainRequest {
                context: begin("erin").context,
                time: 0,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn prompts_left_open_from_one_address_do_not_refuse_the_user_elsewhere() {
    let f = fixture();
    f.directory.add("root", 0, "pw");
    f.enroll_active("root").await;
    let from = |rhost: &str| BeginRequest {
        context: Some(LoginContext {
            user: "root".into(),
            service: "sshd".into(),
            rhost: rhost.into(),
            ..LoginContext::default()
        }),
    };
    // sshd (root) left these prompts unanswered: one client that disconnects at each prompt.
    for _ in 0..SESSIONS.per_key {
        let step = f
            .svc
            .begin(request(ROOT, from("198.51.100.9")))
            .await
            .unwrap();
        assert_eq!(kind(&step.into_inner()), "prompt");
    }
    let refused = f
        .svc
        .begin(request(ROOT, from("198.51.100.9")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    let elsewhere = f.svc.begin(request(ROOT, from("192.0.2.1"))).await.unwrap();
    assert_eq!(kind(&elsewhere.into_inner()), "prompt");
    let console = f.svc.begin(request(ROOT, begin("root"))).await.unwrap();
    assert_eq!(kind(&console.into_inner()), "prompt");
}

#[tokio::test]
async fn one_password_check_at_a_time_per_caller() {
    let f = fixture();
    f.directory.add("frank", 1000, "right");
    let holding = f
        .svc
        .password_budget
        .acquire(user(1000).budget_keys(None), false)
        .unwrap();
    let e = f
        .svc
        .enroll(request(
            user(1000),
            EnrollRequest {
                user: "frank".into(),
                password: b"right".to_vec(),
                ..EnrollRequest::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert_eq!(*f.directory.checks.lock().unwrap(), 0);
    drop(holding);
}

const REUSE_RULES: &str = r#"
version = 1
default = "permit"

[[rule]]
id = "ssh"
effect = "otp"
reuse = "10m"
reuse_scope = ["rhost", "ssh_key"]
match = { service = ["sshd"] }
"#;

/// An ssh login from 192.0.2.7 with the ed25519 key of the ssh_auth tests (or another).
fn ssh_login(user: &str, key: &str) -> BeginRequest {
    let key = match key {
        "a" => "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIId5t5dms+ihM9xkajJd6PiJTXRZtG5+R4FyhUUVOyxI",
        _ => "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDZ6HKJc+hqWAwhSH0F3KeDnQDvcN3PaxW+ms8QszSjwnif8SYx8uMnTEg0JY6JeW2Lww7nivWIGq/QBRu3nIi7Qkn62LWBrDIAs/AFqA29aStf+1l8bH8QUc9AcRyRNIehsMAqiB/limzdfVMTKzCGVQDQkD8dxBtMnI4KMeekTQ==",
    };
    BeginRequest {
        context: Some(LoginContext {
            user: user.into(),
            service: "sshd".into(),
            rhost: "192.0.2.7".into(),
            ssh_connection: "192.0.2.7 5555 192.0.2.1 22".into(),
            ssh_auth_info: format!("publickey {key}\n"),
            ..LoginContext::default()
        }),
    }
}

/// A fixture under REUSE_RULES, with ann in the directory.
fn reuse_fixture() -> (Fixture, Arc<std::sync::atomic::AtomicU64>) {
    let f = fixture_with(REUSE_RULES);
    f.directory.add("ann", 1000, "pw");
    let now = f.now.clone();
    (f, now)
}

/// The challenge of `step`, a prompt (the test expects one).
fn challenge_of(step: Step) -> String {
    match step.kind {
        Some(step::Kind::Prompt(p)) => p.challenge,
        other => panic!("expected a prompt: {other:?}"),
    }
}

impl Fixture {
    /// Begins `req` as `caller`, which must be asked for a code: the prompt's challenge.
    async fn prompt(&self, caller: Caller, req: BeginRequest) -> String {
        challenge_of(
            self.svc
                .begin(request(caller, req))
                .await
                .unwrap()
                .into_inner(),
        )
    }

    /// The reuse line of `guardctl explain` for ann's ssh login with key `key`.
    async fn explain_reuse(&self, key: &str) -> String {
        let context = ssh_login("ann", key).context;
        self.svc
            .explain(request(ROOT, ExplainRequest { context, time: 0 }))
            .await
            .unwrap()
            .into_inner()
            .reuse
    }

    /// One login by `caller`: begin, and the code of `at` for a prompt. What it ended in.
    async fn login(
        &self,
        caller: Caller,
        req: BeginRequest,
        secret: &[u8],
        at: u64,
    ) -> &'static str {
        self.now.store(at, std::sync::atomic::Ordering::SeqCst);
        let step = self
            .svc
            .begin(request(caller.clone(), req))
            .await
            .unwrap()
            .into_inner();
        let Some(step::Kind::Prompt(p)) = step.kind else {
            return if kind(&step) == "permit" {
                "permit without code"
            } else {
                kind(&step)
            };
        };
        let code = otp::totp_code(secret, OtpParams::default(), at).unwrap();
        let answer = AnswerRequest {
            challenge: p.challenge,
            response: code.into_bytes(),
        };
        let step = self
            .svc
            .answer(request(caller, answer))
            .await
            .unwrap()
            .into_inner();
        kind(&step)
    }
}

#[tokio::test]
async fn an_otp_is_reused_within_the_window_for_the_same_key_and_address_only() {
    let (f, now) = reuse_fixture();
    let secret = f.enroll_active("ann").await;
    let set = |t: u64| now.store(t, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        f.login(ROOT, ssh_login("ann", "a"), &secret, NOW).await,
        "permit"
    );
    set(NOW + 60);
    assert_eq!(
        f.login(ROOT, ssh_login("ann", "a"), &secret, NOW + 60)
            .await,
        "permit without code"
    );
    // Another key, another address, or no key: a code.
    assert_eq!(
        f.login(ROOT, ssh_login("ann", "b"), &secret, NOW + 60)
            .await,
        "permit"
    );
    let mut elsewhere = ssh_login("ann", "a");
    elsewhere.context.as_mut().unwrap().rhost = "198.51.100.9".into();
    assert_eq!(f.login(ROOT, elsewhere, &secret, NOW + 90).await, "permit");
    let mut keyless = ssh_login("ann", "a");
    keyless.context.as_mut().unwrap().ssh_auth_info.clear();
    assert_eq!(f.login(ROOT, keyless, &secret, NOW + 120).await, "permit");
    // The window runs from the proof, not from the last reuse.
    set(NOW + 599);
    assert_eq!(
        f.login(ROOT, ssh_login("ann", "a"), &secret, NOW + 599)
            .await,
        "permit without code"
    );
    set(NOW + 610);
    assert_eq!(
        f.login(ROOT, ssh_login("ann", "a"), &secret, NOW + 610)
            .await,
        "permit"
    );
}

#[tokio::test]
async fn explain_says_whether_a_grant_would_apply_and_until_when() {
    let (f, _) = reuse_fixture();
    let secret = f.enroll_active("ann").await;
    assert!(
        f.explain_reuse("a")
            .await
            .contains("no grant applies (0 live"),
        "{}",
        f.explain_reuse("a").await
    );
    assert_eq!(
        f.login(ROOT, ssh_login("ann", "a"), &secret, NOW).await,
        "permit"
    );
    let line = f.explain_reuse("a").await;
    assert!(
        line.starts_with("reuse ssh: 600 s within [rhost, ssh_key]"),
        "{line}"
    );
    assert!(
        line.contains("a grant applies") && line.contains("2027-01-15T08:10:00Z"),
        "{line}"
    );
    assert!(f
        .explain_reuse("b")
        .await
        .contains("no grant applies (1 live"));
}

#[tokio::test]
async fn a_non_root_caller_neither_makes_nor_uses_grants() {
    let (f, _) = reuse_fixture();
    let secret = f.enroll_active("ann").await;
    let ann = user(1000);
    // ann's own screen locker proves a code: no grant, and none for her own next call.
    assert_eq!(
        f.login(ann.clone(), ssh_login("ann", "a"), &secret, NOW)
            .await,
        "permit"
    );
    assert_eq!(
        f.login(ann.clone(), ssh_login("ann", "a"), &secret, NOW + 30)
            .await,
        "permit"
    );
    assert_eq!(
        f.login(ROOT, ssh_login("ann", "a"), &secret, NOW + 60)
            .await,
        "permit"
    );
    // sshd's grant exists now; her own uid still gets no shortcut from it.
    assert_eq!(
        f.login(ann.clone(), ssh_login("ann", "a"), &secret, NOW + 90)
            .await,
        "permit"
    );
    // A root caller whose PAM service is not sshd's: its ssh keys are not believed.
    let mut sudo = ssh_login("ann", "a");
    sudo.context.as_mut().unwrap().service = "sudo".into();
    assert!(f
        .svc
        .ssh_keys(&ROOT, sudo.context.as_ref().unwrap())
        .is_empty());
}

#[tokio::test]
async fn forget_a_disabled_token_a_lockout_or_a_changed_rule_end_grants() {
    let (f, now) = reuse_fixture();
    let secret = f.enroll_active("ann").await;
    let set = |t: u64| now.store(t, std::sync::atomic::Ordering::SeqCst);
    let prove = |t: u64| {
        set(t);
        f.login(ROOT, ssh_login("ann", "a"), &secret, t)
    };
    let reused = |t: u64| {
        set(t);
        f.login(ROOT, ssh_login("ann", "a"), &secret, t)
    };
    assert_eq!(prove(NOW).await, "permit");
    assert_eq!(reused(NOW + 1).await, "permit without code");

    // guardctl forget.
    let forgot = f
        .svc
        .forget(request(ROOT, ForgetRequest { user: "ann".into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(forgot.forgotten, 1);
    assert_eq!(prove(NOW + 30).await, "permit");
    assert_eq!(reused(NOW + 31).await, "permit without code");

    // A lock-out: wrong codes until the back-off starts.
    for _ in 0..5 {
        let challenge = f.prompt(ROOT, ssh_login("ann", "b")).await;
        let wrong = AnswerRequest {
            challenge,
            response: b"000000".to_vec(),
        };
        f.svc.answer(request(ROOT, wrong)).await.unwrap();
    }
    let step = f
        .svc
        .begin(request(ROOT, ssh_login("ann", "a")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kind(&step), "prompt", "the lock-out ended the grant");
    f.svc
        .unlock(request(ROOT, UnlockRequest { user: "ann".into() }))
        .await
        .unwrap();

    // A reload that changes the rule.
    assert_eq!(prove(NOW + 60).await, "permit");
    assert_eq!(reused(NOW + 61).await, "permit without code");
    let changed = REUSE_RULES.replace("\"10m\"", "\"11m\"");
    *f.svc.policy.write().unwrap() = Arc::new(Policy::parse("rules.toml", &changed).unwrap());
    assert_eq!(
        reused(NOW + 90).await,
        "permit",
        "a changed rule asks again"
    );

    // Disabling the token.
    assert_eq!(reused(NOW + 91).await, "permit without code");
    let token = f.svc.store(|s| Ok(s.list(Some("ann"))?)).await.unwrap()[0]
        .id
        .clone();
    f.svc
        .set_enabled(request(
            ROOT,
            SetEnabledRequest {
                user: "ann".into(),
                token_id: token,
                enabled: false,
            },
        ))
        .await
        .unwrap();
    let step = f
        .svc
        .begin(request(ROOT, ssh_login("ann", "a")))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(kind(&step), "permit", "{step:?}");
}

/// A process in an audit login session of its own, logged in as `uid` (pam_loginuid's write to
/// /proc/self/loginuid, which needs root, or a loginuid still unset), and a root caller
/// connecting from it. The child is killed when dropped.
struct InSession(std::process::Child);

impl InSession {
    fn start(uid: u32) -> (InSession, Caller) {
        let child = std::process::Command::new("sh")
            .args([
                "-c",
                &format!("echo {uid} > /proc/self/loginuid && exec sleep 120"),
            ])
            .spawn()
            .unwrap();
        let pid = child.id();
        let guard = InSession(child);
        for _ in 0..200 {
            if crate::procfs::session_id(pid).is_some() {
                // Known both ways guardd knows a caller: read at connect, and pinned by a pidfd
                // (what a kernel with SO_PEERPIDFD gives); the pinned one is what the test uses.
                let read = Caller::from_cred(0, 0, Some(pid as i32));
                let pinned = Caller::accepted(0, 0, Some(pid as i32), || {
                    let pid = rustix::process::Pid::from_raw(pid as i32)?;
                    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
                });
                assert!(matches!(read.process, crate::caller::Process::Read { .. }));
                assert!(matches!(pinned.process, crate::caller::Process::Pinned(_)));
                for caller in [&read, &pinned] {
                    assert!(caller.login_session(Some(uid)).is_some());
                    assert!(caller.login_session(Some(uid + 1)).is_none());
                    assert!(caller.login_session(None).is_none());
                }
                return (guard, pinned);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("no login session for the child (run as root)");
    }
}

impl Drop for InSession {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where `session` reuse matters: ssh logins and sudo inside them.
const SESSION_RULES: &str = r#"
version = 1
default = "permit"

[[rule]]
id = "ssh-and-sudo"
effect = "otp"
reuse = "10m"
reuse_scope = ["session"]
match = { service = ["sshd", "sudo"] }
"#;

/// A caller's session counts only while the process that connected runs: once it is gone its
/// pid may name another process. A pinned caller has none from the moment it exits, even while
/// it is a zombie whose /proc files still read; one read at connect has none once it is reaped.
#[test]
#[ignore = "needs root"]
fn a_gone_caller_has_no_session_as_root() {
    let (mut process, pinned) = InSession::start(1000);
    let read = Caller::from_cred(0, 0, pinned.pid);
    let crate::caller::Process::Pinned(pidfd) = &pinned.process else {
        unreachable!()
    };
    assert!(crate::pidfd::runs(pidfd));
    process.0.kill().unwrap();
    let exited = std::time::Instant::now();
    while crate::pidfd::runs(pidfd) {
        assert!(exited.elapsed().as_secs() < 5, "the child did not exit");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let pid = pinned.pid.unwrap() as u32;
    assert_eq!(
        crate::procfs::loginuid(pid),
        Some(1000),
        "a zombie still reads"
    );
    assert_eq!(pinned.login_session(Some(1000)), None);
    process.0.wait().unwrap();
    assert_eq!(read.login_session(Some(1000)), None);
}

/// sshd started from an admin's shell (an init script run by hand, a container started from a
/// login) runs in that login session, and so does every connection's authentication process.
/// That session is sshd's own, not the ssh login's: a grant bound to it would let every later
/// ssh login of the user in without a code, from any address and with any key.
#[tokio::test]
#[ignore = "needs root"]
async fn sshd_s_own_session_is_not_the_login_s_as_root() {
    let f = fixture_with(SESSION_RULES);
    f.directory.add("ann", 1000, "pw");
    let secret = f.enroll_active("ann").await;
    // Started by root from root's shell: root's session, whatever sshd then authenticates.
    let (_sshd_process, sshd) = InSession::start(0);
    assert_eq!(
        f.login(sshd.clone(), ssh_login("ann", "a"), &secret, NOW)
            .await,
        "permit"
    );
    let mut elsewhere = ssh_login("ann", "b");
    elsewhere.context.as_mut().unwrap().rhost = "198.51.100.9".into();
    elsewhere.context.as_mut().unwrap().ssh_connection = "198.51.100.9 4444 192.0.2.1 22".into();
    assert_eq!(
        f.login(sshd.clone(), elsewhere, &secret, NOW + 60).await,
        "permit",
        "another ssh login, from another address with another key, must be asked for a code"
    );
    // sudo inside a login session still reuses the OTP it proved there.
    let (_shell, sudo) = InSession::start(1000);
    let mut sudo_login = begin("ann");
    sudo_login.context.as_mut().unwrap().service = "sudo".into();
    assert_eq!(
        f.login(sudo.clone(), sudo_login.clone(), &secret, NOW + 120)
            .await,
        "permit"
    );
    assert_eq!(
        f.login(sudo.clone(), sudo_login, &secret, NOW + 150).await,
        "permit without code"
    );
}

/// A root program that runs in someone else's login session (a daemon an admin started from
/// their shell, `su` from ann's session to root) does not lend that session to the user it
/// authenticates: the session counts only when its login uid is that user's.
#[tokio::test]
#[ignore = "needs root"]
async fn a_session_counts_only_for_the_user_logged_in_to_it_as_root() {
    let f = fixture_with(SESSION_RULES);
    f.directory.add("ann", 1000, "pw");
    let secret = f.enroll_active("ann").await;
    let (_admin_shell, daemon) = InSession::start(0);
    let mut sudo_login = begin("ann");
    sudo_login.context.as_mut().unwrap().service = "sudo".into();
    assert_eq!(
        f.login(daemon.clone(), sudo_login.clone(), &secret, NOW)
            .await,
        "permit"
    );
    assert_eq!(
        f.login(daemon, sudo_login, &secret, NOW + 30).await,
        "permit",
        "asked again: root's session is not ann's"
    );
}

/// A user who mistypes the code once and then types it right has proven the OTP as much as one
/// who typed it right at once: the retry must leave the grant the first try would have.
#[tokio::test]
async fn a_code_right_at_the_second_try_leaves_a_grant() {
    let (f, _) = reuse_fixture();
    let secret = f.enroll_active("ann").await;
    f.now.store(NOW, std::sync::atomic::Ordering::SeqCst);
    let challenge = f.prompt(ROOT, ssh_login("ann", "a")).await;
    let wrong = AnswerRequest {
        challenge,
        response: b"000000".to_vec(),
    };
    let step = f
        .svc
        .answer(request(ROOT, wrong))
        .await
        .unwrap()
        .into_inner();
    let code = otp::totp_code(&secret, OtpParams::default(), NOW).unwrap();
    let right = AnswerRequest {
        challenge: challenge_of(step),
        response: code.into_bytes(),
    };
    let step = f
        .svc
        .answer(request(ROOT, right))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kind(&step), "permit");
    assert_eq!(
        f.login(ROOT, ssh_login("ann", "a"), &secret, NOW + 60)
            .await,
        "permit without code"
    );
}

/// Reissuing backup codes is what an admin does when they leaked: a grant one of them proved
/// (or any other) must end with them, as with a disabled or deleted token.
#[tokio::test]
async fn reissued_backup_codes_end_grants() {
    let (f, _) = reuse_fixture();
    let secret = f.enroll_active("ann").await;
    let codes = f
        .svc
        .issue_backup_codes(request(ROOT, BackupCodesRequest { user: "ann".into() }))
        .await
        .unwrap()
        .into_inner()
        .codes;
    // A backup code proves the login and leaves a grant.
    f.now.store(NOW, std::sync::atomic::Ordering::SeqCst);
    let challenge = f.prompt(ROOT, ssh_login("ann", "a")).await;
    let backup = AnswerRequest {
        challenge,
        response: codes[0].clone().into_bytes(),
    };
    let step = f
        .svc
        .answer(request(ROOT, backup))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kind(&step), "permit");
    assert_eq!(
        f.login(ROOT, ssh_login("ann", "a"), &secret, NOW + 30)
            .await,
        "permit without code"
    );
    f.svc
        .issue_backup_codes(request(ROOT, BackupCodesRequest { user: "ann".into() }))
        .await
        .unwrap();
    f.now.store(NOW + 60, std::sync::atomic::Ordering::SeqCst);
    let step = f
        .svc
        .begin(request(ROOT, ssh_login("ann", "a")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kind(&step), "prompt", "the reissued codes ended the grant");
}

/// The code check and the grant it leaves are two store calls: a lock-out that starts between
/// them (wrong guesses from another address or host at that moment) ends the grants already
/// stored, not the one stored just after. Such a grant must not let logins in during the
/// back-off.
#[tokio::test]
async fn a_grant_stored_as_the_back_off_starts_lets_no_login_in_during_it() {
    let (f, now) = reuse_fixture();
    let secret = f.enroll_active("ann").await;
    now.store(NOW, std::sync::atomic::Ordering::SeqCst);
    // ann's code was checked; before her grant is stored, someone else's guesses lock her out.
    let ctx = ssh_login("ann", "a").context.unwrap();
    let keys = f.svc.ssh_keys(&ROOT, &ctx);
    let facts = LoginFacts {
        stored: Some(LoginRecord {
            foreign: None,
            active: true,
            can_answer: true,
        }),
        ..LoginFacts::default()
    };
    let login = f.svc.rules_request(&ctx, NOW as i64, keys.clone());
    let obligations = f.svc.policy().evaluate(&login, &facts, false).reuse;
    assert_eq!(obligations.len(), 1);
    let proving = reuse::Proving {
        reuse: obligations,
        attributes: f.svc.attributes(&ROOT, &ctx, &keys, Some(1000)),
        ssh_connection: None,
    };
    for _ in 0..5 {
        let challenge = f.prompt(ROOT, ssh_login("ann", "b")).await;
        let wrong = AnswerRequest {
            challenge,
            response: b"000000".to_vec(),
        };
        f.svc.answer(request(ROOT, wrong)).await.unwrap();
    }
    assert!(f
        .svc
        .make_grants(&ROOT, "ann", Some(1000), proving)
        .await
        .is_some());
    // The first back-off lasts 30 s.
    assert_ne!(
        f.login(ROOT, ssh_login("ann", "a"), &secret, NOW + 10)
            .await,
        "permit without code",
        "let in during the back-off"
    );
}

/// An open prompt keeps no copy of sshd's auth info (up to 16 KiB, any caller may send it): a
/// uid's share of open conversations must not cost 16 KiB each.
#[tokio::test]
async fn a_waiting_conversation_holds_no_ssh_auth_info() {
    let (f, _) = reuse_fixture();
    f.enroll_active("ann").await;
    let mut login = ssh_login("ann", "a");
    login
        .context
        .as_mut()
        .unwrap()
        .ssh_auth_info
        .push_str(&"x".repeat(8000));
    f.prompt(user(1000), login).await;
    let sessions = f.svc.sessions.lock().unwrap();
    assert_eq!(sessions.open.len(), 1);
    assert!(sessions
        .open
        .values()
        .all(|s| s.context.ssh_auth_info.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_work_keeps_its_place_in_the_budget_when_its_call_is_cut_short() {
    let f = fixture();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    // A call cut short while its blocking work runs (the work cannot be ended).
    let cut = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        f.svc.blocking(&user(1000), move || {
            let _ = rx.recv();
            Ok(())
        }),
    )
    .await;
    assert!(cut.is_err());
    // Its place stays taken: the uid has 7 of its 8 left while the work runs.
    let mut held: Vec<_> = (0..7)
        .map(|_| {
            f.svc
                .blocking_budget
                .acquire(user(1000).budget_keys(None), false)
                .unwrap()
        })
        .collect();
    assert!(f
        .svc
        .blocking_budget
        .acquire(user(1000).budget_keys(None), false)
        .is_err());
    // Once the work ends, the place comes back.
    tx.send(()).unwrap();
    let started = std::time::Instant::now();
    loop {
        match f
            .svc
            .blocking_budget
            .acquire(user(1000).budget_keys(None), false)
        {
            Ok(h) => {
                held.push(h);
                break;
            }
            Err(_) => {
                assert!(started.elapsed() < std::time::Duration::from_secs(5));
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    }
}
