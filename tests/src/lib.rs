//! Test harness: the built binaries, a real guardd on a scratch socket and database, enrolled
//! test tokens, and pamtester under pam_wrapper. Everything a test starts is stopped and
//! removed on drop, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guardd::otp::{self, OtpParams};
use proto::v1::guard_client::GuardClient;
use proto::v1::{step, AnswerRequest, BeginRequest, ConfirmRequest, EnrollRequest, LoginContext};
use proto::v1::{Step, Token};
use tonic::transport::Channel;

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

/// A guardd child process on a scratch socket and database.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts guardd and waits until its socket accepts connections.
    pub fn start() -> Daemon {
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
            socket,
            child: None,
            dir,
        };
        daemon.spawn();
        daemon
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("guardd.log")).unwrap();
        let child = Command::new(artefact("guardd"))
            .arg("--config")
            .arg(self.write_config())
            .arg("--socket")
            .arg(&self.socket)
            .arg("--database")
            .arg(self.dir.path().join("lib/guardd.db"))
            .arg("--key-file")
            .arg(self.dir.path().join("etc/guardd.key"))
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
        std::fs::write(
            &path,
            "admin_group = \"soffid-otp-test-admins\"\nissuer = \"test\"\n",
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

    /// One whole login through the daemon: Begin, then answer the prompt with `code`.
    pub async fn login(&self, user: &str, code: &str) -> Step {
        let mut client = self.client().await;
        let step = client
            .begin(BeginRequest {
                context: Some(LoginContext {
                    user: user.into(),
                    service: "test".into(),
                    ..LoginContext::default()
                }),
            })
            .await
            .expect("begin")
            .into_inner();
        let Some(step::Kind::Prompt(prompt)) = step.kind else {
            return step;
        };
        client
            .answer(AnswerRequest {
                challenge: prompt.challenge,
                response: code.as_bytes().to_vec(),
            })
            .await
            .expect("answer")
            .into_inner()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
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

    /// The code shown `offset` seconds from now.
    pub fn code_at(&self, offset: i64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        self.code_at_time((now + offset) as u64)
    }

    /// The code shown at Unix time `time`.
    pub fn code_at_time(&self, time: u64) -> String {
        otp::totp_code(&self.0, OtpParams::default(), time).unwrap()
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
    pub fn pamtester(&self, service: &str, user: &str, input: &str) -> Output {
        let mut child = Command::new("pamtester")
            .args(["-v", service, user, "authenticate"])
            .env("LD_PRELOAD", "libpam_wrapper.so")
            .env("PAM_WRAPPER", "1")
            .env("PAM_WRAPPER_SERVICE_DIR", self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pamtester (apt-get install pamtester libpam-wrapper)");
        use std::io::Write;
        let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
        child.wait_with_output().unwrap()
    }
}
