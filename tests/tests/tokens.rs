//! Layer 2, token lifecycle and security core: races, HOTP, several tokens, back-off, backup
//! codes, sealed secrets and the key file.

use std::process::Command;

use guardd::config::Config;
use harness::{artefact, is_deny, is_permit, Daemon, InProcess};
use proto::v1::guard_client::GuardClient;
use proto::v1::{step, ConfirmRequest, EnrollRequest, ResyncRequest, SetEnabledRequest, Step};
use proto::v1::{AnswerRequest, BeginRequest, LoginContext, UnlockRequest};
use tonic::transport::Channel;

fn deny_message(step: &Step) -> String {
    match &step.kind {
        Some(step::Kind::Deny(d)) => d.message.clone(),
        other => panic!("expected a deny, got {other:?}"),
    }
}

/// Fifty logins answer with the same valid code at the same moment: exactly one gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_code_fired_by_fifty_concurrent_logins_is_accepted_exactly_once() {
    let d = Daemon::start();
    let secret = d.enroll_active("daemon").await;
    let code = secret.code_at(0);
    d.remember(&code);
    let steps = answer_at_once(&d, "daemon", 50, &code).await;
    let mut permits = 0;
    for step in &steps {
        permits += usize::from(is_permit(step));
    }
    assert_eq!(permits, 1, "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotp_counts_forward_refuses_replay_and_resyncs() {
    let d = Daemon::start();
    let (secret, uri) = d
        .enroll(EnrollRequest {
            user: "daemon".into(),
            kind: "hotp".into(),
            ..EnrollRequest::default()
        })
        .await;
    assert!(
        uri.starts_with("otpauth://hotp/") && uri.ends_with("counter=0"),
        "{uri}"
    );
    let mut client = d.client().await;
    d.remember(&secret.hotp(0));
    client
        .confirm(ConfirmRequest {
            user: "daemon".into(),
            code: secret.hotp(0).into_bytes(),
        })
        .await
        .unwrap();
    assert!(is_permit(&d.login("daemon", &secret.hotp(1)).await));
    assert!(is_deny(&d.login("daemon", &secret.hotp(1)).await), "replay");
    assert!(
        is_deny(&d.login("daemon", &secret.hotp(0)).await),
        "old counter"
    );
    // A code beyond the look-ahead (10) is refused until an admin resyncs with two in a row.
    assert!(is_deny(&d.login("daemon", &secret.hotp(40)).await));
    let id = client
        .list(proto::v1::ListRequest {
            user: "daemon".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens[0]
        .id
        .clone();
    let out = Command::new(artefact("guardctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["resync", "daemon", &id, &secret.hotp(40), &secret.hotp(41)])
        .output()
        .unwrap();
    d.remember(&secret.hotp(41));
    assert!(out.status.success(), "{out:?}");
    assert!(
        is_deny(&d.login("daemon", &secret.hotp(41)).await),
        "resync codes are used"
    );
    assert!(is_permit(&d.login("daemon", &secret.hotp(42)).await));
    // Resync of a TOTP-less mismatch is refused with a reason.
    let err = client
        .resync(ResyncRequest {
            user: "daemon".into(),
            token_id: id,
            first: secret.hotp(50).into_bytes(),
            second: secret.hotp(52).into_bytes(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_tokens_each_work_and_a_disabled_one_does_not() {
    let d = Daemon::start();
    let phone = d.enroll_active("daemon").await;
    let spare = d.enroll_active("daemon").await;
    assert!(is_permit(&d.login("daemon", &spare.code_at(0)).await));
    assert!(is_permit(&d.login("daemon", &phone.code_at(0)).await));
    let tokens = d
        .client()
        .await
        .list(proto::v1::ListRequest {
            user: "daemon".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(tokens.len(), 2);
    for t in &tokens {
        let out = Command::new(artefact("guardctl"))
            .arg("--socket")
            .arg(&d.socket)
            .args(["disable", "daemon", &t.id])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    // No active token left: the login is refused before any prompt.
    assert!(is_deny(&d.login("daemon", &phone.code_at(30)).await));
    d.client()
        .await
        .set_enabled(SetEnabledRequest {
            user: "daemon".into(),
            token_id: tokens[0].id.clone(),
            enabled: true,
        })
        .await
        .unwrap();
    // Either token may be the one listed first: exactly one of their next codes works.
    let mut permitted = 0;
    for c in [phone.code_at(30), spare.code_at(30)] {
        permitted += usize::from(is_permit(&d.login("daemon", &c).await));
    }
    assert_eq!(permitted, 1, "exactly the re-enabled token works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_back_off_with_growing_waits_and_success_resets() {
    let g = InProcess::start(Config::default()).await;
    let secret = g.enroll_active("daemon").await;
    let wrong = secret.wrong_code();
    for _ in 0..4 {
        assert!(is_deny(&g.login("daemon", &wrong).await));
    }
    // The fifth failure starts a 30 s wait; even the right code is refused unchecked.
    assert!(is_deny(&g.login("daemon", &wrong).await));
    let locked = g.login("daemon", &secret.code_at_time(g.now())).await;
    assert!(
        deny_message(&locked).contains("try again in 30 s"),
        "{locked:?}"
    );
    g.advance(31);
    // One more failure doubles the wait.
    assert!(is_deny(&g.login("daemon", &wrong).await));
    let locked = g.login("daemon", &secret.code_at_time(g.now())).await;
    assert!(
        deny_message(&locked).contains("try again in 60 s"),
        "{locked:?}"
    );
    g.advance(61);
    assert!(is_permit(
        &g.login("daemon", &secret.code_at_time(g.now())).await
    ));
    // Success reset the count: four more failures do not lock.
    for _ in 0..4 {
        assert!(is_deny(&g.login("daemon", &wrong).await));
    }
    g.advance(30);
    assert!(is_permit(
        &g.login("daemon", &secret.code_at_time(g.now())).await
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_off_survives_a_restart_and_unlock_lifts_it() {
    let mut d = Daemon::start();
    let secret = d.enroll_active("daemon").await;
    for _ in 0..5 {
        assert!(is_deny(&d.login("daemon", &secret.wrong_code()).await));
    }
    d.restart();
    let locked = d.login("daemon", &secret.code_at(0)).await;
    assert!(
        deny_message(&locked).contains("too many failed attempts"),
        "{locked:?}"
    );
    let reply = d
        .client()
        .await
        .unlock(UnlockRequest {
            user: "daemon".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.was_locked);
    let after = d.login("daemon", &secret.code_at(0)).await;
    assert!(is_permit(&after), "{after:?}\n{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_codes_work_once_each_and_a_new_set_replaces_the_old() {
    let d = Daemon::start();
    let _ = d.enroll_active("daemon").await;
    let codes = d.backup_codes("daemon").await;
    assert_eq!(codes.len(), 10);
    assert!(is_permit(&d.login("daemon", &codes[0]).await));
    assert!(is_deny(&d.login("daemon", &codes[0]).await), "used twice");
    // Typed in capitals without the dash works too.
    let typed = codes[1].replace('-', "").to_uppercase();
    d.remember(&typed);
    assert!(is_permit(&d.login("daemon", &typed).await));
    let fresh = d.backup_codes("daemon").await;
    assert!(
        is_deny(&d.login("daemon", &codes[2]).await),
        "old set replaced"
    );
    assert!(is_permit(&d.login("daemon", &fresh[0]).await));
    // A user whose phone is gone (no active token) can still log in with a backup code.
    let lost = d.backup_codes("bin").await;
    assert!(is_permit(&d.login("bin", &lost[0]).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_answers_are_refused_and_counted() {
    let g = InProcess::start(Config::default()).await;
    let secret = g.enroll_active("daemon").await;
    for bad in [
        &b""[..],
        b"12 34 5",
        b"abcdef",
        &[0xff, 0xfe, 0x00, 0x80],
        &[b'7'; 10_000],
    ] {
        let mut client = g.client().await;
        let challenge = prompted(&mut client, "daemon").await;
        let answer = client
            .answer(AnswerRequest {
                challenge,
                response: bad.to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(is_deny(&answer));
    }
    // Five failures: locked.
    let locked = g.login("daemon", &secret.code_at_time(g.now())).await;
    assert!(deny_message(&locked).contains("too many failed attempts"));
}

#[test]
fn guardd_refuses_to_start_without_its_key_file_or_with_another_one() {
    let d = Daemon::start();
    drop(
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(d.enroll_active("daemon")),
    );
    let db = d.dir.path().join("lib/guardd.db");
    let before = std::fs::read(&db).unwrap();
    let run = |key: &std::path::Path| {
        Command::new(artefact("guardd"))
            .arg("--socket")
            .arg(d.dir.path().join("other.sock"))
            .arg("--database")
            .arg(&db)
            .arg("--key-file")
            .arg(key)
            .output()
            .unwrap()
    };
    let missing = run(&d.dir.path().join("absent.key"));
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("is missing") && err.contains("restore"),
        "{err}"
    );
    assert!(!d.dir.path().join("absent.key").exists());

    let other = tempfile::tempdir().unwrap();
    let key = other.path().join("k");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let wrong = run(&key);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong key file"));
    assert_eq!(std::fs::read(&db).unwrap(), before, "the database changed");
}

#[test]
fn a_corrupt_database_is_refused_at_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("guardd.db");
    std::fs::write(&db, vec![0x5a; 8192]).unwrap();
    let out = Command::new(artefact("guardd"))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .arg("--database")
        .arg(&db)
        .arg("--key-file")
        .arg(dir.path().join("k"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open the token database"), "{err}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        vec![0x5a; 8192],
        "nothing may be written"
    );
}

/// While another process holds the write lock, an answer waits (busy timeout) and then fails
/// as "unavailable" (the module's PAM_AUTHINFO_UNAVAIL), accepting nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_gives_unavailable_and_loses_nothing() {
    let d = Daemon::start();
    let secret = d.enroll_active("daemon").await;
    let code = secret.code_at(0);
    d.remember(&code);
    let locker = rusqlite::Connection::open(d.dir.path().join("lib/guardd.db")).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let mut client = d.client().await;
    let challenge = prompted(&mut client, "daemon").await;
    let err = client
        .answer(AnswerRequest {
            challenge,
            response: code.clone().into_bytes(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?} {}", d.log());
    assert!(err.message().contains("busy or locked"));
    locker.execute_batch("ROLLBACK").unwrap();
    assert!(
        is_permit(&d.login("daemon", &code).await),
        "the code was not used up"
    );
}

/// Forty wrong answers for one user arrive at once: the back-off check and the failure it
/// counts are one step, so only the free failures are checked and every later one is refused
/// unchecked, however the answers interleave.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_wrong_answers_gets_no_more_checks_than_the_free_failures() {
    let d = Daemon::start();
    let secret = d.enroll_active("daemon").await;
    let wrong = secret.wrong_code();
    let steps = answer_at_once(&d, "daemon", 40, &wrong).await;
    let mut checked = 0;
    for step in steps {
        let locked = matches!(&step.kind, Some(step::Kind::Deny(d)) if d.reason == proto::v1::DenyReason::Locked as i32);
        checked += usize::from(!locked);
    }
    assert_eq!(checked, 5, "{}", d.log());
}

/// Begins `n` logins of `user`, then sends every one of them `answer` at the same moment, each
/// from its own connection; returns the steps guardd answered.
async fn answer_at_once(d: &Daemon, user: &str, n: usize, answer: &str) -> Vec<Step> {
    let mut challenges = Vec::new();
    for _ in 0..n {
        challenges.push(prompted(&mut d.client().await, user).await);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(challenges.len()));
    let mut tasks = Vec::new();
    for challenge in challenges {
        let (mut client, answer, barrier) = (d.client().await, answer.to_owned(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            client
                .answer(AnswerRequest {
                    challenge,
                    response: answer.into_bytes(),
                })
                .await
                .unwrap()
                .into_inner()
        }));
    }
    let mut steps = Vec::new();
    for t in tasks {
        steps.push(t.await.unwrap());
    }
    steps
}

/// Begins a login of `user`, which must be prompted for a code; returns the challenge.
async fn prompted(client: &mut GuardClient<Channel>, user: &str) -> String {
    let step = client
        .begin(BeginRequest {
            context: Some(LoginContext {
                user: user.into(),
                ..LoginContext::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    match step.kind {
        Some(step::Kind::Prompt(p)) => p.challenge,
        other => panic!("expected a prompt, got {other:?}"),
    }
}
