//! The JSON that `guardctl --json` prints: one object per command, its shape stable and
//! documented (docs/operating.md#json-output). Times are Unix seconds; `null` means never or
//! unknown. Fields may be added; none is renamed or removed without a new major version.

use proto::v1::{ExplainReply, StatusReply, Token};
use serde::Serialize;

/// A token as `list`, `confirm`, `enable`, `disable`, `resync` and `enroll` show it.
#[derive(Serialize)]
pub struct TokenJson<'a> {
    pub id: &'a str,
    pub user: &'a str,
    pub label: &'a str,
    /// `totp` or `hotp`.
    pub kind: &'a str,
    /// `pending`, `active` or `disabled`.
    pub state: &'a str,
    pub created: Option<i64>,
    pub last_used: Option<i64>,
}

impl<'a> From<&'a Token> for TokenJson<'a> {
    fn from(t: &'a Token) -> Self {
        let time = |s: i64| (s > 0).then_some(s);
        TokenJson {
            id: &t.id,
            user: &t.user,
            label: &t.label,
            kind: &t.kind,
            state: &t.state,
            created: time(t.created),
            last_used: time(t.last_used),
        }
    }
}

/// `guardctl list`: `stale_before` is the cut-off of `--stale` (tokens last used, or created
/// and never used, before it), else null.
#[derive(Serialize)]
pub struct ListJson<'a> {
    pub tokens: Vec<TokenJson<'a>>,
    pub stale_before: Option<i64>,
}

/// `confirm`, `enable`, `disable`, `resync`: the token as it is now.
#[derive(Serialize)]
pub struct OneToken<'a> {
    pub token: TokenJson<'a>,
}

/// `guardctl enroll`: the pending token and its otpauth:// URI (which holds the secret: shown
/// once, to be scanned; never logged by guardd).
#[derive(Serialize)]
pub struct EnrollJson<'a> {
    pub token: TokenJson<'a>,
    pub uri: &'a str,
}

/// `guardctl enroll --invite`.
#[derive(Serialize)]
pub struct InviteJson<'a> {
    pub user: &'a str,
    pub invitation: &'a str,
    pub expires: i64,
}

/// `guardctl backup-codes`: shown once.
#[derive(Serialize)]
pub struct BackupCodesJson<'a> {
    pub user: &'a str,
    pub codes: Vec<&'a str>,
}

#[derive(Serialize)]
pub struct DeleteJson<'a> {
    pub user: &'a str,
    pub deleted: &'a str,
}

#[derive(Serialize)]
pub struct UnlockJson<'a> {
    pub user: &'a str,
    pub was_locked: bool,
}

#[derive(Serialize)]
pub struct ForgetJson<'a> {
    pub user: &'a str,
    pub forgotten: u32,
}

#[derive(Serialize)]
pub struct ReloadJson<'a> {
    pub digest: &'a str,
    pub warnings: &'a [String],
}

#[derive(Serialize)]
pub struct ExplainJson<'a> {
    pub request: &'a str,
    pub policy: &'a str,
    pub rules: Vec<RuleJson<'a>>,
    pub decision: &'a str,
    /// Whether a reuse grant would let the login in (an OTP decision under `reuse`), else null.
    pub reuse: Option<&'a str>,
}

#[derive(Serialize)]
pub struct RuleJson<'a> {
    pub index: u32,
    pub id: &'a str,
    pub line: u32,
    pub outcome: &'a str,
    pub why: &'a str,
    pub decides: bool,
}

impl<'a> From<&'a ExplainReply> for ExplainJson<'a> {
    fn from(r: &'a ExplainReply) -> Self {
        ExplainJson {
            request: &r.request,
            policy: &r.policy,
            rules: r
                .rules
                .iter()
                .map(|l| RuleJson {
                    index: l.index,
                    id: &l.id,
                    line: l.line,
                    outcome: &l.outcome,
                    why: &l.why,
                    decides: l.decides,
                })
                .collect(),
            decision: &r.decision,
            reuse: Some(r.reuse.as_str()).filter(|s| !s.is_empty()),
        }
    }
}

/// `guardctl status`.
#[derive(Serialize)]
pub struct StatusJson<'a> {
    /// False when `problems` is not empty (exit status 3).
    pub healthy: bool,
    pub problems: &'a [String],
    pub version: &'a str,
    pub started: i64,
    pub uptime_seconds: i64,
    pub store: StoreJson<'a>,
    pub policy: PolicyJson<'a>,
    /// Null when the store did not answer.
    pub counts: Option<CountsJson<'a>>,
    pub metrics_file: Option<&'a str>,
}

#[derive(Serialize)]
pub struct StoreJson<'a> {
    /// `sqlite` or `postgres`.
    pub kind: &'a str,
    /// The file, or the URL without any password.
    pub location: &'a str,
    pub ok: bool,
    pub error: Option<&'a str>,
    /// This status call's store round trip (queueing, reads, commit), in microseconds.
    pub latency_us: u64,
    pub schema_version: Option<i64>,
    pub last_error: Option<&'a str>,
    pub last_error_at: Option<i64>,
}

#[derive(Serialize)]
pub struct PolicyJson<'a> {
    pub file: &'a str,
    pub digest: &'a str,
    pub loaded: i64,
    pub reload_error: Option<&'a str>,
}

#[derive(Serialize)]
pub struct CountsJson<'a> {
    pub users: u64,
    pub tokens: TokenCounts,
    pub locked: LockedJson<'a>,
    pub backup_codes_low: BackupLowJson<'a>,
}

#[derive(Serialize)]
pub struct TokenCounts {
    pub pending: u64,
    pub active: u64,
    pub disabled: u64,
}

/// Users in back-off; `users` lists at most 100, the longest wait first.
#[derive(Serialize)]
pub struct LockedJson<'a> {
    pub total: u64,
    pub users: Vec<LockedUserJson<'a>>,
}

#[derive(Serialize)]
pub struct LockedUserJson<'a> {
    pub user: &'a str,
    pub failures: u32,
    pub until: i64,
}

/// Users holding at least one but fewer than `below` unused backup codes; at most 100 listed.
#[derive(Serialize)]
pub struct BackupLowJson<'a> {
    pub below: u32,
    pub total: u64,
    pub users: Vec<BackupLeftJson<'a>>,
}

#[derive(Serialize)]
pub struct BackupLeftJson<'a> {
    pub user: &'a str,
    pub left: u32,
}

fn some(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

impl<'a> From<&'a StatusReply> for StatusJson<'a> {
    fn from(r: &'a StatusReply) -> Self {
        let counts = r.counts.as_ref();
        StatusJson {
            healthy: r.problems.is_empty(),
            problems: &r.problems,
            version: &r.version,
            started: r.started,
            uptime_seconds: (r.now - r.started).max(0),
            store: StoreJson {
                kind: &r.store_kind,
                location: &r.store_location,
                ok: r.store_ok,
                error: some(&r.store_error),
                latency_us: r.store_latency_us,
                schema_version: counts.map(|c| c.schema_version),
                last_error: some(&r.store_last_error),
                last_error_at: (r.store_last_error_at > 0).then_some(r.store_last_error_at),
            },
            policy: PolicyJson {
                file: &r.policy_file,
                digest: &r.policy_digest,
                loaded: r.policy_loaded,
                reload_error: some(&r.policy_reload_error),
            },
            counts: counts.map(|c| CountsJson {
                users: c.users,
                tokens: TokenCounts {
                    pending: c.tokens_pending,
                    active: c.tokens_active,
                    disabled: c.tokens_disabled,
                },
                locked: LockedJson {
                    total: c.locked_total,
                    users: c
                        .locked
                        .iter()
                        .map(|l| LockedUserJson {
                            user: &l.user,
                            failures: l.failures,
                            until: l.until,
                        })
                        .collect(),
                },
                backup_codes_low: BackupLowJson {
                    below: r.backup_codes_below,
                    total: c.backup_codes_low_total,
                    users: c
                        .backup_codes_low
                        .iter()
                        .map(|b| BackupLeftJson {
                            user: &b.user,
                            left: b.left,
                        })
                        .collect(),
                },
            }),
            metrics_file: some(&r.metrics_file),
        }
    }
}

/// Prints `value` as pretty JSON on stdout, one document.
pub fn print(value: &impl Serialize) -> Result<(), super::CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| super::CliError::Local(format!("cannot encode JSON: {e}")))?;
    println!("{text}");
    Ok(())
}
