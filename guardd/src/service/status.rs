//! `guardctl status` and the metrics file's gauges: the daemon's own state for operators
//! (docs/operating.md#status). Names, counts and times only: never a secret, a code, a backup
//! code or a database password.

use std::time::{Duration, Instant};

use proto::v1::{BackupCodesLeft, LockedUser, StatusReply, StatusRequest, StoreCounts};
use tonic::{Request, Response};

use super::{admin_audit, GuardService, ServiceError};
use crate::caller::{Action, Caller};
use crate::metrics;
use crate::store::{Overview, StoreError};

/// Users with fewer unused backup codes than this are listed, unless the request says.
pub const BACKUP_CODES_BELOW: u32 = 3;
/// The largest threshold a request may ask for (a set has 10 codes).
const MOST_BACKUP_CODES_BELOW: u32 = 100;

/// What the store held at one look, and how long the look took.
pub struct Snapshot {
    pub overview: Result<Overview, StoreError>,
    /// The round trip of the look: queueing, the reads and the commit.
    pub latency: Duration,
}

impl GuardService {
    /// Checks the store's health and reads its overview now, as one store call that writes
    /// (see `Store::probe`), so its round trip includes a durable commit.
    pub async fn snapshot(&self, backup_codes_below: u32) -> Snapshot {
        let (now, host) = (self.clock.now() as i64, self.host.clone());
        let started = Instant::now();
        let overview = self
            .store
            .run(move |s| {
                s.probe(&host, now)?;
                s.overview(now, backup_codes_below)
            })
            .await;
        if let Err(e) = &overview {
            metrics::store_failed(&format!("health check: {e}"));
        }
        Snapshot {
            overview,
            latency: started.elapsed(),
        }
    }

    /// The metrics exposition, with the store's gauges read now.
    pub async fn metrics(&self) -> String {
        let overview = self.snapshot(BACKUP_CODES_BELOW).await.overview.ok();
        metrics::render(&metrics::Gauges { overview })
    }
}

pub(super) async fn status(
    svc: &GuardService,
    req: Request<StatusRequest>,
) -> Result<Response<StatusReply>, ServiceError> {
    let caller = Caller::of(&req)?;
    // Admins only: it names the users locked out or short of backup codes.
    svc.authorize(&caller, Action::Admin, None, "status", |_, _| Ok(false))
        .await?;
    let below = match req.into_inner().backup_codes_below {
        0 => BACKUP_CODES_BELOW,
        n => n.min(MOST_BACKUP_CODES_BELOW),
    };
    let snapshot = svc.snapshot(below).await;
    let policy = svc.policy();
    let (policy_loaded, reload_error) = metrics::policy_state();
    let (last_error_at, last_error) = metrics::last_store_failure().unwrap_or_default();
    let mut problems = Vec::new();
    let (store_ok, store_error, counts) = match snapshot.overview {
        Ok(o) => (true, String::new(), Some(counts(o))),
        Err(e) => {
            problems.push(format!("the token store does not answer: {e}"));
            (false, e.to_string(), None)
        }
    };
    if let Some(e) = &reload_error {
        problems.push(format!(
            "the rules file no longer loads; the rules loaded before stay in force: {e}"
        ));
    }
    admin_audit(&caller, "status", "*", true, "");
    Ok(Response::new(StatusReply {
        version: env!("CARGO_PKG_VERSION").into(),
        started: metrics::started_at(),
        now: svc.clock.now() as i64,
        store_kind: svc.store.kind().into(),
        store_location: redact(&svc.store.describe()),
        store_ok,
        store_error,
        store_latency_us: u64::try_from(snapshot.latency.as_micros()).unwrap_or(u64::MAX),
        store_last_error: last_error,
        store_last_error_at: last_error_at,
        counts,
        policy_file: policy.file().into(),
        policy_digest: policy.digest().into(),
        policy_loaded,
        policy_reload_error: reload_error.unwrap_or_default(),
        backup_codes_below: below,
        metrics_file: svc
            .config
            .metrics_file
            .as_ref()
            .map(|f| f.display().to_string())
            .unwrap_or_default(),
        problems,
    }))
}

fn counts(o: Overview) -> StoreCounts {
    StoreCounts {
        users: o.users,
        tokens_pending: o.tokens_pending,
        tokens_active: o.tokens_active,
        tokens_disabled: o.tokens_disabled,
        locked: o
            .locked
            .into_iter()
            .map(|(user, l)| LockedUser {
                user,
                failures: l.failures,
                until: l.until,
            })
            .collect(),
        locked_total: o.locked_total,
        backup_codes_low: o
            .backup_codes_low
            .into_iter()
            .map(|(user, left)| BackupCodesLeft { user, left })
            .collect(),
        backup_codes_low_total: o.backup_codes_low_total,
        schema_version: o.schema_version,
    }
}

/// A store location fit to show: a URL's password, in its user part or as a `password=`
/// parameter, is replaced by `***`. guardd refuses such URLs anyway (the password lives in
/// `database_password_file`); this keeps one from ever being shown should that change.
pub fn redact(location: &str) -> String {
    let Some((scheme, rest)) = location.split_once("://") else {
        return location.to_owned();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{hosts}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_show_in_a_store_location() {
        assert_eq!(
            redact("/var/lib/soffid-otp/guardd.db"),
            "/var/lib/soffid-otp/guardd.db"
        );
        assert_eq!(
            redact("postgresql://guardd@/guardd?host=/run/postgresql"),
            "postgresql://guardd@/guardd?host=/run/postgresql"
        );
        assert_eq!(
            redact("postgresql://guardd:s3cret@db1,db2:5433/guardd?sslmode=require"),
            "postgresql://guardd:***@db1,db2:5433/guardd?sslmode=require"
        );
        assert_eq!(
            redact("postgres://db/guardd?user=g&password=s3cret&host=x"),
            "postgres://db/guardd?user=g&password=***&host=x"
        );
        assert_eq!(
            redact("postgresql://u:p%40ss@h?PASSWORD=x"),
            "postgresql://u:***@h?PASSWORD=***"
        );
    }
}
