//! Layer 3: the built module loaded by the system's libpam through pam_wrapper and pamtester.

use std::process::Command;
use std::time::{Duration, Instant};

use harness::{artefact, Daemon, FailingGuard, PamServices};

const UNAVAILABLE: &str = "Authentication service cannot retrieve authentication info";

fn stack(socket: &std::path::Path, timeout: &str) -> PamServices {
    PamServices::new(
        "otp-test",
        &PamServices::module_line(&format!("socket={} timeout={timeout}", socket.display())),
    )
}

/// `failmode=safe` with pam_permit after it: the login passes exactly when the module steps aside
/// (PAM_IGNORE), and is refused when the module fails closed. The account stack is the same.
fn safe_stack(socket: &std::path::Path, timeout: &str) -> PamServices {
    let args = format!(
        "socket={} timeout={timeout} failmode=safe",
        socket.display()
    );
    let auth = PamServices::module_line(&args);
    let account = auth.replacen("auth ", "account ", 1);
    PamServices::new(
        "otp-test",
        &format!("{auth}auth required pam_permit.so\n{account}account required pam_permit.so\n"),
    )
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_code_succeeds_and_wrong_or_replayed_code_fails() {
    let d = Daemon::start();
    let secret = d.enroll_active("daemon").await;
    let pam = stack(&d.socket, "5");

    let wrong = pam.pamtester("otp-test", "daemon", &format!("{}\n", secret.wrong_code()));
    assert_eq!(wrong.status.code(), Some(1), "{}", text(&wrong));
    assert!(text(&wrong).contains("Authentication failure"));

    let code = secret.code_at(0);
    let right = pam.pamtester("otp-test", "daemon", &format!("{code}\n"));
    assert!(right.status.success(), "{}\n{}", text(&right), d.log());
    assert!(text(&right).contains("Verification code"));

    let replay = pam.pamtester("otp-test", "daemon", &format!("{code}\n"));
    assert_eq!(replay.status.code(), Some(1), "{}", text(&replay));

    // What libpam told the daemon about the login.
    assert!(
        harness::audited(&d.log(), &[("service", "otp-test")]),
        "{}",
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_without_token_is_refused_with_a_message() {
    let d = Daemon::start();
    let pam = stack(&d.socket, "5");
    let out = pam.pamtester("otp-test", "bin", "");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("none is set up"), "{}", text(&out));
}

#[test]
fn daemon_not_running_is_authinfo_unavail_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let pam = stack(&dir.path().join("absent.sock"), "60");
    let started = Instant::now();
    let out = pam.pamtester("otp-test", "daemon", "123456\n");
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains(UNAVAILABLE), "{}", text(&out));
    // Fail fast: nowhere near the 60 s timeout (a loaded machine may be slow, not that slow).
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn stopped_daemon_fails_after_the_timeout_without_hanging() {
    let d = Daemon::start();
    let pam = stack(&d.socket, "1");
    nix::sys::signal::kill(d.pid(), nix::sys::signal::SIGSTOP).unwrap();
    let started = Instant::now();
    let out = pam.pamtester("otp-test", "daemon", "123456\n");
    let took = started.elapsed();
    nix::sys::signal::kill(d.pid(), nix::sys::signal::SIGCONT).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains(UNAVAILABLE), "{}", text(&out));
    assert!(
        took >= Duration::from_millis(900),
        "gave up before the timeout: {took:?}"
    );
    // A hang would never end; a loaded machine may be slow.
    assert!(took < Duration::from_secs(20), "hung: {took:?}");
}

#[test]
fn malformed_module_arguments_keep_secure_defaults() {
    let dir = tempfile::tempdir().unwrap();
    // The socket argument is dropped as malformed; the default socket is absent here or in CI
    // unless guardd is installed, and in both cases no login may pass without a code.
    let pam = PamServices::new(
        "otp-test",
        &PamServices::module_line(&format!(
            "socket=relative timeout=banana socket={}",
            dir.path().join("absent.sock").display()
        )),
    );
    let out = pam.pamtester("otp-test", "daemon", "123456\n");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn only_the_six_pam_entry_points_are_exported() {
    let out = Command::new("nm")
        .args(["-D", "--defined-only", "--format=posix"])
        .arg(artefact("libpam_soffid_otp.so"))
        .output()
        .expect("nm (binutils)");
    assert!(out.status.success());
    let mut symbols: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    symbols.sort();
    assert_eq!(
        symbols,
        [
            "pam_sm_acct_mgmt",
            "pam_sm_authenticate",
            "pam_sm_chauthtok",
            "pam_sm_close_session",
            "pam_sm_open_session",
            "pam_sm_setcred"
        ]
    );
}

/// A panic inside the module is caught at its FFI edge (PAM_ABORT) and the host lives on. The
/// module carries its own unwinder (libgcc's, linked statically; see its build.rs) instead of
/// loading libgcc_s, which pamtester, sshd and sudo do not load themselves: this is the test
/// that the unwinder it carries works in a host that has no other. The fault point exists in
/// debug builds only.
#[test]
fn a_panic_in_the_module_is_caught_by_its_own_unwinder_and_the_host_lives_on() {
    use std::os::unix::process::ExitStatusExt;
    let module = artefact("libpam_soffid_otp.so");
    let dynamic = Command::new("readelf")
        .arg("-d")
        .arg(&module)
        .output()
        .expect("readelf (binutils)");
    let dynamic = String::from_utf8_lossy(&dynamic.stdout);
    assert!(dynamic.contains("(NEEDED)"), "{dynamic}");
    assert!(!dynamic.contains("libgcc_s"), "{dynamic}");
    let host = Command::new("ldd")
        .arg(which("pamtester"))
        .output()
        .expect("ldd");
    assert!(!String::from_utf8_lossy(&host.stdout).contains("libgcc_s"));

    let pam = PamServices::new(
        "otp-test",
        &PamServices::module_line("socket=/nonexistent debug_panic"),
    );
    for _ in 0..2 {
        let out = pam.pamtester("otp-test", "daemon", "");
        assert_eq!(out.status.signal(), None, "the host was killed: {out:?}");
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            text(&out).contains("Critical error - immediate abort"),
            "{}",
            text(&out)
        );
    }
}

/// A threaded host that cancels its authenticating thread while the module waits on a guardd
/// that never answers (`tests/fixtures/cancel_host.c`, built here with the system's cc and
/// libpam). glibc's forced unwind through the module's Rust frames would abort the whole host;
/// the module holds cancellation off while it runs, so the cancel lands after it returned.
#[test]
fn a_host_that_cancels_its_thread_inside_the_module_is_not_aborted() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("cancel_host");
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/cancel_host.c");
    let built = Command::new("cc")
        .arg(&source)
        .arg("-o")
        .arg(&host)
        .args(["-lpam", "-pthread"])
        .output()
        .expect("cc");
    assert!(built.status.success(), "{}", text(&built));
    let socket = dir.path().join("silent.sock");
    silent_guardd(&socket);
    let pam = stack(&socket, "2");
    let started = Instant::now();
    let out = Command::new(&host)
        .arg(pam.dir.path())
        .args(["otp-test", "daemon"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        None,
        "the host was killed: {}",
        text(&out)
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("joined cancelled"), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A guardd at `socket` that accepts connections and never answers, for the life of the test.
fn silent_guardd(socket: &std::path::Path) {
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            held.push(conn);
        }
    });
}

/// The path of `program` on PATH.
fn which(program: &str) -> std::path::PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} is not on PATH"))
}

/// A daemon (or an impostor) that hangs up in the middle of the HTTP/2 handshake: the module's
/// next write meets a closed socket. That must be an error, never a SIGPIPE that kills the host
/// process (pamtester, like many hosts, keeps SIGPIPE's default action).
#[test]
fn a_daemon_that_hangs_up_mid_handshake_does_not_kill_the_host() {
    use std::io::{Read, Write};
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hangup.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            // Read the client's connection preface, answer with an empty SETTINGS frame (which
            // the client must acknowledge), and hang up.
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while got.len() < 24 {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        }
    });
    let pam = stack(&socket, "5");
    for _ in 0..3 {
        let out = pam.pamtester("otp-test", "daemon", "");
        assert_eq!(out.status.signal(), None, "the host was killed: {out:?}");
        assert!(text(&out).contains(UNAVAILABLE), "{}", text(&out));
    }
}

/// failmode=safe steps aside only when no guardd is running: no socket file at all, or a socket
/// file nobody listens on (guardd died and left it behind: connect(2) says ECONNREFUSED).
#[test]
fn safe_mode_steps_aside_when_guardd_is_absent() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.sock");
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    for socket in [&missing, &stale] {
        // Stepping aside must not wait for the module's timeout: a generous one, so that only
        // waiting for it (not a slow, loaded machine) can fail the bound below.
        let pam = safe_stack(socket, "60");
        let started = Instant::now();
        let out = pam.pamtester("otp-test", "daemon", "");
        assert!(out.status.success(), "{}: {}", socket.display(), text(&out));
        assert!(!text(&out).contains("Verification code"), "{}", text(&out));
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "waited {:?}: as long as the timeout?",
            started.elapsed()
        );
        let out = pam.pamtester_op("otp-test", "daemon", "acct_mgmt", "");
        assert!(out.status.success(), "{}: {}", socket.display(), text(&out));
    }
}

/// A guardd whose listen backlog is full (any local user can fill it) makes connect(2) fail with
/// EAGAIN. guardd is there, so this is an outage to refuse, not an absence to step aside for.
#[test]
fn safe_mode_refuses_when_the_listen_backlog_is_full() {
    use nix::errno::Errno;
    use nix::sys::socket::{connect, listen, socket, AddressFamily, Backlog, SockFlag};
    use nix::sys::socket::{SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.sock");
    // Bound and listening, never accepting, with the smallest backlog; then filled.
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    listen(&listener, Backlog::new(0).unwrap()).unwrap();
    let addr = UnixAddr::new(&path).unwrap();
    let mut queued = Vec::new();
    loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => queued.push(fd),
            Err(Errno::EAGAIN) => break,
            Err(e) => panic!("filling the backlog: {e}"),
        }
        assert!(queued.len() < 16, "the backlog never filled");
    }
    let pam = safe_stack(&path, "2");
    let out = pam.pamtester("otp-test", "daemon", "");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(UNAVAILABLE), "{}", text(&out));
    let out = pam.pamtester_op("otp-test", "daemon", "acct_mgmt", "");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    drop((listener, queued));
}

/// A socket that accepts connections but never says a word: refused once `timeout=` has passed.
#[test]
fn safe_mode_refuses_a_daemon_that_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("silent.sock");
    silent_guardd(&socket);
    let pam = safe_stack(&socket, "1");
    let started = Instant::now();
    let out = pam.pamtester("otp-test", "daemon", "");
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(UNAVAILABLE), "{}", text(&out));
    assert!(
        took >= Duration::from_millis(900),
        "gave up early: {took:?}"
    );
    // A hang would never end; a loaded machine may be slow.
    assert!(took < Duration::from_secs(20), "hung: {took:?}");
}

/// A guardd that answers with an error status (overloaded, unavailable, broken): refused in
/// failmode=safe too, in the auth and the account stack.
#[test]
fn safe_mode_refuses_a_daemon_that_answers_with_an_error() {
    for code in [
        tonic::Code::ResourceExhausted,
        tonic::Code::Unavailable,
        tonic::Code::Internal,
    ] {
        let failing = FailingGuard::start(code);
        let pam = safe_stack(&failing.socket, "5");
        let out = pam.pamtester("otp-test", "daemon", "");
        assert_eq!(out.status.code(), Some(1), "{code:?}: {}", text(&out));
        assert!(text(&out).contains(UNAVAILABLE), "{code:?}: {}", text(&out));
        let out = pam.pamtester_op("otp-test", "daemon", "acct_mgmt", "");
        assert_eq!(out.status.code(), Some(1), "{code:?}: {}", text(&out));
    }
}
