//! Self-service as a hostile local user would try it: a token must never become a password.
//! Self-enrolment needs the account's password (checked through a real /etc/pam.d service with
//! pam_unix) or an admin's single-use invitation, is one atomic step, and recovery never sets a
//! password on a locked account. As root in CI, with real local users and a real guardd.

/// Every test here needs root (real users, /etc/pam.d, other uids): a normal user's run reports
/// them as ignored; the README's test command runs them as root (`--ignored as_root`).
mod as_root {
    use std::process::Command;

    use harness::{Daemon, EtcFile, User};

    /// The shipped default rules: self-enrolment of a first token, an OTP for another.
    const RULES: &str = include_str!("../../packaging/rules.toml");

    struct Setup {
        d: Daemon,
        _pam: EtcFile,
    }

    fn setup() -> Setup {
        // One service file per test: tests run in parallel, and a shared name would be restored
        // by one test's clean-up to another's content and left behind.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let service = format!("otp-selfservice-{}-{n}", std::process::id());
        let pam = EtcFile::write(
            &format!("/etc/pam.d/{service}"),
            "auth required pam_unix.so\naccount required pam_unix.so\n",
            0o644,
        );
        let d = Daemon::with_config(RULES, &format!("password_service = \"{service}\"\n"));
        Setup { d, _pam: pam }
    }

    impl Setup {
        fn pending_tokens(&self, user: &str) -> usize {
            let (_, out) = self.d.guardctl_as(None, &["list", user], &[]);
            out.lines().filter(|l| l.contains("pending")).count()
        }
    }

    /// Code running as the user (a web shell, a cron job) cannot enrol a token without the password,
    /// so it cannot go on to mint a password with `guardctl recover`.
    #[test]
    #[ignore = "needs root"]
    fn self_enrolment_needs_the_password_and_wrong_ones_count() {
        let s = setup();
        let u = User::create_named("otpself");
        harness::set_password(&u.name, "Right-Pass-42");
        // No password typed: refused.
        let (ok, out) = s.d.guardctl_as(Some(&u.name), &["enroll"], &[""]);
        assert!(!ok && out.contains("password"), "{out}");
        // A wrong password: refused, and counted toward the back-off.
        let (ok, out) = s.d.guardctl_as(Some(&u.name), &["enroll"], &["wrong-pass"]);
        assert!(!ok && out.contains("password is wrong"), "{out}");
        assert_eq!(s.pending_tokens(&u.name), 0);
        // The right one: a pending token, shown to the user only.
        let (ok, out) =
            s.d.guardctl_as(Some(&u.name), &["enroll"], &["Right-Pass-42"]);
        assert!(ok && out.contains("otpauth://"), "{out}");
        assert_eq!(s.pending_tokens(&u.name), 1);
        // Enrolling again replaces the pending token rather than adding one.
        let (ok, _) =
            s.d.guardctl_as(Some(&u.name), &["enroll"], &["Right-Pass-42"]);
        assert!(ok);
        assert_eq!(s.pending_tokens(&u.name), 1);
        // Another user's account: refused whatever the password.
        let other = User::create_named("otpself");
        let (ok, out) =
            s.d.guardctl_as(Some(&other.name), &["enroll", &u.name], &["x"]);
        assert!(!ok && out.contains("permission denied"), "{out}");
        assert!(s.d.leaked_into(&s.d.log()).is_empty());
        assert!(!s.d.log().contains("Right-Pass-42"));
    }

    /// Wrong passwords are no oracle: after the free failures the check is not even run.
    #[test]
    #[ignore = "needs root"]
    fn password_guesses_stop_at_the_back_off() {
        let s = setup();
        let u = User::create_named("otpself");
        harness::set_password(&u.name, "Right-Pass-42");
        for _ in 0..5 {
            let (ok, _) = s.d.guardctl_as(Some(&u.name), &["enroll"], &["guess"]);
            assert!(!ok);
        }
        let (ok, out) =
            s.d.guardctl_as(Some(&u.name), &["enroll"], &["Right-Pass-42"]);
        assert!(!ok && out.contains("too many failed attempts"), "{out}");
    }

    /// Twenty enrolments at once by the user make one pending token, not several.
    #[test]
    #[ignore = "needs root"]
    fn parallel_self_enrolments_make_one_pending_token() {
        let s = setup();
        let u = User::create_named("otpself");
        harness::set_password(&u.name, "Right-Pass-42");
        std::thread::scope(|scope| {
            for _ in 0..20 {
                scope.spawn(|| {
                    s.d.guardctl_as(Some(&u.name), &["enroll"], &["Right-Pass-42"])
                });
            }
        });
        assert_eq!(s.pending_tokens(&u.name), 1);
    }

    /// `passwd -l` holds: no self-enrolment with a locked password, and no recovery that would set
    /// a new password on it, even for a user who holds a token.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root"]
    async fn a_locked_password_is_never_replaced_or_used_to_enrol() {
        let s = setup();
        let u = User::create_named("otpself");
        harness::set_password(&u.name, "Right-Pass-42");
        let secret = s.d.enroll_active(&u.name).await;
        harness::run(Command::new("passwd").args(["-l", &u.name]));
        let before = harness::shadow_hash(&u.name);
        // A user without a token whose password is locked cannot enrol with the old password.
        let fresh = User::create_named("otpself");
        harness::set_password(&fresh.name, "Right-Pass-42");
        harness::run(Command::new("passwd").args(["-l", &fresh.name]));
        let (ok, out) =
            s.d.guardctl_as(Some(&fresh.name), &["enroll"], &["Right-Pass-42"]);
        assert!(!ok && out.contains("locked"), "{out}");
        let code = secret.code_at(0);
        let (ok, out) = s.d.guardctl_as(
            Some(&u.name),
            &["recover"],
            &[&code, "New-Pass-77", "New-Pass-77"],
        );
        assert!(!ok && out.contains("locked"), "{out}");
        let (ok, out) = s.d.guardctl_as(
            None,
            &["recover", "--user", &u.name],
            &[&code, "New-Pass-77", "New-Pass-77"],
        );
        assert!(!ok && out.contains("locked"), "{out}");
        assert_eq!(
            harness::shadow_hash(&u.name),
            before,
            "the locked hash must not change"
        );
    }

    /// An account without a password (ssh keys only) enrols by an admin's invitation: single use,
    /// bound to that account, typed by the user in their own session.
    #[test]
    #[ignore = "needs root"]
    fn an_invitation_enrols_a_password_less_account_once() {
        let s = setup();
        let u = User::create_named("otpself");
        // The harness's users have no usable password ("*"): the password path is closed.
        let (ok, out) = s.d.guardctl_as(Some(&u.name), &["enroll"], &["anything"]);
        assert!(!ok && out.contains("invitation"), "{out}");
        // A user cannot invite themself.
        let (ok, _) =
            s.d.guardctl_as(Some(&u.name), &["enroll", &u.name, "--invite"], &[]);
        assert!(!ok);
        let (ok, out) = s.d.guardctl_as(None, &["enroll", &u.name, "--invite"], &[]);
        assert!(ok, "{out}");
        let invitation = out
            .split_whitespace()
            .nth(1)
            .expect("Invitation xxxxx-xxxxx ...")
            .to_owned();
        s.d.remember(&invitation);
        // Another account cannot redeem it.
        let other = User::create_named("otpself");
        let (ok, _) = s.d.guardctl_as(
            Some(&other.name),
            &["enroll", "--invitation"],
            &[&invitation],
        );
        assert!(!ok);
        let (ok, out) =
            s.d.guardctl_as(Some(&u.name), &["enroll", "--invitation"], &[&invitation]);
        assert!(ok && out.contains("otpauth://"), "{out}");
        let (ok, out) =
            s.d.guardctl_as(Some(&u.name), &["enroll", "--invitation"], &[&invitation]);
        assert!(!ok && out.contains("invitation"), "used once: {out}");
        assert!(s.d.leaked_into(&s.d.log()).is_empty());
    }

    /// Guessing an invitation counts toward the back-off, and once it runs no invitation is tried,
    /// not even the right one: guesses cannot go on at the speed guardd answers.
    #[test]
    #[ignore = "needs root"]
    fn invitation_guesses_stop_at_the_back_off() {
        let s = setup();
        let u = User::create_named("otpself");
        let (ok, out) = s.d.guardctl_as(None, &["enroll", &u.name, "--invite"], &[]);
        assert!(ok, "{out}");
        let invitation = out
            .split_whitespace()
            .nth(1)
            .expect("Invitation xxxxx-xxxxx ...")
            .to_owned();
        s.d.remember(&invitation);
        for _ in 0..5 {
            let (ok, out) =
                s.d.guardctl_as(Some(&u.name), &["enroll", "--invitation"], &["abcde-fghjk"]);
            assert!(!ok && out.contains("invitation is wrong"), "{out}");
        }
        let (ok, out) =
            s.d.guardctl_as(Some(&u.name), &["enroll", "--invitation"], &[&invitation]);
        assert!(!ok && out.contains("too many failed attempts"), "{out}");
        // The admin lifts the back-off; the invitation was not used up meanwhile.
        let (ok, out) = s.d.guardctl_as(None, &["unlock", &u.name], &[]);
        assert!(ok, "{out}");
        let (ok, out) =
            s.d.guardctl_as(Some(&u.name), &["enroll", "--invitation"], &[&invitation]);
        assert!(ok && out.contains("otpauth://"), "{out}");
    }

    /// Confirming a pending token with wrong codes counts toward the back-off like a login.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root"]
    async fn wrong_confirmations_count_toward_the_back_off() {
        let s = setup();
        let u = User::create_named("otpself");
        let (secret, _) =
            s.d.enroll(proto::v1::EnrollRequest {
                user: u.name.clone(),
                ..Default::default()
            })
            .await;
        for _ in 0..5 {
            let (ok, _) =
                s.d.guardctl_as(None, &["confirm", &u.name], &[&secret.wrong_code()]);
            assert!(!ok);
        }
        let (ok, out) =
            s.d.guardctl_as(None, &["confirm", &u.name], &[&secret.code_at(0)]);
        assert!(!ok && out.contains("too many failed attempts"), "{out}");
    }
}
