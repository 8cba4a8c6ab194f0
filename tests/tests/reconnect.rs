//! Layer 2: a conversation outlives its connection. guardd closes every connection
//! `proto::MAX_CONNECTION_AGE` after it was opened, and a person may take minutes to type a code;
//! the module's client opens a new connection before a call once its own is old, and the
//! conversation goes on under guardd's challenge id.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use harness::Daemon;
use pam_soffid_otp::client::GrpcDaemon;
use pam_soffid_otp::core::Daemon as _;
use proto::v1::{step, LoginContext, Step};
use zeroize::Zeroizing;

/// A Unix-socket relay in front of guardd that counts the connections made through it.
struct CountingRelay {
    socket: PathBuf,
    connections: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl CountingRelay {
    async fn start(to: &Path) -> CountingRelay {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("relay.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let (counted, to) = (connections.clone(), to.to_owned());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let to = to.clone();
                tokio::spawn(async move {
                    if let Ok(mut guardd) = tokio::net::UnixStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut guardd).await;
                    }
                });
            }
        });
        CountingRelay {
            socket,
            connections,
            _dir: dir,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn login(user: &str) -> LoginContext {
    LoginContext {
        user: user.into(),
        service: "test".into(),
        ..LoginContext::default()
    }
}

fn challenge(step: Step) -> String {
    match step.kind {
        Some(step::Kind::Prompt(prompt)) => prompt.challenge,
        other => panic!("expected a prompt, got {other:?}"),
    }
}

/// Begin, then (after `pause`) answer with `code`, through the module's client; the module runs
/// its own runtime, so it is driven from a blocking thread as it would be inside libpam.
async fn module_login(
    socket: &Path,
    reconnect_after: Option<Duration>,
    user: &'static str,
    code: String,
    pause: Duration,
) -> Step {
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut daemon = GrpcDaemon::connect(&socket, Duration::from_secs(5)).expect("connect");
        if let Some(age) = reconnect_after {
            daemon = daemon.reconnect_after(age);
        }
        let challenge = challenge(daemon.begin(login(user)).expect("begin"));
        std::thread::sleep(pause);
        daemon
            .answer(challenge, Zeroizing::new(code.into_bytes()))
            .expect("answer")
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_reconnects_when_its_connection_is_old() {
    let d = Daemon::start();
    let secret = d.enroll_active("daemon").await;
    let relay = CountingRelay::start(&d.socket).await;

    // A quick login keeps its one connection.
    let code = secret.code_at(0);
    d.remember(&code);
    let step = module_login(&relay.socket, None, "daemon", code, Duration::ZERO).await;
    assert!(harness::is_permit(&step), "{step:?}\n{}", d.log());
    assert_eq!(relay.connections(), 1);

    // A code typed after the threshold goes over a new connection, in the same conversation.
    let code = secret.code_at(30);
    d.remember(&code);
    let slow = Duration::from_millis(300);
    let step = module_login(&relay.socket, Some(slow), "daemon", code, slow * 2).await;
    assert!(harness::is_permit(&step), "{step:?}\n{}", d.log());
    assert_eq!(
        relay.connections(),
        3,
        "Begin on one connection, Answer on a new one"
    );
}

/// guardd was there when the conversation began: a reconnect that finds it stopped (its socket
/// removed) is a failure, which fails closed, never the absence that failmode=safe steps aside for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_that_finds_guardd_stopped_is_a_failure() {
    use pam_soffid_otp::core::DaemonError;
    let mut d = Daemon::start();
    let socket = d.socket.clone();
    let mut daemon = tokio::task::spawn_blocking(move || {
        let mut daemon = GrpcDaemon::connect(&socket, Duration::from_secs(5))
            .expect("connect")
            .reconnect_after(Duration::ZERO);
        daemon.check(login("daemon")).expect("check");
        daemon
    })
    .await
    .unwrap();
    assert!(d.stop(), "{}", d.log());
    assert!(!d.socket.exists());
    let error = tokio::task::spawn_blocking(move || daemon.check(login("daemon")))
        .await
        .unwrap()
        .expect_err("guardd is stopped");
    assert!(matches!(error, DaemonError::Failed(_)), "{error:?}");
}
