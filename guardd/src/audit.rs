//! Every decision guardd takes becomes one structured event with target `audit`, so operators can
//! filter it (journalctl SYSLOG_IDENTIFIER=guardd, or `grep audit`). Codes, secrets and URIs are
//! never passed here: the event type has no field that could carry them.

use crate::caller::Caller;

/// One audit line.
#[derive(Debug, Default)]
pub struct Event<'a> {
    /// What was asked: begin, answer, enroll, confirm, list, delete.
    pub action: &'a str,
    pub user: &'a str,
    pub service: &'a str,
    pub rhost: &'a str,
    pub tty: &'a str,
    /// permit, deny, prompt, ok, refused.
    pub outcome: &'a str,
    /// Why: the rule or the reason for a refusal.
    pub reason: &'a str,
    pub token: &'a str,
    /// The deciding rule ids (or `default`) and the policy digest, for policy decisions.
    pub rule: &'a str,
    pub policy: &'a str,
    /// The audit id of the login that proved an OTP and made reuse grants, on that login's
    /// line and on the line of every login a grant lets in.
    pub login: &'a str,
    pub caller_uid: Option<u32>,
    pub caller_pid: Option<i32>,
}

impl Event<'_> {
    pub fn caller(mut self, caller: &Caller) -> Self {
        self.caller_uid = Some(caller.uid);
        self.caller_pid = caller.pid;
        self
    }
}

impl Event<'_> {
    /// Whether the event records something only a secret could do: a code or backup code that
    /// verified (`answer` permitted), or a change made after a proof (enrolment, confirmation,
    /// recovery, deletion: `ok`). Such events cannot be repeated at will, so they are always
    /// audited; what any local user can make as fast as they like (a refused or denied call, a
    /// prompt, a permit the rules give without a code, a listing, a status) is rate-limited per
    /// uid.
    fn proves_a_secret(&self) -> bool {
        match self.outcome {
            "ok" => !matches!(self.action, "list" | "status"),
            "permit" => self.action == "answer",
            _ => false,
        }
    }
}

/// Writes `event` to the audit trail. Events of unprivileged callers that anyone can repeat at
/// will (see `Event::proves_a_secret`) count toward the caller's uid like refusals, at most
/// `REFUSALS_LOGGED` lines per `REFUSAL_INTERVAL`, the rest summed up: otherwise one user could
/// write thousands of lines a second, filling the disk and making journald drop guardd's lines
/// for everyone (its rate limit is per service), root's logins included.
pub fn record(event: &Event<'_>) {
    // Counted before the rate limit: the metrics see every decision.
    crate::metrics::decision(event);
    let limited = event.caller_uid.is_some_and(|uid| uid != 0) && !event.proves_a_secret();
    if limited && !admit(event.caller_uid.unwrap_or_default()) {
        return;
    }
    write(event);
}

/// This guardd's host name, on every audit line: in a fleet, one store's events come from many
/// hosts.
static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Names the host the audit lines come from (once, at start).
pub fn set_host(host: &str) {
    let _ = HOST.set(host.to_owned());
}

fn write(event: &Event<'_>) {
    tracing::info!(
        target: "audit",
        host = HOST.get().map_or("", String::as_str),
        action = event.action,
        user = event.user,
        service = event.service,
        rhost = event.rhost,
        tty = event.tty,
        outcome = event.outcome,
        reason = event.reason,
        token = event.token,
        rule = event.rule,
        policy = event.policy,
        login = event.login,
        caller_uid = event.caller_uid,
        caller_pid = event.caller_pid,
    );
}

/// How often refusals of one uid are summed up.
pub const REFUSAL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Refusals of one uid audited line by line per interval; the rest are counted.
const REFUSALS_LOGGED: u32 = 10;
/// Uids tracked at most; beyond, finished intervals are summed up and forgotten early.
const REFUSAL_UIDS: usize = 4096;

/// One uid's refusals in the current interval.
struct Refusals {
    since: std::time::Instant,
    logged: u32,
    suppressed: u64,
}

static REFUSALS: std::sync::Mutex<Option<std::collections::HashMap<u32, Refusals>>> =
    std::sync::Mutex::new(None);

/// Audits a refused call, at most `REFUSALS_LOGGED` lines per uid per `REFUSAL_INTERVAL`; the
/// rest are summed up in one line per interval, so a flood of refused calls cannot flood the
/// log (any local user can make them).
pub fn refused(caller: &Caller, action: &str, user: &str, reason: &str) {
    crate::metrics::refused(action);
    if admit(caller.uid) {
        write(
            &Event {
                action,
                user,
                outcome: "refused",
                reason,
                ..Event::default()
            }
            .caller(caller),
        );
    }
}

/// Whether one more rate-limited line of `uid` may be written now; if not, it is counted for
/// the summary.
fn admit(uid: u32) -> bool {
    let now = std::time::Instant::now();
    let mut guard = REFUSALS.lock().unwrap_or_else(|p| p.into_inner());
    let map = guard.get_or_insert_with(Default::default);
    if map.len() >= REFUSAL_UIDS && !map.contains_key(&uid) {
        summarize(map, now, true);
    }
    let entry = map.entry(uid).or_insert(Refusals {
        since: now,
        logged: 0,
        suppressed: 0,
    });
    if now.duration_since(entry.since) >= REFUSAL_INTERVAL {
        summary(uid, entry);
        *entry = Refusals {
            since: now,
            logged: 0,
            suppressed: 0,
        };
    }
    if entry.logged < REFUSALS_LOGGED {
        entry.logged += 1;
        true
    } else {
        entry.suppressed += 1;
        false
    }
}

/// Writes the summaries of finished intervals and forgets them (called periodically).
pub fn flush_refusals() {
    let mut guard = REFUSALS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(map) = guard.as_mut() {
        summarize(map, std::time::Instant::now(), false);
    }
}

fn summarize(
    map: &mut std::collections::HashMap<u32, Refusals>,
    now: std::time::Instant,
    all: bool,
) {
    map.retain(|uid, r| {
        if all || now.duration_since(r.since) >= REFUSAL_INTERVAL {
            summary(*uid, r);
            false
        } else {
            true
        }
    });
}

fn summary(uid: u32, r: &Refusals) {
    if r.suppressed > 0 {
        tracing::info!(
            target: "audit",
            action = "refusals",
            outcome = "refused",
            reason = "rate-limited: further refused or unproven calls of this uid not audited one by one",
            suppressed = r.suppressed,
            caller_uid = uid,
        );
    }
}

/// A warning logged at most once per `REFUSAL_INTERVAL` for each `what`.
pub fn warn_limited(what: &'static str, message: &str) {
    static LAST: std::sync::Mutex<Vec<(&'static str, std::time::Instant)>> =
        std::sync::Mutex::new(Vec::new());
    let now = std::time::Instant::now();
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    match last.iter_mut().find(|(w, _)| *w == what) {
        Some((_, at)) if now.duration_since(*at) < REFUSAL_INTERVAL => return,
        Some((_, at)) => *at = now,
        None => last.push((what, now)),
    }
    drop(last);
    tracing::warn!("{message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_of_one_uid_are_counted_not_logged_past_the_limit() {
        let caller = Caller {
            uid: 4_000_123,
            gid: 0,
            pid: None,
            real_uid: None,
            owner: false,
            process: crate::caller::Process::Unknown,
        };
        for _ in 0..100 {
            refused(&caller, "list", "*", "permission denied");
        }
        let guard = REFUSALS.lock().unwrap();
        let r = &guard.as_ref().unwrap()[&caller.uid];
        assert_eq!((r.logged, r.suppressed), (REFUSALS_LOGGED, 90));
    }

    /// Any user can make guardd deny them as fast as they like (an answer to a made-up
    /// challenge, a confirmation with nothing pending, a login the rules permit): those lines
    /// are limited per uid like refusals. What took a secret is always written, and root's
    /// callers (sshd, sudo) are never limited.
    #[test]
    fn events_anyone_can_repeat_are_limited_per_uid_but_proven_ones_and_roots_are_not() {
        let event = |uid, action, outcome| Event {
            action,
            outcome,
            caller_uid: Some(uid),
            ..Event::default()
        };
        let counts = |uid| {
            let guard = REFUSALS.lock().unwrap();
            guard
                .as_ref()
                .and_then(|m| m.get(&uid))
                .map(|r| (r.logged, r.suppressed))
        };
        for _ in 0..50 {
            record(&event(4_000_200, "answer", "deny"));
            record(&event(4_000_200, "confirm", "refused"));
            record(&event(4_000_200, "begin", "permit"));
            record(&event(4_000_200, "list", "ok"));
            record(&event(4_000_200, "status", "ok"));
        }
        assert_eq!(counts(4_000_200), Some((REFUSALS_LOGGED, 240)));
        for _ in 0..50 {
            record(&event(4_000_201, "answer", "permit"));
            record(&event(4_000_201, "enroll", "ok"));
            record(&event(4_000_201, "recover", "ok"));
        }
        assert_eq!(counts(4_000_201), None, "proven events are not counted");
        let before = counts(0);
        for _ in 0..50 {
            record(&event(0, "answer", "deny"));
        }
        assert_eq!(counts(0), before, "root's callers are not limited");
    }
}
