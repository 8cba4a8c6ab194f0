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

/// Writes `event` to the audit trail.
pub fn record(event: &Event<'_>) {
    tracing::info!(
        target: "audit",
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
        caller_uid = event.caller_uid,
        caller_pid = event.caller_pid,
    );
}
