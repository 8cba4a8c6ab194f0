//! Test harness: the built binaries, a real guardd on a scratch socket and database, enrolled
//! test tokens, and pamtester under pam_wrapper. Everything a test starts is stopped and
//! removed on drop, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guardd::otp::{self, OtpParams};
use proto::v1::guard_client::GuardClient;
use proto::v1::{self as v1, Step, Token};
use proto::v1::{
    step, AnswerRequest, BackupCodesRequest, BeginRequest, ConfirmRequest, EnrollRequest,
    LoginContext,
};
use tonic::transport::Channel;

/// Rules for tests that are about tokens rather than rules: every login needs an OTP, and a
/// user without a token is refused (the strictest site).
pub const STRICT_RULES: &str = r#"
version = 1
algorithm = "first-applicable"
default = "deny"

[[rule]]
id = "everyone-otp"
effect = "otp"
unenrolled = "deny"
"#;

/// Writes `rules` as `rules.toml` in `dir` and returns its path.
pub fn write_rules(dir: &Path, rules: &str) -> PathBuf {
    let path = dir.join("rules.toml");
    std::fs::write(&path, rules).unwrap();
    path
}

/// Runs a command that must succeed.
pub fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    out
}

/// A local user for the test, removed with its home on drop.
pub struct User {
    pub name: String,
}

impl User {
    pub fn create() -> User {
        User::create_named("otpe2e")
    }

    /// A user whose name starts with `prefix`, unique to this process and call.
    pub fn create_named(prefix: &str) -> User {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("{prefix}{}x{n}", std::process::id() % 100_000);
        let _ = Command::new("userdel").args(["-r", &name]).output();
        run(Command::new("useradd").args(["-m", "-s", "/bin/sh", &name]));
        // Not locked ("!"), but no password can ever match.
        run(Command::new("usermod").args(["-p", "*", &name]));
        User { name }
    }

    pub fn home(&self) -> PathBuf {
        PathBuf::from("/home").join(&self.name)
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-KILL", "-u", &self.name])
            .output();
        let _ = Command::new("userdel").args(["-r", &self.name]).output();
    }
}

/// Sets `user`'s password with the system's chpasswd.
pub fn set_password(user: &str, password: &str) {
    use std::io::Write;
    let mut child = Command::new("chpasswd")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{user}:{password}\n").as_bytes());
    assert!(child.wait().unwrap().success());
}

/// `user`'s password hash as /etc/shadow holds it (to show that nothing changed).
pub fn shadow_hash(user: &str) -> String {
    let out = Command::new("getent")
        .args(["shadow", user])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

/// A file under /etc, removed on drop (or, when it existed, put back as it was).
pub struct EtcFile {
    path: PathBuf,
    previous: Option<Vec<u8>>,
}

impl EtcFile {
    pub fn write(path: &str, text: &str, mode: u32) -> EtcFile {
        let previous = std::fs::read(path).ok();
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        EtcFile {
            path: PathBuf::from(path),
            previous,
        }
    }
}

impl Drop for EtcFile {
    fn drop(&mut self) {
        match &self.previous {
            Some(text) => {
                let _ = std::fs::write(&self.path, text);
            }
            None => {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// The cargo output folder holding the built binaries and the module (`target/debug`).
pub fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// A built artefact; panics with the fix when it is missing.
pub fn artefact(name: &str) -> PathBuf {
    let path = build_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        path.display()
    );
    path
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A guardd reachable on `socket`, in a child process or in this one.
#[derive(Clone)]
pub struct Guard {
    pub socket: PathBuf,
    /// Every secret and code the tests handed to or got from guardd: none may show in its log.
    used: Arc<Mutex<Vec<String>>>,
}

impl Guard {
    pub fn new(socket: PathBuf) -> Guard {
        Guard {
            socket,
            used: Arc::default(),
        }
    }

    /// Notes a secret or code that guardd must never log.
    pub fn remember(&self, secret: &str) {
        let secret = secret.trim();
        if !secret.is_empty() {
            self.used.lock().unwrap().push(secret.to_owned());
        }
    }

    /// The remembered secrets that occur in `log` as whole words (timestamps and pids removed).
    pub fn leaked_into(&self, log: &str) -> Vec<String> {
        // guardd's lines are JSON objects: every value but the timestamp and pids, which are
        // numbers that could equal a code by chance. Other lines (text on a terminal) are
        // space-separated fields, the first one the timestamp.
        let fields: Vec<String> = log
            .lines()
            .flat_map(|line| match serde_json::from_str(line) {
                Ok(serde_json::Value::Object(map)) => map
                    .into_iter()
                    .filter(|(k, _)| k != "timestamp" && !k.contains("pid"))
                    .map(|(_, v)| text_of(&v))
                    .collect::<Vec<_>>(),
                _ => line
                    .split(' ')
                    .skip(1)
                    .filter(|field| !field.contains("pid="))
                    .map(str::to_owned)
                    .collect(),
            })
            .collect();
        let words: std::collections::HashSet<&str> = fields
            .iter()
            .flat_map(|field| field.split(|c: char| !c.is_ascii_alphanumeric() && c != '-'))
            .filter(|w| !w.is_empty())
            .collect();
        let full = log;
        self.used
            .lock()
            .unwrap()
            .iter()
            .filter(|s| words.contains(s.as_str()) || (s.len() > 16 && full.contains(s.as_str())))
            .cloned()
            .collect()
    }

    /// A gRPC client on the daemon's socket (the caller is this test process, root in CI).
    pub async fn client(&self) -> GuardClient<Channel> {
        GuardClient::new(
            proto::connect(&self.socket, Duration::from_secs(5))
                .await
                .expect("connect to guardd"),
        )
    }

    /// Enrolls `user` and confirms the token, returning its secret. The confirmation uses the
    /// previous time step's code, so the current and next steps remain free for logins.
    pub async fn enroll_active(&self, user: &str) -> Secret {
        let mut client = self.client().await;
        let reply = client
            .enroll(EnrollRequest {
                user: user.into(),
                label: "test".into(),
                ..EnrollRequest::default()
            })
            .await
            .expect("enroll")
            .into_inner();
        let secret = Secret::from_uri(&reply.uri);
        self.remember(&reply.uri);
        self.remember(&secret.base32());
        let token: Token = client
            .confirm(ConfirmRequest {
                user: user.into(),
                code: secret.code_at(-30).into_bytes(),
            })
            .await
            .expect("confirm")
            .into_inner()
            .token
            .unwrap();
        assert_eq!(token.state, "active");
        secret
    }

    /// Enrolls `user` with an HOTP token, confirmed with counter 0, and returns its secret: the
    /// next codes are counters 1, 2, ... (many logins without waiting for a TOTP step).
    pub async fn enroll_hotp(&self, user: &str) -> Secret {
        let (secret, _) = self
            .enroll(EnrollRequest {
                user: user.into(),
                kind: "hotp".into(),
                ..EnrollRequest::default()
            })
            .await;
        self.remember(&secret.hotp(0));
        self.client()
            .await
            .confirm(ConfirmRequest {
                user: user.into(),
                code: secret.hotp(0).into_bytes(),
            })
            .await
            .expect("confirm the HOTP token");
        secret
    }

    /// Enrolls a pending token with these options and returns its secret and URI.
    pub async fn enroll(&self, request: EnrollRequest) -> (Secret, String) {
        let uri = self
            .client()
            .await
            .enroll(request)
            .await
            .expect("enroll")
            .into_inner()
            .uri;
        let secret = Secret::from_uri(&uri);
        self.remember(&uri);
        self.remember(&secret.base32());
        (secret, uri)
    }

    /// Issues `user` a set of backup codes (remembered as secrets).
    pub async fn backup_codes(&self, user: &str) -> Vec<String> {
        let codes = self
            .client()
            .await
            .issue_backup_codes(BackupCodesRequest { user: user.into() })
            .await
            .expect("backup codes")
            .into_inner()
            .codes;
        for c in &codes {
            self.remember(c);
            self.remember(&c.replace('-', ""));
        }
        codes
    }

    /// One whole login through the daemon: Begin, then answer the prompt with `code`.
    pub async fn login(&self, user: &str, code: &str) -> Step {
        self.remember(code);
        login_with(&mut self.client().await, user, code)
            .await
            .expect("login")
    }
}

/// A JSON value as text: a string as it is, anything else as JSON.
pub fn text_of(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// The audit events of a guardd log, whose lines are JSON objects outside journald
/// (docs/operating.md#audit-events): the objects with target `audit`.
pub fn audit_events(log: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    log.lines()
        .filter_map(|line| match serde_json::from_str(line) {
            Ok(serde_json::Value::Object(map)) if map["target"] == "audit" => Some(map),
            _ => None,
        })
        .collect()
}

/// Whether some audit event of `log` has all these fields with these values (compared as text,
/// so a uid is given as its digits).
pub fn audited(log: &str, fields: &[(&str, &str)]) -> bool {
    audit_events(log).iter().any(|event| {
        fields
            .iter()
            .all(|(k, v)| event.get(*k).is_some_and(|value| text_of(value) == *v))
    })
}

/// Begin (service `test`), then answer the prompt with `code` on `client`; the step that ends
/// the login, or the call's error (tests that stop guardd in the middle).
pub async fn login_with(
    client: &mut GuardClient<Channel>,
    user: &str,
    code: &str,
) -> Result<Step, tonic::Status> {
    let step = client
        .begin(BeginRequest {
            context: Some(LoginContext {
                user: user.into(),
                service: "test".into(),
                ..LoginContext::default()
            }),
        })
        .await?
        .into_inner();
    let Some(step::Kind::Prompt(prompt)) = step.kind else {
        return Ok(step);
    };
    Ok(client
        .answer(AnswerRequest {
            challenge: prompt.challenge,
            response: code.as_bytes().to_vec(),
        })
        .await?
        .into_inner())
}

/// A guardd child process on a scratch socket and database.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub guard: Guard,
    child: Option<Child>,
    /// Extra guardd.toml lines.
    config: String,
    /// A store shared with other daemons, instead of a SQLite file of its own.
    shared: Option<SharedStore>,
}

/// A store several daemons share (a fleet): a database URL and the key file every host holds.
#[derive(Clone)]
pub struct SharedStore {
    pub url: String,
    pub key_file: PathBuf,
}

impl SharedStore {
    /// A fresh database in the test run's PostgreSQL cluster, with its key file in `dir`.
    pub fn postgres(cluster: &pgtemp::Cluster, dir: &Path) -> SharedStore {
        SharedStore {
            url: cluster.database(),
            key_file: dir.join("fleet.key"),
        }
    }
}

impl std::ops::Deref for Daemon {
    type Target = Guard;
    fn deref(&self) -> &Guard {
        &self.guard
    }
}

impl Daemon {
    /// A copy of `exe` in the daemon's 0755 scratch dir, so another uid may run it wherever
    /// the checkout lives.
    pub fn world_executable_copy(&self, exe: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let copy = self.dir.path().join(exe.file_name().unwrap());
        if !copy.exists() {
            std::fs::copy(exe, &copy).unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        copy
    }

    /// `guardctl ARGS` on this daemon as `runner` (None: root), typing `lines` (remembered as
    /// secrets); whether it succeeded, and its stdout and stderr.
    pub fn guardctl_as(
        &self,
        runner: Option<&str>,
        args: &[&str],
        lines: &[&str],
    ) -> (bool, String) {
        let out = self.guardctl_output(runner, args, lines);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// As [`Daemon::guardctl_as`], for a test that checks the exit status or stdout alone.
    pub fn guardctl_output(
        &self,
        runner: Option<&str>,
        args: &[&str],
        lines: &[&str],
    ) -> std::process::Output {
        use std::io::Write;
        let guardctl = self.world_executable_copy(&artefact("guardctl"));
        let mut cmd = match runner {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(guardctl);
                c
            }
            None => Command::new(guardctl),
        };
        cmd.arg("--socket").arg(&self.socket).args(args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The copy was just written: a child another test forks meanwhile holds its descriptor
        // until that child's exec, and running it then fails with ETXTBSY for a moment.
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                spawned => break spawned.unwrap(),
            }
        };
        let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
        let out = child.wait_with_output().unwrap();
        for l in lines {
            self.remember(l);
        }
        out
    }

    /// Starts guardd and waits until its socket accepts connections.
    pub fn start() -> Daemon {
        Daemon::with_rules(STRICT_RULES)
    }

    /// Starts guardd with these rules (in `rules.toml` of its scratch dir).
    pub fn with_rules(rules: &str) -> Daemon {
        Daemon::with_config(rules, "max_tries = 1\n")
    }

    /// Starts guardd with these rules and these extra lines of guardd.toml.
    pub fn with_config(rules: &str, config: &str) -> Daemon {
        Daemon::on_store(rules, config, None)
    }

    /// Starts guardd with these rules and guardd.toml lines on `shared` (None: its own SQLite
    /// file). Give each daemon of a fleet its own `host = "..."` line.
    pub fn on_store(rules: &str, config: &str, shared: Option<&SharedStore>) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("soffid-otp-test")
            .tempdir()
            .expect("tempdir");
        // Other uids (setpriv tests) must reach the socket inside.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let socket = dir.path().join("run/guardd.sock");
        let mut daemon = Daemon {
            guard: Guard::new(socket),
            child: None,
            dir,
            config: String::new(),
            shared: shared.cloned(),
        };
        daemon.config = config.to_owned();
        write_rules(daemon.dir.path(), rules);
        daemon.spawn();
        daemon
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("guardd.log"))
            .unwrap();
        let (database, key_file) = match &self.shared {
            Some(shared) => (shared.url.clone(), shared.key_file.clone()),
            None => (
                self.dir.path().join("lib/guardd.db").display().to_string(),
                self.dir.path().join("etc/guardd.key"),
            ),
        };
        let child = Command::new(artefact("guardd"))
            .arg("--config")
            .arg(self.write_config())
            .arg("--socket")
            .arg(&self.socket)
            .arg("--database")
            .arg(database)
            .arg("--key-file")
            .arg(key_file)
            .arg("--policy")
            .arg(self.dir.path().join("rules.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn guardd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "guardd did not start; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn write_config(&self) -> PathBuf {
        let path = self.dir.path().join("guardd.toml");
        // Tests about tokens use one try per login, so each wrong answer is one visible deny.
        std::fs::write(
            &path,
            format!(
                "admin_group = \"soffid-otp-test-admins\"\nissuer = \"test\"\n{}",
                self.config
            ),
        )
        .unwrap();
        path
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("guardd.log")).unwrap_or_default()
    }

    /// Stops and starts guardd again on the same socket and database.
    pub fn restart(&mut self) {
        assert!(
            self.stop(),
            "guardd did not exit cleanly; log:\n{}",
            self.log()
        );
        self.spawn();
    }

    /// Kills guardd at once (SIGKILL), as a crash would, and starts it again.
    pub fn crash_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.spawn();
    }

    /// Sends SIGTERM and waits; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = nix::sys::signal::kill(self.pid_of(&child), nix::sys::signal::SIGCONT);
        let _ = nix::sys::signal::kill(self.pid_of(&child), nix::sys::signal::SIGTERM);
        child.wait().map(|s| s.success()).unwrap_or(false)
    }

    fn pid_of(&self, child: &Child) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(child.id() as i32)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if !std::thread::panicking() {
            let leaked = self.guard.leaked_into(&self.log());
            assert!(
                leaked.is_empty(),
                "guardd logged secrets or codes: {leaked:?}"
            );
        }
    }
}

/// A token secret taken from its otpauth:// URI, to compute codes like a phone would.
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn from_uri(uri: &str) -> Secret {
        let b32 = uri
            .split(['?', '&'])
            .find_map(|kv| kv.strip_prefix("secret="))
            .expect("secret in uri");
        Secret(data_encoding::BASE32_NOPAD.decode(b32.as_bytes()).unwrap())
    }

    /// The secret as the URI carries it.
    pub fn base32(&self) -> String {
        data_encoding::BASE32_NOPAD.encode(&self.0)
    }

    /// The secret in hex, as pam_oath's users file carries it.
    pub fn hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }

    /// The code shown `offset` seconds from now.
    ///
    /// Never within 2 s of the end of a 30 s step: a code typed at the end of a step and checked
    /// in the next one is accepted with a drift of -1, which guardd then keeps, and a test's
    /// next `code_at(30)` would fall outside the window (a flake a CI run met). A person's phone
    /// shows the current step, so this only keeps tests away from the edge.
    pub fn code_at(&self, offset: i64) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let into_step = now.as_millis() % 30_000;
        let now = if into_step > 28_000 {
            let wait = Duration::from_millis((30_000 - into_step) as u64 + 100);
            std::thread::sleep(wait);
            now + wait
        } else {
            now
        };
        self.code_at_time((now.as_secs() as i64 + offset) as u64)
    }

    /// The code shown at Unix time `time`.
    pub fn code_at_time(&self, time: u64) -> String {
        otp::totp_code(&self.0, OtpParams::default(), time).unwrap()
    }

    /// The HOTP code for `counter`.
    pub fn hotp(&self, counter: u64) -> String {
        otp::code_for(&self.0, otp::Kind::Hotp, OtpParams::default(), counter).unwrap()
    }

    /// A well-formed code that matches no step near now.
    pub fn wrong_code(&self) -> String {
        let near: Vec<String> = (-3..=3).map(|k| self.code_at(k * 30)).collect();
        (0..)
            .map(|i: u32| format!("{:06}", (i * 137_137) % 1_000_000))
            .find(|c| !near.contains(c))
            .unwrap()
    }
}

pub fn is_permit(step: &Step) -> bool {
    matches!(step.kind, Some(step::Kind::Permit(_)))
}

pub fn is_deny(step: &Step) -> bool {
    matches!(step.kind, Some(step::Kind::Deny(_)))
}

/// A PAM service folder for pam_wrapper, with `service` stacking the built module.
pub struct PamServices {
    pub dir: tempfile::TempDir,
}

impl PamServices {
    pub fn new(service: &str, stack: &str) -> PamServices {
        let dir = tempfile::Builder::new()
            .prefix("soffid-otp-pam")
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join(service), stack).unwrap();
        std::fs::write(dir.path().join("other"), "auth required pam_deny.so\n").unwrap();
        PamServices { dir }
    }

    /// The module line for `auth required <built module> <args>`.
    pub fn module_line(args: &str) -> String {
        format!(
            "auth required {} {args}\n",
            artefact("libpam_soffid_otp.so").display()
        )
    }

    /// Runs `pamtester <service> <user> authenticate` under pam_wrapper, feeding `input`.
    /// One at a time per test process: pam_wrapper hands each process a /tmp/pam.X folder from a
    /// small pool, and concurrent start-ups can race for it ("no default config other").
    pub fn pamtester(&self, service: &str, user: &str, input: &str) -> Output {
        self.pamtester_op(service, user, "authenticate", input)
    }

    /// Runs `pamtester <service> <user> <operation>` (e.g. `acct_mgmt`) under pam_wrapper.
    pub fn pamtester_op(&self, service: &str, user: &str, operation: &str, input: &str) -> Output {
        self.run_pamtester(None, service, user, operation, input)
    }

    /// As [`PamServices::pamtester`], run by the user `runner` (through runuser): the module
    /// then calls guardd as that uid, as a screen locker would.
    pub fn pamtester_as(&self, runner: &str, service: &str, user: &str, input: &str) -> Output {
        self.run_pamtester(Some(runner), service, user, "authenticate", input)
    }

    fn run_pamtester(
        &self,
        runner: Option<&str>,
        service: &str,
        user: &str,
        operation: &str,
        input: &str,
    ) -> Output {
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let wrapper = [
            ("LD_PRELOAD", "libpam_wrapper.so".into()),
            ("PAM_WRAPPER", "1".into()),
            (
                "PAM_WRAPPER_SERVICE_DIR",
                self.dir.path().display().to_string(),
            ),
        ];
        let mut cmd = match runner {
            // runuser resets the environment: the wrapper's variables go through env(1).
            Some(runner) => {
                let mut c = Command::new("runuser");
                c.args(["-u", runner, "--", "env"])
                    .args(wrapper.iter().map(|(k, v)| format!("{k}={v}")))
                    .arg("pamtester");
                c
            }
            None => {
                let mut c = Command::new("pamtester");
                c.envs(wrapper);
                c
            }
        };
        cmd.args(["-v", service, user, operation]);
        feed(cmd, input)
    }
}

/// Runs `pamtester <service> <user> authenticate` with the system's libpam and /etc/pam.d
/// (root writes the service file), feeding `input`.
pub fn system_pamtester(service: &str, user: &str, input: &str) -> Output {
    let mut cmd = Command::new("pamtester");
    cmd.args([service, user, "authenticate"])
        .env_remove("LD_PRELOAD");
    feed(cmd, input)
}

/// Runs `cmd` with `input` on its standard input; returns its output.
pub fn feed(mut cmd: Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pamtester (apt-get install pamtester libpam-wrapper)");
    use std::io::Write;
    let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    child.wait_with_output().unwrap()
}

/// guardd served inside the test process on a clock the test moves: for back-off timing and
/// many logins per 30 s. Only the library allows this; the guardd binary always uses real time.
pub struct InProcess {
    pub dir: tempfile::TempDir,
    pub guard: Guard,
    /// The Unix time guardd sees.
    pub time: Arc<std::sync::atomic::AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::ops::Deref for InProcess {
    type Target = Guard;
    fn deref(&self) -> &Guard {
        &self.guard
    }
}

impl InProcess {
    /// Starts serving with `config` (socket, database and key file are set here).
    pub async fn start(mut config: guardd::config::Config) -> InProcess {
        let dir = tempfile::tempdir().unwrap();
        config.socket = dir.path().join("guardd.sock");
        config.database = dir.path().join("guardd.db").into();
        config.key_file = dir.path().join("guardd.key");
        config.max_tries = 1;
        if config.policy.is_none() {
            config.policy = Some(write_rules(dir.path(), STRICT_RULES));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let time = Arc::new(std::sync::atomic::AtomicU64::new(now));
        let t = time.clone();
        let clock =
            guardd::service::Clock::from_fn(move || t.load(std::sync::atomic::Ordering::SeqCst));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let socket = config.socket.clone();
        tokio::spawn(guardd::server::run_with_clock(config, clock, async {
            let _ = stopped.await;
        }));
        while tokio::net::UnixStream::connect(&socket).await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        InProcess {
            dir,
            guard: Guard::new(socket),
            time,
            stop: Some(stop),
        }
    }

    /// Moves guardd's clock by `seconds`.
    pub fn advance(&self, seconds: u64) {
        self.time
            .fetch_add(seconds, std::sync::atomic::Ordering::SeqCst);
    }

    /// guardd's current time.
    pub fn now(&self) -> u64 {
        self.time.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A stand-in for a guardd that is running but failing: every call, whatever it asks, is answered
/// with the same gRPC status (RESOURCE_EXHAUSTED is what guardd answers when it is overloaded). It
/// has none of the daemon's logic; it exists to show what a client does when guardd fails. Served
/// on its own thread and runtime, so sync tests can use it; stopped on drop.
pub struct FailingGuard {
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FailingGuard {
    /// Starts answering every call with `code`, and returns once the socket accepts connections.
    pub fn start(code: tonic::Code) -> FailingGuard {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("failing.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::UnixListener::from_std(listener).unwrap();
                tonic::transport::Server::builder()
                    .add_service(proto::v1::guard_server::GuardServer::new(Failing(code)))
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::UnixListenerStream::new(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await
                    .unwrap();
            });
        });
        FailingGuard {
            socket,
            _dir: dir,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for FailingGuard {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Every call fails with this status code.
struct Failing(tonic::Code);

impl Failing {
    fn fail<T>(&self) -> Result<tonic::Response<T>, tonic::Status> {
        Err(tonic::Status::new(self.0, "test double: guardd is failing"))
    }
}

#[tonic::async_trait]
impl proto::v1::guard_server::Guard for Failing {
    async fn open_session(
        &self,
        _: tonic::Request<BeginRequest>,
    ) -> Result<tonic::Response<proto::v1::OpenSessionReply>, tonic::Status> {
        self.fail()
    }
    async fn forget(
        &self,
        _: tonic::Request<proto::v1::ForgetRequest>,
    ) -> Result<tonic::Response<proto::v1::ForgetReply>, tonic::Status> {
        self.fail()
    }
    async fn begin(
        &self,
        _: tonic::Request<BeginRequest>,
    ) -> Result<tonic::Response<Step>, tonic::Status> {
        self.fail()
    }
    async fn answer(
        &self,
        _: tonic::Request<AnswerRequest>,
    ) -> Result<tonic::Response<Step>, tonic::Status> {
        self.fail()
    }
    async fn check(
        &self,
        _: tonic::Request<BeginRequest>,
    ) -> Result<tonic::Response<Step>, tonic::Status> {
        self.fail()
    }
    async fn recover(
        &self,
        _: tonic::Request<v1::RecoverRequest>,
    ) -> Result<tonic::Response<Step>, tonic::Status> {
        self.fail()
    }
    async fn enroll(
        &self,
        _: tonic::Request<EnrollRequest>,
    ) -> Result<tonic::Response<v1::EnrollReply>, tonic::Status> {
        self.fail()
    }
    async fn confirm(
        &self,
        _: tonic::Request<ConfirmRequest>,
    ) -> Result<tonic::Response<v1::ConfirmReply>, tonic::Status> {
        self.fail()
    }
    async fn list(
        &self,
        _: tonic::Request<v1::ListRequest>,
    ) -> Result<tonic::Response<v1::ListReply>, tonic::Status> {
        self.fail()
    }
    async fn delete(
        &self,
        _: tonic::Request<v1::DeleteRequest>,
    ) -> Result<tonic::Response<v1::DeleteReply>, tonic::Status> {
        self.fail()
    }
    async fn set_enabled(
        &self,
        _: tonic::Request<v1::SetEnabledRequest>,
    ) -> Result<tonic::Response<v1::TokenReply>, tonic::Status> {
        self.fail()
    }
    async fn resync(
        &self,
        _: tonic::Request<v1::ResyncRequest>,
    ) -> Result<tonic::Response<v1::TokenReply>, tonic::Status> {
        self.fail()
    }
    async fn unlock(
        &self,
        _: tonic::Request<v1::UnlockRequest>,
    ) -> Result<tonic::Response<v1::UnlockReply>, tonic::Status> {
        self.fail()
    }
    async fn issue_backup_codes(
        &self,
        _: tonic::Request<BackupCodesRequest>,
    ) -> Result<tonic::Response<v1::BackupCodesReply>, tonic::Status> {
        self.fail()
    }
    async fn explain(
        &self,
        _: tonic::Request<v1::ExplainRequest>,
    ) -> Result<tonic::Response<v1::ExplainReply>, tonic::Status> {
        self.fail()
    }
    async fn reload(
        &self,
        _: tonic::Request<v1::ReloadRequest>,
    ) -> Result<tonic::Response<v1::ReloadReply>, tonic::Status> {
        self.fail()
    }
    async fn status(
        &self,
        _: tonic::Request<v1::StatusRequest>,
    ) -> Result<tonic::Response<v1::StatusReply>, tonic::Status> {
        self.fail()
    }
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4), for tests that speak HTTP/2 by hand.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One HTTP/2 frame: its 9-byte header and payload.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// A gRPC message: the prefix (not compressed, the length) and the bytes.
pub fn grpc_message(message: &[u8]) -> Vec<u8> {
    let mut framed = vec![0];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    framed
}

#[cfg(test)]
mod tests {
    use super::Guard;

    #[test]
    fn leak_check_finds_codes_and_secrets_but_not_timestamps_or_pids() {
        let g = Guard::new("/x".into());
        g.remember("123456");
        g.remember("abcde-fghjk");
        g.remember("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP");
        let clean = "2026-11-29T00:51:01.123456Z  INFO audit: caller_pid=123456 token=\"a1\"";
        assert!(g.leaked_into(clean).is_empty());
        let dirty =
            "2026 INFO x: code=123456 backup=\"abcde-fghjk\" s=xJBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";
        assert_eq!(g.leaked_into(dirty).len(), 3);
        let clean = r#"{"timestamp":"123456","caller_pid":123456,"target":"audit","token":"a1"}"#;
        assert!(g.leaked_into(clean).is_empty());
        let dirty = r#"{"timestamp":"t","message":"code 123456","x":"abcde-fghjk","n":1}"#;
        assert_eq!(g.leaked_into(dirty).len(), 2);
    }
}
