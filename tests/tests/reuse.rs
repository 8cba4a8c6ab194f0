//! Reuse grants through the built module and a real guardd (pam_wrapper + pamtester): the
//! window runs out, a grant survives a restart of guardd, and a caller without root's rights
//! never makes or uses one. With sshd and sudo: tests/tests/e2e.rs.

use std::process::Output;
use std::time::{Duration, Instant};

use harness::{Daemon, PamServices};

/// An OTP on `reuse-*` services, reused for `WINDOW` on the same service and host.
const RULES: &str = r#"
version = 1
default = "deny"

[[rule]]
id = "reuse-test"
effect = "otp"
unenrolled = "deny"
reuse = "4s"
reuse_scope = ["service", "host"]
match = { service = ["reuse-*"] }
"#;
const WINDOW: Duration = Duration::from_secs(4);

fn stacks(d: &Daemon) -> PamServices {
    let line = PamServices::module_line(&format!("socket={} timeout=5", d.socket.display()));
    let pam = PamServices::new("reuse-a", &line);
    std::fs::write(pam.dir.path().join("reuse-b"), &line).unwrap();
    // Other uids (the as_root cases) read the stacks too.
    std::fs::set_permissions(
        pam.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    pam
}

fn prompted(out: &Output) -> bool {
    String::from_utf8_lossy(&out.stderr).contains("Verification code")
        || String::from_utf8_lossy(&out.stdout).contains("Verification code")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_lets_logins_in_until_its_window_ends_and_survives_a_restart() {
    let mut d = Daemon::with_rules(RULES);
    let secret = d.enroll_active("daemon").await;
    let pam = stacks(&d);
    let code = secret.code_at(0);
    d.remember(&code);
    let proof = pam.pamtester("reuse-a", "daemon", &format!("{code}\n"));
    let proved = Instant::now();
    assert!(
        proof.status.success() && prompted(&proof),
        "{proof:?}\n{}",
        d.log()
    );

    let reused = pam.pamtester("reuse-a", "daemon", "");
    assert!(
        reused.status.success() && !prompted(&reused),
        "{reused:?}\n{}",
        d.log()
    );
    // Another service is outside the scope.
    let other = pam.pamtester("reuse-b", "daemon", "");
    assert!(!other.status.success() && prompted(&other), "{other:?}");

    // Grants are in the store: a crash of guardd keeps them.
    d.crash_and_restart();
    let after_restart = pam.pamtester("reuse-a", "daemon", "");
    assert!(
        after_restart.status.success() && !prompted(&after_restart),
        "{after_restart:?}\n{}",
        d.log()
    );
    assert!(
        proved.elapsed() < WINDOW,
        "too slow to test the window: {:?}",
        proved.elapsed()
    );

    std::thread::sleep(
        (proved + WINDOW + Duration::from_millis(300)).saturating_duration_since(Instant::now()),
    );
    let late = pam.pamtester("reuse-a", "daemon", "");
    assert!(!late.status.success() && prompted(&late), "{late:?}");
}

/// What a non-root caller cannot do with grants; needs root to run guardd as root and the
/// module as another uid.
mod as_root {
    use super::*;
    use harness::User;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root"]
    async fn a_caller_without_root_rights_never_makes_or_uses_a_grant() {
        assert!(harness::is_root());
        let d = Daemon::with_rules(RULES);
        let user = User::create();
        let secret = d.enroll_active(&user.name).await;
        let pam = stacks(&d);

        // The user's own process (a screen locker) proves a code: no grant comes of it.
        let code = secret.code_at(0);
        d.remember(&code);
        let own = pam.pamtester_as(&user.name, "reuse-a", &user.name, &format!("{code}\n"));
        assert!(
            own.status.success() && prompted(&own),
            "{own:?}\n{}",
            d.log()
        );
        let root_after = pam.pamtester("reuse-a", &user.name, "");
        assert!(
            !root_after.status.success() && prompted(&root_after),
            "{root_after:?}"
        );

        // Root's login makes one; the user's own process still gets no shortcut from it.
        let code = secret.code_at(30);
        d.remember(&code);
        let by_root = pam.pamtester("reuse-a", &user.name, &format!("{code}\n"));
        assert!(by_root.status.success(), "{by_root:?}\n{}", d.log());
        let own_after = pam.pamtester_as(&user.name, "reuse-a", &user.name, "");
        assert!(
            !own_after.status.success() && prompted(&own_after),
            "{own_after:?}"
        );
        let by_root_again = pam.pamtester("reuse-a", &user.name, "");
        assert!(
            by_root_again.status.success() && !prompted(&by_root_again),
            "{by_root_again:?}"
        );
    }
}
