//! The operator's view (docs/operating.md) against a real guardd: every `guardctl --json` shape,
//! parsed; `guardctl status` and its exit codes with a healthy store, a store that cannot
//! commit and an unreachable guardd; the metrics file after a known sequence of logins; the
//! audit trail on stderr as one JSON object per line.

use std::time::{Duration, Instant};

use harness::{audit_events, is_deny, is_permit, Daemon, SharedStore, STRICT_RULES};
use serde_json::Value;

/// `guardctl ARGS` as root on `d`: its exit code and its stdout parsed as one JSON document.
fn json(d: &Daemon, args: &[&str]) -> (Option<i32>, Value) {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let out = d.guardctl_output(None, &with_json, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "guardctl {args:?}: not one JSON document ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), value)
}

/// `json` for a command that must succeed.
fn ok_json(d: &Daemon, args: &[&str]) -> Value {
    let (code, value) = json(d, args);
    assert_eq!(code, Some(0), "guardctl {args:?}: {value:#}\n{}", d.log());
    value
}

/// The keys of a JSON object, sorted.
fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

/// The documented fields of a token.
fn assert_token(t: &Value) {
    assert_eq!(
        keys(t),
        [
            "created",
            "id",
            "kind",
            "label",
            "last_used",
            "state",
            "user"
        ]
    );
    assert!(t["id"].is_string() && t["created"].is_i64(), "{t}");
    assert!(t["last_used"].is_null() || t["last_used"].is_i64(), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_shape_parses_with_its_documented_fields() {
    let d = Daemon::start();
    // enroll: the pending token and its URI.
    let enrolled = ok_json(&d, &["enroll", "daemon", "--hotp", "--label", "ops"]);
    assert_eq!(keys(&enrolled), ["token", "uri"]);
    assert_token(&enrolled["token"]);
    assert_eq!(enrolled["token"]["state"], "pending");
    assert_eq!(enrolled["token"]["kind"], "hotp");
    assert_eq!(enrolled["token"]["last_used"], Value::Null);
    let uri = enrolled["uri"].as_str().unwrap();
    assert!(uri.starts_with("otpauth://hotp/"), "{uri}");
    d.remember(uri);
    let secret = harness::Secret::from_uri(uri);
    d.remember(&secret.base32());
    let id = enrolled["token"]["id"].as_str().unwrap().to_owned();
    // confirm, disable, enable, resync: the token as it is now.
    let code = secret.hotp(0);
    d.remember(&code);
    let confirmed = ok_json(&d, &["confirm", "daemon", &code]);
    assert_eq!(keys(&confirmed), ["token"]);
    assert_eq!(confirmed["token"]["state"], "active");
    assert!(confirmed["token"]["last_used"].is_i64());
    assert_eq!(
        ok_json(&d, &["disable", "daemon", &id])["token"]["state"],
        "disabled"
    );
    assert_eq!(
        ok_json(&d, &["enable", "daemon", &id])["token"]["state"],
        "active"
    );
    let (c1, c2) = (secret.hotp(40), secret.hotp(41));
    d.remember(&c1);
    d.remember(&c2);
    assert_token(&ok_json(&d, &["resync", "daemon", &id, &c1, &c2])["token"]);
    // list, of everyone and of one user, and the stale filter.
    let list = ok_json(&d, &["list"]);
    assert_eq!(keys(&list), ["stale_before", "tokens"]);
    assert_eq!(list["stale_before"], Value::Null);
    let tokens = list["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 1);
    assert_token(&tokens[0]);
    assert_eq!(ok_json(&d, &["list", "daemon"])["tokens"][0]["id"], id);
    let stale = ok_json(&d, &["list", "--stale", "90d"]);
    assert!(stale["tokens"].as_array().unwrap().is_empty(), "{stale}");
    assert!(stale["stale_before"].is_i64());
    // backup-codes: shown once.
    let codes = ok_json(&d, &["backup-codes", "daemon"]);
    assert_eq!(keys(&codes), ["codes", "user"]);
    let codes: Vec<&str> = codes["codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(codes.len(), 10);
    for c in &codes {
        d.remember(c);
        d.remember(&c.replace('-', ""));
    }
    // explain: the request, the rules one by one, the decision.
    let explained = ok_json(&d, &["explain", "--user", "daemon", "--service", "sshd"]);
    assert_eq!(
        keys(&explained),
        ["decision", "policy", "request", "reuse", "rules"]
    );
    // No rule with `reuse` decides here.
    assert!(explained["reuse"].is_null());
    // forget: whose grants, and how many ended.
    let forgot = ok_json(&d, &["forget", "daemon"]);
    assert_eq!(keys(&forgot), ["forgotten", "user"]);
    assert_eq!(forgot["forgotten"], 0);
    let rule = &explained["rules"][0];
    assert_eq!(
        keys(rule),
        ["decides", "id", "index", "line", "outcome", "why"]
    );
    assert_eq!(rule["id"], "everyone-otp");
    assert!(rule["decides"].as_bool().unwrap());
    // reload, unlock, enroll --invite, delete.
    let reloaded = ok_json(&d, &["reload"]);
    assert_eq!(keys(&reloaded), ["digest", "warnings"]);
    assert!(reloaded["digest"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(
        ok_json(&d, &["unlock", "daemon"]),
        serde_json::json!({"user": "daemon", "was_locked": false})
    );
    let invited = ok_json(&d, &["enroll", "bin", "--invite"]);
    assert_eq!(keys(&invited), ["expires", "invitation", "user"]);
    assert_eq!(invited["user"], "bin");
    d.remember(invited["invitation"].as_str().unwrap());
    // status: healthy, with the counts.
    let status = ok_json(&d, &["status"]);
    assert_eq!(
        keys(&status),
        [
            "counts",
            "healthy",
            "metrics_file",
            "policy",
            "problems",
            "started",
            "store",
            "uptime_seconds",
            "version"
        ]
    );
    assert_eq!(status["healthy"], true);
    assert_eq!(status["problems"], serde_json::json!([]));
    assert_eq!(
        keys(&status["store"]),
        [
            "error",
            "kind",
            "last_error",
            "last_error_at",
            "latency_us",
            "location",
            "ok",
            "schema_version"
        ]
    );
    assert_eq!(status["store"]["kind"], "sqlite");
    assert!(status["store"]["location"]
        .as_str()
        .unwrap()
        .ends_with("lib/guardd.db"));
    assert_eq!(status["store"]["ok"], true);
    assert!(status["store"]["schema_version"].as_i64().unwrap() >= 3);
    assert_eq!(
        keys(&status["policy"]),
        ["digest", "file", "loaded", "reload_error"]
    );
    assert_eq!(status["policy"]["digest"], reloaded["digest"]);
    let counts = &status["counts"];
    assert_eq!(
        keys(counts),
        ["backup_codes_low", "locked", "tokens", "users"]
    );
    assert_eq!(counts["users"], 1);
    assert_eq!(
        counts["tokens"],
        serde_json::json!({"pending": 0, "active": 1, "disabled": 0})
    );
    assert_eq!(
        counts["locked"],
        serde_json::json!({"total": 0, "users": []})
    );
    assert_eq!(
        counts["backup_codes_low"],
        serde_json::json!({"below": 3, "total": 0, "users": []})
    );
    // Wrong codes lock the user out; used backup codes run the set low.
    for _ in 0..5 {
        let wrong = secret.hotp(900);
        assert!(is_deny(&d.login("daemon", &wrong).await));
    }
    let status = ok_json(&d, &["status", "--backup-codes-below", "11"]);
    let locked = &status["counts"]["locked"];
    assert_eq!(locked["total"], 1, "{status:#}");
    assert_eq!(keys(&locked["users"][0]), ["failures", "until", "user"]);
    assert_eq!(locked["users"][0]["user"], "daemon");
    assert_eq!(locked["users"][0]["failures"], 5);
    assert_eq!(
        status["counts"]["backup_codes_low"]["users"],
        serde_json::json!([{"user": "daemon", "left": 10}])
    );
    // The stale filter finds a token last used before the cut-off (1 s ago).
    std::thread::sleep(Duration::from_millis(2100));
    let stale = ok_json(&d, &["list", "--stale", "1s"]);
    assert_eq!(stale["tokens"][0]["id"], id, "{stale}");
    let deleted = ok_json(&d, &["delete", "daemon", &id]);
    assert_eq!(
        deleted,
        serde_json::json!({"user": "daemon", "deleted": id})
    );
}

/// Polls `guardctl status --json` until its exit code is `want` (a store takes a moment to be
/// seen down or back); the last answer.
fn status_until(d: &Daemon, want: i32) -> (Option<i32>, Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, value) = json(d, &["status"]);
        if code == Some(want) || Instant::now() > deadline {
            return (code, value);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Exit 0 while the store commits; 3 (degraded, with the reason and no counts) while another
/// process holds its write lock; 0 again once released; 1 once guardd is gone.
#[test]
fn status_exits_0_healthy_3_when_the_sqlite_store_cannot_commit_and_1_when_unreachable() {
    let mut d = Daemon::start();
    let (code, healthy) = json(&d, &["status"]);
    assert_eq!(code, Some(0), "{healthy:#}");
    let locker = rusqlite::Connection::open(d.dir.path().join("lib/guardd.db")).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (code, degraded) = json(&d, &["status"]);
    assert_eq!(code, Some(3), "{degraded:#}");
    assert_eq!(degraded["healthy"], false);
    assert_eq!(degraded["store"]["ok"], false);
    assert_eq!(degraded["counts"], Value::Null);
    assert!(
        degraded["store"]["error"]
            .as_str()
            .unwrap()
            .contains("busy or locked"),
        "{degraded:#}"
    );
    assert!(degraded["problems"][0]
        .as_str()
        .unwrap()
        .contains("does not answer"));
    // The text form says so too, with the same exit code.
    let text = d.guardctl_output(None, &["status"], &[]);
    assert_eq!(text.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&text.stdout).contains("DEGRADED"));
    locker.execute_batch("ROLLBACK").unwrap();
    assert_eq!(status_until(&d, 0).0, Some(0));
    assert!(d.stop());
    let gone = d.guardctl_output(None, &["status", "--json"], &[]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("cannot reach guardd"));
}

/// A PostgreSQL store: the location carries no password, and a stopped cluster makes guardd
/// degraded (3) until it is back.
#[test]
fn status_exits_3_while_the_postgresql_store_is_down_and_0_once_it_is_back() {
    let cluster = pgtemp::Cluster::start();
    let keys = tempfile::tempdir().unwrap();
    let store = SharedStore::postgres(&cluster, keys.path());
    let d = Daemon::on_store(STRICT_RULES, "max_tries = 1\n", Some(&store));
    let (code, healthy) = json(&d, &["status"]);
    assert_eq!(code, Some(0), "{healthy:#}\n{}", d.log());
    assert_eq!(healthy["store"]["kind"], "postgres");
    assert_eq!(healthy["store"]["location"], store.url.as_str());
    cluster.stop();
    let (code, degraded) = status_until(&d, 3);
    assert_eq!(code, Some(3), "{degraded:#}");
    assert_eq!(degraded["store"]["ok"], false);
    assert!(degraded["store"]["last_error"].is_string(), "{degraded:#}");
    cluster.start_server();
    let (code, back) = status_until(&d, 0);
    assert_eq!(code, Some(0), "{back:#}\n{}", d.log());
}

/// One sample of a Prometheus text exposition, by its full series name.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// The metrics file, once it shows `series` at `value` (it is rewritten every second here).
fn metrics_when(path: &std::path::Path, series: &str, value: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if sample(&text, series) == Some(value) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_file_counts_a_known_sequence_of_logins() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("textfile/guardd.prom");
    let mut d = Daemon::with_config(
        STRICT_RULES,
        &format!(
            "max_tries = 1\nmetrics_file = \"{}\"\nmetrics_interval = 1\n",
            path.display()
        ),
    );
    let secret = d.enroll_hotp("daemon").await;
    // One permit by a token, two wrong codes (one a replay), one user without a token, and a
    // backup code.
    assert!(is_permit(&d.login("daemon", &secret.hotp(1)).await));
    assert!(is_deny(&d.login("daemon", &secret.hotp(1)).await));
    assert!(is_deny(&d.login("daemon", &secret.hotp(500)).await));
    assert!(is_deny(&d.login("bin", "123456").await));
    let backup = d.backup_codes("daemon").await;
    assert!(is_permit(&d.login("daemon", &backup[0]).await));
    let (ok, out) = d.guardctl_as(None, &["reload"], &[]);
    assert!(ok, "{out}");

    let text = metrics_when(&path, "soffid_otp_policy_reloads_total{result=\"ok\"}", 1.0);
    let at = |series: &str| {
        sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}\n{}", d.log()))
    };
    let logins = |outcome: &str, reason: &str| {
        at(&format!(
            "soffid_otp_logins_total{{outcome=\"{outcome}\",reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(logins("prompt", "otp_required"), 4.0, "{text}");
    assert_eq!(logins("permit", "otp"), 1.0);
    assert_eq!(logins("permit", "backup_code"), 1.0);
    assert_eq!(logins("deny", "wrong_code"), 2.0);
    assert_eq!(logins("deny", "not_enrolled"), 1.0);
    assert_eq!(logins("deny", "locked"), 0.0);
    let verified = |result: &str| {
        at(&format!(
            "soffid_otp_verifications_total{{result=\"{result}\"}}"
        ))
    };
    assert_eq!(
        (
            verified("token"),
            verified("backup_code"),
            verified("wrong"),
            verified("locked")
        ),
        (1.0, 1.0, 2.0, 0.0)
    );
    assert_eq!(
        at("soffid_otp_policy_reloads_total{result=\"failed\"}"),
        0.0
    );
    assert_eq!(at("soffid_otp_store_up"), 1.0);
    assert_eq!(at("soffid_otp_users"), 1.0);
    assert_eq!(at("soffid_otp_tokens{state=\"active\"}"), 1.0);
    assert_eq!(at("soffid_otp_locked_users"), 0.0);
    let calls = at("soffid_otp_store_call_seconds_count");
    assert!(calls >= 10.0, "{text}");
    assert_eq!(
        at("soffid_otp_store_call_seconds_bucket{le=\"+Inf\"}"),
        calls
    );
    assert!(text.contains("# TYPE soffid_otp_store_call_seconds histogram"));
    // No user name in any label: only the fixed label sets.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("daemon") && !line.contains("bin"),
            "a user name in {line}"
        );
    }
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644);
    // Status names the file; a stopped guardd removes it.
    let status = ok_json(&d, &["status"]);
    assert_eq!(status["metrics_file"], path.display().to_string());
    assert!(d.stop());
    assert!(!path.exists(), "the metrics file outlived guardd");
}

/// Outside journald every line guardd writes on stderr is one JSON object; audit events carry
/// the documented fields, with the caller's uid and pid as numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lines_on_stderr_are_json_objects_with_the_documented_fields() {
    let d = Daemon::start();
    let secret = d.enroll_hotp("daemon").await;
    assert!(is_permit(&d.login("daemon", &secret.hotp(1)).await));
    assert!(is_deny(&d.login("daemon", &secret.hotp(1)).await));
    let log = d.log();
    for line in log.lines() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for field in ["timestamp", "level", "target"] {
            assert!(v[field].is_string(), "no {field} in {line}");
        }
        assert!(
            v["timestamp"]
                .as_str()
                .unwrap()
                .parse::<jiff::Timestamp>()
                .is_ok(),
            "{line}"
        );
    }
    let events = audit_events(&log);
    let answers: Vec<_> = events.iter().filter(|e| e["action"] == "answer").collect();
    assert_eq!(answers.len(), 2, "{log}");
    let permit = answers[0];
    for field in [
        "host", "action", "user", "service", "rhost", "tty", "outcome", "reason", "token", "rule",
        "policy",
    ] {
        assert!(permit[field].is_string(), "no {field} in {permit:?}");
    }
    assert_eq!(permit["level"], "INFO");
    assert_eq!(permit["user"], "daemon");
    assert_eq!(permit["service"], "test");
    assert_eq!(permit["outcome"], "permit");
    assert_eq!(permit["reason"], "otp verified");
    assert!(permit["caller_uid"].is_u64() && permit["caller_pid"].is_u64());
    assert_eq!(answers[1]["outcome"], "deny");
    assert_eq!(answers[1]["reason"], "wrong, expired or replayed code");
    let begin = events.iter().find(|e| e["action"] == "begin").unwrap();
    assert_eq!(begin["outcome"], "prompt");
    assert_eq!(begin["rule"], "everyone-otp");
    assert!(harness::text_of(&begin["policy"]).starts_with("sha256:"));
}

mod as_root {
    use super::*;

    /// Calls refused to an unprivileged uid are counted by call, never by uid or name.
    #[test]
    #[ignore = "needs root"]
    fn as_root_refused_calls_are_counted_by_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guardd.prom");
        let d = Daemon::with_config(
            STRICT_RULES,
            &format!(
                "max_tries = 1\nmetrics_file = \"{}\"\nmetrics_interval = 1\n",
                path.display()
            ),
        );
        for args in [&["list"][..], &["status"], &["status"]] {
            let out = d.guardctl_output(Some("nobody"), args, &[]);
            assert_eq!(out.status.code(), Some(1), "{out:?}");
        }
        let text = metrics_when(
            &path,
            "soffid_otp_refused_calls_total{action=\"status\"}",
            2.0,
        );
        assert_eq!(
            sample(&text, "soffid_otp_refused_calls_total{action=\"list\"}"),
            Some(1.0),
            "{text}"
        );
        assert!(!text.contains("nobody") && !text.contains("65534"));
    }
}
