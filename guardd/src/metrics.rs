//! Counters for monitoring, written as a Prometheus text exposition to a file that
//! node_exporter's textfile collector reads (docs/operating.md#metrics): no network port, no
//! second socket to defend, and the same file for any collector that reads the format.
//!
//! Everything here is fixed-size: each metric is an array of atomics over label values known at
//! build time (an outcome, a reason, an action), never a user name, uid or host, so no caller can
//! add a series. What a caller influences is only which fixed counter moves. The exposition is
//! written by hand: a dozen families with constant labels need no escaping and no registry, and
//! so no dependency.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use crate::audit::Event;
use crate::store::Overview;

/// Login decisions by (outcome, reason): see `login_label`.
const LOGINS: [(&str, &str); 16] = [
    ("permit", "rules"),
    ("permit", "unenrolled"),
    ("permit", "otp"),
    ("permit", "backup_code"),
    ("permit", "reuse"),
    ("prompt", "otp_required"),
    ("deny", "rules"),
    ("deny", "indeterminate"),
    ("deny", "not_enrolled"),
    ("deny", "foreign"),
    ("deny", "wrong_code"),
    ("deny", "locked"),
    ("deny", "expired"),
    ("deny", "other"),
    ("error", "overloaded"),
    ("permit", "other"),
];

/// Answers checked, by result.
const VERIFICATIONS: [&str; 4] = ["token", "backup_code", "wrong", "locked"];

/// Calls refused before they did anything (not allowed, over a budget), by call.
const REFUSED: [&str; 21] = [
    "connect",
    "begin",
    "answer",
    "check",
    "recover",
    "enroll",
    "invite",
    "confirm",
    "list",
    "delete",
    "disable",
    "enable",
    "resync",
    "unlock",
    "forget",
    "session",
    "backup-codes",
    "explain",
    "reload",
    "status",
    "other",
];

/// Upper bounds of the store-latency histogram, in seconds (the calls' own bound is 3 s).
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The counters of this process.
struct Metrics {
    logins: [AtomicU64; LOGINS.len()],
    verifications: [AtomicU64; VERIFICATIONS.len()],
    refused: [AtomicU64; REFUSED.len()],
    /// Cumulative as Prometheus wants it is computed at rendering; these are per bucket, the
    /// last one above every bound.
    store_buckets: [AtomicU64; BUCKETS.len() + 1],
    store_sum_us: AtomicU64,
    store_failures: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    started: AtomicI64,
    policy_loaded: AtomicI64,
    /// The last reload's error while the previous rules stay in force.
    reload_error: Mutex<Option<String>>,
    /// The last store failure and when it happened (Unix seconds).
    store_error: Mutex<Option<(i64, String)>>,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);

static METRICS: Metrics = Metrics {
    logins: [ZERO; LOGINS.len()],
    verifications: [ZERO; VERIFICATIONS.len()],
    refused: [ZERO; REFUSED.len()],
    store_buckets: [ZERO; BUCKETS.len() + 1],
    store_sum_us: ZERO,
    store_failures: ZERO,
    reloads_ok: ZERO,
    reloads_failed: ZERO,
    started: AtomicI64::new(0),
    policy_loaded: AtomicI64::new(0),
    reload_error: Mutex::new(None),
    store_error: Mutex::new(None),
};

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Adds one to the counter of `label` among `labels` (nothing for an unknown label).
fn bump(counters: &[AtomicU64], labels: &[&str], label: &str) {
    if let Some(i) = labels.iter().position(|l| *l == label) {
        counters[i].fetch_add(1, Relaxed);
    }
}

/// Notes that guardd started now (once per serving run).
pub fn started() {
    METRICS.started.store(unix_now(), Relaxed);
}

/// When this guardd started serving (Unix seconds; 0 before).
pub fn started_at() -> i64 {
    METRICS.started.load(Relaxed)
}

/// Notes that rules were loaded (`at_start`, or by a reload) or that a reload failed.
pub fn policy_loaded(at_start: bool, result: Result<(), String>) {
    let mut error = METRICS
        .reload_error
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    match result {
        Ok(()) => {
            METRICS.policy_loaded.store(unix_now(), Relaxed);
            if !at_start {
                METRICS.reloads_ok.fetch_add(1, Relaxed);
            }
            *error = None;
        }
        Err(e) => {
            METRICS.reloads_failed.fetch_add(1, Relaxed);
            *error = Some(e);
        }
    }
}

/// When the rules in force were loaded, and the last reload's error if it failed since.
pub fn policy_state() -> (i64, Option<String>) {
    let error = METRICS
        .reload_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    (METRICS.policy_loaded.load(Relaxed), error)
}

/// Notes one store call's round trip (queueing, running, committing).
pub fn store_call(took: Duration) {
    let secs = took.as_secs_f64();
    let i = BUCKETS
        .iter()
        .position(|&b| secs <= b)
        .unwrap_or(BUCKETS.len());
    METRICS.store_buckets[i].fetch_add(1, Relaxed);
    METRICS
        .store_sum_us
        .fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
}

/// Notes a store failure: a batch or transaction that did not commit, a call with no answer
/// in time, a refused queue, a status probe that failed.
pub fn store_failed(reason: &str) {
    METRICS.store_failures.fetch_add(1, Relaxed);
    *METRICS
        .store_error
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some((unix_now(), reason.to_owned()));
}

/// The last store failure since start, with its time.
pub fn last_store_failure() -> Option<(i64, String)> {
    METRICS
        .store_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// Counts a refused call (see `audit::refused`).
pub fn refused(action: &str) {
    let known = REFUSED.contains(&action);
    bump(
        &METRICS.refused,
        &REFUSED,
        if known { action } else { "other" },
    );
}

/// Counts an audited decision of a login conversation (see `audit::record`).
pub fn decision(event: &Event<'_>) {
    if let Some(i) = login_label(event).and_then(|label| LOGINS.iter().position(|l| *l == label)) {
        METRICS.logins[i].fetch_add(1, Relaxed);
    }
    if event.action == "answer" {
        let result = match (event.outcome, event.reason) {
            ("permit", "otp verified") => Some("token"),
            ("permit", "backup code used") => Some("backup_code"),
            ("deny", "wrong, expired or replayed code") => Some("wrong"),
            ("deny", "locked after repeated failures") => Some("locked"),
            _ => None,
        };
        if let Some(result) = result {
            bump(&METRICS.verifications, &VERIFICATIONS, result);
        }
    }
}

/// The (outcome, reason) of a login decision: Begin and Check decided without a prompt
/// (`prompt` when an OTP is asked), and every answer to a prompt. Other events are not logins.
fn login_label(event: &Event<'_>) -> Option<(&'static str, &'static str)> {
    if !matches!(event.action, "begin" | "check" | "answer") {
        return None;
    }
    let reason = event.reason;
    Some(match event.outcome {
        "prompt" => ("prompt", "otp_required"),
        "refused" => ("error", "overloaded"),
        "permit" => (
            "permit",
            match reason {
                "rules permit without otp" => "rules",
                "otp required only of enrolled users" => "unenrolled",
                "otp verified" => "otp",
                "backup code used" => "backup_code",
                "reuse" => "reuse",
                _ => "other",
            },
        ),
        "deny" => (
            "deny",
            match reason {
                "rules deny" => "rules",
                "otp required and no active token" => "not_enrolled",
                "wrong, expired or replayed code" => "wrong_code",
                "locked after repeated failures" => "locked",
                "unknown or expired challenge" => "expired",
                r if r.starts_with("indeterminate") => "indeterminate",
                r if r.starts_with("records of ") => "foreign",
                _ => "other",
            },
        ),
        _ => return None,
    })
}

/// What the store held at the last look, for the gauges.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// None when the store did not answer.
    pub overview: Option<Overview>,
}

/// The HELP and TYPE lines that open a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The exposition of every metric, with `gauges` from the store.
pub fn render(gauges: &Gauges) -> String {
    let mut out = String::with_capacity(8192);
    let m = &METRICS;
    let load = |a: &AtomicU64| a.load(Relaxed);
    family(
        &mut out,
        "soffid_otp_build_info",
        "gauge",
        "Always 1; the version of the guardd that writes this file.",
    );
    let _ = writeln!(
        out,
        "soffid_otp_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    family(
        &mut out,
        "soffid_otp_start_time_seconds",
        "gauge",
        "When guardd started serving, Unix seconds.",
    );
    let _ = writeln!(out, "soffid_otp_start_time_seconds {}", started_at());
    family(
        &mut out,
        "soffid_otp_logins_total",
        "counter",
        "Login decisions: Begin and Check without a prompt, prompts, and every answer to one.",
    );
    for ((outcome, reason), n) in LOGINS.iter().zip(&m.logins) {
        let _ = writeln!(
            out,
            "soffid_otp_logins_total{{outcome=\"{outcome}\",reason=\"{reason}\"}} {}",
            load(n)
        );
    }
    family(
        &mut out,
        "soffid_otp_verifications_total",
        "counter",
        "Answers checked: accepted by a token or a backup code, wrong, or refused unchecked during a lock-out.",
    );
    for (result, n) in VERIFICATIONS.iter().zip(&m.verifications) {
        let _ = writeln!(
            out,
            "soffid_otp_verifications_total{{result=\"{result}\"}} {}",
            load(n)
        );
    }
    family(
        &mut out,
        "soffid_otp_refused_calls_total",
        "counter",
        "Calls refused before doing anything: not allowed for the caller, or over its budget.",
    );
    for (action, n) in REFUSED.iter().zip(&m.refused) {
        let _ = writeln!(
            out,
            "soffid_otp_refused_calls_total{{action=\"{action}\"}} {}",
            load(n)
        );
    }
    family(
        &mut out,
        "soffid_otp_store_call_seconds",
        "histogram",
        "Store calls' round trips: queueing, running and committing.",
    );
    let mut cumulative = 0;
    for (i, n) in m.store_buckets.iter().enumerate() {
        cumulative += load(n);
        let le = BUCKETS.get(i).map_or("+Inf".to_owned(), |b| b.to_string());
        let _ = writeln!(
            out,
            "soffid_otp_store_call_seconds_bucket{{le=\"{le}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "soffid_otp_store_call_seconds_sum {}\nsoffid_otp_store_call_seconds_count {cumulative}",
        load(&m.store_sum_us) as f64 / 1e6
    );
    family(
        &mut out,
        "soffid_otp_store_failures_total",
        "counter",
        "Store calls or batches that failed: not committed, unanswered in time, or refused.",
    );
    let _ = writeln!(
        out,
        "soffid_otp_store_failures_total {}",
        load(&m.store_failures)
    );
    family(
        &mut out,
        "soffid_otp_policy_reloads_total",
        "counter",
        "Reloads of the rules file; a failed one leaves the previous rules in force.",
    );
    let _ = writeln!(
        out,
        "soffid_otp_policy_reloads_total{{result=\"ok\"}} {}\nsoffid_otp_policy_reloads_total{{result=\"failed\"}} {}",
        load(&m.reloads_ok),
        load(&m.reloads_failed)
    );
    let (loaded, reload_error) = policy_state();
    family(
        &mut out,
        "soffid_otp_policy_loaded_timestamp_seconds",
        "gauge",
        "When the rules in force were loaded, Unix seconds.",
    );
    let _ = writeln!(out, "soffid_otp_policy_loaded_timestamp_seconds {loaded}");
    family(
        &mut out,
        "soffid_otp_policy_reload_failing",
        "gauge",
        "1 while the last reload failed and the previous rules stay in force.",
    );
    let _ = writeln!(
        out,
        "soffid_otp_policy_reload_failing {}",
        u8::from(reload_error.is_some())
    );
    family(
        &mut out,
        "soffid_otp_store_up",
        "gauge",
        "1 when the store answered the last look, else 0.",
    );
    let _ = writeln!(
        out,
        "soffid_otp_store_up {}",
        u8::from(gauges.overview.is_some())
    );
    if let Some(o) = &gauges.overview {
        family(
            &mut out,
            "soffid_otp_users",
            "gauge",
            "Users holding at least one token.",
        );
        let _ = writeln!(out, "soffid_otp_users {}", o.users);
        family(&mut out, "soffid_otp_tokens", "gauge", "Tokens by state.");
        for (state, n) in [
            ("pending", o.tokens_pending),
            ("active", o.tokens_active),
            ("disabled", o.tokens_disabled),
        ] {
            let _ = writeln!(out, "soffid_otp_tokens{{state=\"{state}\"}} {n}");
        }
        family(
            &mut out,
            "soffid_otp_locked_users",
            "gauge",
            "Users in back-off now (answers refused unchecked).",
        );
        let _ = writeln!(out, "soffid_otp_locked_users {}", o.locked_total);
    }
    out
}

/// Writes `text` to `path` atomically: a temporary file beside it (0644: the metrics name no
/// user and hold no secret, and node_exporter runs as its own user), then a rename, so a reader
/// never sees half a file.
pub fn write_file(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A leading dot: the textfile collector reads only `*.prom`, never this.
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.write_all(text.as_bytes())?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(action: &'a str, outcome: &'a str, reason: &'a str) -> Event<'a> {
        Event {
            action,
            outcome,
            reason,
            ..Event::default()
        }
    }

    /// Every reason the service audits for a login maps to its own label; a reason this table
    /// does not know is `other`, never a new series.
    #[test]
    fn login_decisions_map_to_fixed_labels() {
        let cases = [
            (
                ("begin", "permit", "rules permit without otp"),
                ("permit", "rules"),
            ),
            (
                ("begin", "permit", "otp required only of enrolled users"),
                ("permit", "unenrolled"),
            ),
            (
                ("begin", "prompt", "otp required"),
                ("prompt", "otp_required"),
            ),
            (("begin", "deny", "rules deny"), ("deny", "rules")),
            (
                ("check", "deny", "indeterminate: groups unknown"),
                ("deny", "indeterminate"),
            ),
            (
                ("begin", "deny", "otp required and no active token"),
                ("deny", "not_enrolled"),
            ),
            (
                ("begin", "deny", "records of ann belong to uid 7 but ..."),
                ("deny", "foreign"),
            ),
            (("answer", "permit", "otp verified"), ("permit", "otp")),
            (("begin", "permit", "reuse"), ("permit", "reuse")),
            (
                ("answer", "permit", "backup code used"),
                ("permit", "backup_code"),
            ),
            (
                ("answer", "deny", "wrong, expired or replayed code"),
                ("deny", "wrong_code"),
            ),
            (
                ("answer", "deny", "locked after repeated failures"),
                ("deny", "locked"),
            ),
            (
                ("answer", "deny", "unknown or expired challenge"),
                ("deny", "expired"),
            ),
            (("answer", "deny", "something new"), ("deny", "other")),
            (
                ("begin", "refused", "logins in progress: over budget"),
                ("error", "overloaded"),
            ),
        ];
        for ((action, outcome, reason), label) in cases {
            assert_eq!(
                login_label(&event(action, outcome, reason)),
                Some(label),
                "{action} {outcome} {reason}"
            );
            assert!(LOGINS.contains(&label));
        }
        assert_eq!(login_label(&event("enroll", "ok", "")), None);
        assert_eq!(login_label(&event("list", "refused", "x")), None);
    }

    #[test]
    fn the_exposition_has_every_series_and_a_cumulative_histogram() {
        store_call(Duration::from_micros(700));
        store_call(Duration::from_secs(10));
        refused("no-such-call");
        let text = render(&Gauges {
            overview: Some(Overview {
                users: 2,
                tokens_active: 3,
                ..Overview::default()
            }),
        });
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
                .parse()
                .unwrap()
        };
        assert!(value("soffid_otp_store_call_seconds_bucket{le=\"0.001\"}") >= 1.0);
        let all = value("soffid_otp_store_call_seconds_bucket{le=\"+Inf\"}");
        assert_eq!(all, value("soffid_otp_store_call_seconds_count"));
        assert!(all >= 2.0);
        assert!(value("soffid_otp_refused_calls_total{action=\"other\"}") >= 1.0);
        assert_eq!(value("soffid_otp_tokens{state=\"active\"}"), 3.0);
        assert_eq!(value("soffid_otp_store_up"), 1.0);
        for (outcome, reason) in LOGINS {
            value(&format!(
                "soffid_otp_logins_total{{outcome=\"{outcome}\",reason=\"{reason}\"}}"
            ));
        }
        // Every sample line belongs to a family declared before it.
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(
                    declared.iter().any(|d| name.starts_with(d.as_str())),
                    "{line}"
                );
            }
        }
        let down = render(&Gauges::default());
        assert!(down.contains("soffid_otp_store_up 0"));
        assert!(!down.contains("soffid_otp_tokens{"));
    }

    #[test]
    fn the_file_is_replaced_whole_and_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guardd.prom");
        write_file(&path, "a 1\n").unwrap();
        write_file(&path, "a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
