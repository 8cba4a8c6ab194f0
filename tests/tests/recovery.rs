//! Password recovery with an OTP, as root in CI, with a real local user: the new password is
//! proven through pam_unix with pamtester, and "nothing changed" is proven on /etc/shadow.

/// Every test here needs root (real users, /etc/pam.d, other uids): a normal user's run reports
/// them as ignored; the README's test command runs them as root (`--ignored as_root`).
mod as_root {
    use harness::{Daemon, EtcFile, User};

    const RULES: &str = r#"
    version = 1
    default = "permit"

    [[rule]]
    id = "no-recovery-for-blocked"
    effect = "deny"
    message = "recovery is disabled for this account"
    match = { service = ["recovery"], user = ["*blocked*"] }
    "#;

    fn setup() -> Daemon {
        assert!(
            std::path::Path::new("/usr/sbin/chpasswd").exists(),
            "chpasswd is missing (apt-get install passwd)"
        );
        Daemon::with_config(RULES, "max_tries = 1\n")
    }

    /// `guardctl recover [--user target]`, as `runner` (None: root), typing `lines`.
    fn recover(
        d: &Daemon,
        runner: Option<&str>,
        target: Option<&str>,
        lines: &[&str],
    ) -> (bool, String) {
        let mut args = vec!["recover"];
        if let Some(t) = target {
            args.extend(["--user", t]);
        }
        d.guardctl_as(runner, &args, lines)
    }

    /// Gives `user` a usable password, the one they "forgot": recovery replaces only a usable
    /// password, never a locked one (the harness's users are created locked).
    fn forgotten_password(user: &str) {
        harness::set_password(user, "Forgotten-Pass-1");
    }

    /// Whether `password` opens `user`'s account through pam_unix (a real /etc/pam.d service).
    fn password_works(user: &str, password: &str) -> bool {
        let service = format!("otp-recovery-{user}");
        let _pam = EtcFile::write(
            &format!("/etc/pam.d/{service}"),
            "auth required pam_unix.so\naccount required pam_permit.so\n",
            0o644,
        );
        harness::system_pamtester(&service, user, &format!("{password}\n"))
            .status
            .success()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root"]
    async fn root_and_the_user_recover_with_an_otp_and_the_new_password_works() {
        let d = setup();
        let user = User::create();
        forgotten_password(&user.name);
        let secret = d.enroll_active(&user.name).await;
        let (ok, text) = recover(
            &d,
            None,
            Some(&user.name),
            &[&secret.code_at(0), "Fresh-Pass-41", "Fresh-Pass-41"],
        );
        assert!(ok, "{text}\n{}", d.log());
        assert!(text.contains("was changed"), "{text}");
        assert!(password_works(&user.name, "Fresh-Pass-41"));
        assert!(!password_works(&user.name, "Fresh-Pass-40"));

        // The user themself, identified by SO_PEERCRED.
        let (ok, text) = recover(
            &d,
            Some(&user.name),
            None,
            &[&secret.code_at(30), "Other-Pass-77", "Other-Pass-77"],
        );
        assert!(ok, "{text}");
        assert!(password_works(&user.name, "Other-Pass-77"));
        let log = d.log();
        assert!(
            harness::audited(&log, &[("action", "recover")]) && log.contains("password changed")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root"]
    async fn wrong_codes_mismatches_and_system_refusals_change_nothing() {
        let d = setup();
        let user = User::create();
        forgotten_password(&user.name);
        let secret = d.enroll_active(&user.name).await;
        let before = harness::shadow_hash(&user.name);

        let (ok, text) = recover(
            &d,
            None,
            Some(&user.name),
            &[&secret.wrong_code(), "Pass-1-aaaa", "Pass-1-aaaa"],
        );
        assert!(!ok && text.contains("wrong"), "{text}");
        let (ok, text) = recover(
            &d,
            None,
            Some(&user.name),
            &[&secret.code_at(0), "Pass-1-aaaa", "Pass-1-bbbb"],
        );
        assert!(!ok && text.contains("do not match"), "{text}");
        assert_eq!(harness::shadow_hash(&user.name), before);

        // The system's own password stack refuses (here: a chpasswd stack that denies everything).
        let chpasswd = EtcFile::write(
            "/etc/pam.d/chpasswd",
            "password requisite pam_deny.so\n@include common-password\n",
            0o644,
        );
        let (ok, text) = recover(
            &d,
            None,
            Some(&user.name),
            &[&secret.code_at(30), "Pass-2-cccc", "Pass-2-cccc"],
        );
        drop(chpasswd);
        assert!(!ok, "{text}");
        assert!(
            text.contains("the system refused the new password"),
            "{text}"
        );
        assert!(text.contains("nothing was changed"), "{text}");
        assert_eq!(harness::shadow_hash(&user.name), before);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root"]
    async fn no_device_other_users_rules_and_back_off_are_enforced() {
        let d = setup();
        let user = User::create();
        forgotten_password(&user.name);
        // No token yet: the user is told, root gets the same words for an unknown user.
        let (ok, text) = recover(&d, Some(&user.name), None, &[]);
        assert!(
            !ok && text.contains("No OTP device is configured for your account"),
            "{text}"
        );
        let (_, tokenless) = recover(&d, None, Some(&user.name), &[]);
        let (_, unknown) = recover(&d, None, Some("no-such-user-otp"), &[]);
        assert_eq!(tokenless, unknown);

        let secret = d.enroll_active(&user.name).await;
        // Not someone else's password.
        let root_before = harness::shadow_hash("root");
        let (ok, text) = recover(
            &d,
            Some(&user.name),
            Some("root"),
            &[&secret.code_at(0), "x-Pass-9", "x-Pass-9"],
        );
        assert!(
            !ok && text.contains("only root or the user themself"),
            "{text}"
        );
        assert_eq!(harness::shadow_hash("root"), root_before);

        // Failures count toward the back-off shared with logins.
        let before = harness::shadow_hash(&user.name);
        for _ in 0..5 {
            let (ok, _) = recover(
                &d,
                None,
                Some(&user.name),
                &[&secret.wrong_code(), "p-1", "p-1"],
            );
            assert!(!ok);
        }
        let (ok, text) = recover(
            &d,
            None,
            Some(&user.name),
            &[&secret.code_at(0), "Pass-3-dddd", "Pass-3-dddd"],
        );
        assert!(!ok && text.contains("too many failed attempts"), "{text}");
        assert_eq!(harness::shadow_hash(&user.name), before);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root"]
    async fn a_deny_rule_blocks_recovery() {
        let d = setup();
        let user = User::create_named("otpblocked");
        let secret = d.enroll_active(&user.name).await;
        let (ok, text) = recover(
            &d,
            None,
            Some(&user.name),
            &[&secret.code_at(0), "Pass-4-eeee", "Pass-4-eeee"],
        );
        assert!(
            !ok && text.contains("recovery is disabled for this account"),
            "{text}"
        );
    }
}
