//! Layer 2/3: the rules in a real guardd — decisions, reloads (good and broken), explain, and
//! what the PAM module shows.

use std::process::Command;
use std::time::{Duration, Instant};

use harness::{artefact, is_deny, is_permit, write_rules, Daemon, PamServices};
use proto::v1::{step, Step};

const SOFFID: &str = include_str!("../../packaging/examples/soffid-rules.toml");

async fn begin(d: &Daemon, user: &str, service: &str, rhost: &str) -> Step {
    d.client()
        .await
        .begin(proto::v1::BeginRequest {
            context: Some(proto::v1::LoginContext {
                user: user.into(),
                service: service.into(),
                rhost: rhost.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
}

fn deny_text(step: &Step) -> String {
    match &step.kind {
        Some(step::Kind::Deny(d)) => d.message.clone(),
        other => panic!("expected a deny, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_decide_begin_and_a_reload_takes_effect_for_the_next_one() {
    let d = Daemon::start();
    // Strict rules: a user without a token is refused and told what to do.
    let step = begin(&d, "bin", "sshd", "").await;
    assert!(
        deny_text(&step).contains("ask your administrator"),
        "{step:?}"
    );

    write_rules(d.dir.path(), SOFFID);
    let out = d.guardctl_output(None, &["reload"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("sha256:"));
    // The daemon's host name is not a prod host: permitted by default, no prompt.
    assert!(is_permit(&begin(&d, "bin", "sshd", "").await));
    let root = begin(&d, "root", "sshd", "192.0.2.7").await;
    assert_eq!(
        deny_text(&root),
        "root login is only allowed from the admin network"
    );
    assert!(!is_deny(&begin(&d, "root", "sshd", "10.20.1.1").await));
    let log = d.log();
    assert!(
        harness::audit_events(&log)
            .iter()
            .any(|e| e["rule"] == "root-only-from-admin-net"
                && harness::text_of(&e["policy"]).starts_with("sha256:")),
        "{log}"
    );

    // SIGHUP reloads too.
    write_rules(
        d.dir.path(),
        "version = 1\ndefault = \"deny\"\n[[rule]]\nid = \"closed\"\neffect = \"deny\"\nmessage = \"maintenance\"\n",
    );
    nix::sys::signal::kill(d.pid(), nix::sys::signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let step = begin(&d, "bin", "sshd", "").await;
        if is_deny(&step) && deny_text(&step) == "maintenance" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload: {}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_reload_is_refused_with_its_position_and_the_old_rules_stay() {
    let d = Daemon::with_rules(SOFFID);
    write_rules(
        d.dir.path(),
        "version = 1\n[[rule]]\nid = \"x\"\neffect = \"deny\"\nmatch = { rhost = [\"10.0.0.0/99\"] }\n",
    );
    let out = d.guardctl_output(None, &["reload"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rules.toml:5:") && err.contains("stay in force"),
        "{err}"
    );
    let root = begin(&d, "root", "sshd", "192.0.2.7").await;
    assert_eq!(
        deny_text(&root),
        "root login is only allowed from the admin network"
    );
    // SIGHUP with the broken file: also refused, still the old rules.
    nix::sys::signal::kill(d.pid(), nix::sys::signal::SIGHUP).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(is_permit(&begin(&d, "bin", "sshd", "").await));
    assert!(d.log().contains("previous ones stay in force"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_every_rule_and_the_decision_without_changing_anything() {
    let d = Daemon::with_rules(SOFFID);
    let args = [
        "explain",
        "--user",
        "daemon",
        "--service",
        "sshd",
        "--rhost",
        "192.0.2.7",
        "--host",
        "db-1.prod.example.com",
    ];
    let out = d.guardctl_output(None, &args, &[]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("request : user=daemon groups=["), "{text}");
    assert!(text.contains("enrolled=no"), "{text}");
    assert!(
        text.contains("root-only-from-admin-net") && text.contains("user daemon not in [root]")
    );
    let decides: Vec<&str> = text.lines().filter(|l| l.contains("<- decides")).collect();
    assert_eq!(decides.len(), 1);
    assert!(decides[0].contains("prod-ssh-otp"), "{text}");
    assert!(
        text.contains("decision: OTP required (prod-ssh-otp; unenrolled=deny)"),
        "{text}"
    );

    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = d.guardctl_output(None, &json_args, &[]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["rules"].as_array().unwrap().len(), 4);
    assert_eq!(doc["rules"][2]["decides"], true);

    // A time outside any window, in another zone, parses.
    let out = d.guardctl_output(
        None,
        &[
            "explain",
            "--user",
            "daemon",
            "--service",
            "su",
            "--time",
            "2026-11-27T23:30:00+01:00",
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Permit without OTP (default)"));
    // Explaining is not logging in: nothing was audited as a begin.
    assert!(
        !harness::audited(&d.log(), &[("action", "begin")]),
        "{}",
        d.log()
    );
}

#[test]
fn check_policy_validates_offline_and_guardd_refuses_to_start_on_broken_rules() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_rules(dir.path(), SOFFID);
    let out = Command::new(artefact("guardd"))
        .arg("--check-policy")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(": OK sha256:"));

    let bad = write_rules(dir.path(), "version = 1\ndefault = \"maybe\"\n");
    let out = Command::new(artefact("guardd"))
        .arg("--check-policy")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rules.toml:2:11: default must be"));

    let out = Command::new(artefact("guardd"))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .arg("--database")
        .arg(dir.path().join("db"))
        .arg("--key-file")
        .arg(dir.path().join("k"))
        .arg("--policy")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no valid rules"));
    assert!(!dir.path().join("s.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_shows_deny_messages_and_skips_the_prompt_when_the_rules_permit() {
    let d = Daemon::with_rules(
        r#"version = 1
default = "permit"
[[rule]]
id = "no-root"
effect = "deny"
message = "root may not use this service"
match = { user = ["root"] }
[[rule]]
id = "sudo-otp"
effect = "otp"
match = { service = ["sudo"] }
"#,
    );
    let secret = d.enroll_active("daemon").await;
    let line = PamServices::module_line(&format!("socket={} timeout=5", d.socket.display()));
    let pam = PamServices::new("sudo", &line);
    std::fs::write(pam.dir.path().join("other-svc"), &line).unwrap();

    let out = pam.pamtester("sudo", "root", "");
    assert_eq!(out.status.code(), Some(1));
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("root may not use this service"), "{text}");

    let out = pam.pamtester("other-svc", "daemon", "");
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Verification code"));

    let code = secret.code_at(0);
    d.remember(&code);
    let out = pam.pamtester("sudo", "daemon", &format!("{code}\n"));
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_rules_look_the_groups_up_when_a_rule_asks() {
    // The daemon decides first without NSS and looks the groups up only when a rule needs them;
    // either way the rules must see the user's real groups.
    let d = Daemon::with_rules(
        "version = 1\ndefault = \"permit\"\n\
         [[rule]]\nid = \"root-first\"\neffect = \"permit\"\nmatch = { user = [\"root\"] }\n\
         [[rule]]\nid = \"no-daemons\"\neffect = \"deny\"\nmessage = \"daemon accounts may not log in\"\n\
         match = { group = [\"daemon\"] }\n",
    );
    assert_eq!(
        deny_text(&begin(&d, "daemon", "sshd", "").await),
        "daemon accounts may not log in"
    );
    assert!(is_permit(&begin(&d, "bin", "sshd", "").await));
    assert!(is_permit(&begin(&d, "root", "sshd", "").await));
    assert!(is_permit(&begin(&d, "no-such-user-here", "sshd", "").await));
}
