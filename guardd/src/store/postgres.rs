//! The shared store: a PostgreSQL database that every guardd of a fleet points at. Secrets stay
//! sealed with the key file of each host, so the database (its administrator, a dump, a replica)
//! holds nothing that opens a token. Every statement that uses up a code or counts a failure is
//! one atomic, conditional statement, so hosts racing with one code cannot both win.

mod connect;
mod schema;

use std::sync::{Arc, Mutex, MutexGuard};

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use zeroize::Zeroizing;

use super::copy::{BackupCodeRow, Dump, InvitationRow, LockoutRow, Rows, TokenRow};
use super::{
    row_params, Binding, LoginRecord, NewToken, Overview, Store, StoreError, TokenInfo,
    TokenSecret, TokenState, OVERVIEW_LISTED,
};
use crate::grant::{Attributes, Grant, MAX_PER_USER};
use crate::lockout::{Backoff, Lockout};
use crate::otp::{Counter, Kind};
use crate::seal::{SealError, Sealer};
pub(crate) use connect::Connector;
pub use connect::PgSettings;
use connect::{col, round_trip, Conn};
pub(crate) use schema::prepare;
use schema::{prepare_with, KeySource};

/// The advisory lock class of the per-user attempt lock.
const ATTEMPT_LOCK: i32 = 0x534e;

/// One connection to the shared store, used by one pool worker at a time; it reconnects by
/// itself after the server went away.
pub struct PgStore {
    conn: Mutex<Conn>,
    sealer: Arc<Sealer>,
}

impl PgStore {
    pub(crate) fn new(connector: Arc<Connector>, sealer: Arc<Sealer>) -> std::io::Result<PgStore> {
        Ok(PgStore {
            conn: Mutex::new(Conn::new(connector)?),
            sealer,
        })
    }

    /// Brings the schema to this guardd's version and checks that this store's key opens the
    /// secrets (see [`prepare`]).
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        prepare_with(&mut self.conn(), KeySource::Loaded(&self.sealer)).map(drop)
    }

    /// Starts the transaction of one call. Its BEGIN is sent with the call's first statement
    /// (see `Conn::query`); a call that runs none costs no round trip.
    pub(crate) fn begin(&self) -> Result<(), StoreError> {
        self.conn().begin_pending = true;
        Ok(())
    }

    /// Commits (`keep`) or undoes the call's transaction.
    pub(crate) fn end(&self, keep: bool) -> Result<(), StoreError> {
        let mut conn = self.conn();
        if std::mem::take(&mut conn.begin_pending) {
            return Ok(());
        }
        conn.finish(keep)
    }

    fn conn(&self) -> MutexGuard<'_, Conn> {
        // A statement is atomic on the server; a panic elsewhere leaves nothing half-done here.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.conn().query(sql, params)
    }

    fn query_opt(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// A plain SELECT (no lock, no write): see `Conn::read`.
    fn read(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.conn().read(sql, params)
    }

    fn read_opt(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        Ok(self.read(sql, params)?.into_iter().next())
    }

    fn execute(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        self.conn().execute(sql, params)
    }

    fn insert_token(
        &self,
        token: &NewToken<'_>,
        state: TokenState,
        now: i64,
    ) -> Result<String, StoreError> {
        loop {
            let id = crate::otp::random_hex(6).map_err(|_| SealError::Random)?;
            let sealed = self.sealer.seal(id.as_bytes(), token.secret)?;
            let inserted = self.execute(
                r#"INSERT INTO tokens
                   (id, "user", label, kind, state, secret, algorithm, digits, period, created, uid)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                   ON CONFLICT (id) DO NOTHING"#,
                &[
                    &id,
                    &token.user,
                    &token.label,
                    &token.kind.as_str(),
                    &state.as_str(),
                    &sealed,
                    &token.params.algorithm.as_str(),
                    &i64::from(token.params.digits),
                    &(token.params.period as i64),
                    &now,
                    &token.uid.map(i64::from),
                ],
            )?;
            if inserted == 1 {
                return Ok(id);
            }
        }
    }
}

fn to_u32(id: &str, v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(id.into()))
}

impl Store for PgStore {
    fn add_pending(&self, token: NewToken<'_>, now: i64) -> Result<TokenInfo, StoreError> {
        let id = self.insert_token(&token, TokenState::Pending, now)?;
        Ok(TokenInfo::pending(id, &token, now))
    }

    fn secrets(&self, user: &str, state: TokenState) -> Result<Vec<TokenSecret>, StoreError> {
        let rows = self.read(
            r#"SELECT id, kind, secret, algorithm, digits, period, last, drift FROM tokens
               WHERE "user" = $1 AND state = $2 ORDER BY created DESC, id"#,
            &[&user, &state.as_str()],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = col(&row, 0)?;
            let kind: String = col(&row, 1)?;
            let sealed = Zeroizing::new(col::<Vec<u8>>(&row, 2)?);
            let params = row_params(&id, col(&row, 3)?, col(&row, 4)?, col(&row, 5)?)?;
            let kind = Kind::parse(&kind).ok_or_else(|| StoreError::Corrupt(id.clone()))?;
            let last = col::<Option<i64>>(&row, 6)?
                .map(u64::try_from)
                .transpose()
                .map_err(|_| StoreError::Corrupt(id.clone()))?;
            let secret = self.sealer.open(id.as_bytes(), &sealed)?;
            out.push(TokenSecret {
                counter: Counter {
                    kind,
                    params,
                    last,
                    drift: col(&row, 7)?,
                },
                id,
                secret,
            });
        }
        Ok(out)
    }

    fn has_active(&self, user: &str) -> Result<bool, StoreError> {
        Ok(self
            .read_opt(
                r#"SELECT 1 FROM tokens WHERE "user" = $1 AND state = 'active' LIMIT 1"#,
                &[&user],
            )?
            .is_some())
    }

    fn accept(
        &self,
        id: &str,
        from: TokenState,
        counter: u64,
        drift: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        let counter = i64::try_from(counter).map_err(|_| StoreError::Corrupt(id.into()))?;
        // One conditional UPDATE: a host racing with the same code waits for this row, then
        // finds the counter already taken and changes nothing.
        Ok(self.execute(
            "UPDATE tokens SET last = $1, drift = $2, last_used = $3, state = 'active'
             WHERE id = $4 AND state = $5 AND (last IS NULL OR last < $1)",
            &[&counter, &drift, &now, &id, &from.as_str()],
        )? == 1)
    }

    fn list(&self, user: Option<&str>) -> Result<Vec<TokenInfo>, StoreError> {
        let rows = self.read(
            r#"SELECT id, "user", label, kind, state, created, last_used FROM tokens
               WHERE $1::text IS NULL OR "user" = $1 ORDER BY "user", created, id"#,
            &[&user],
        )?;
        rows.into_iter()
            .map(|r| {
                let id: String = col(&r, 0)?;
                let state: String = col(&r, 4)?;
                Ok(TokenInfo {
                    state: TokenState::parse(&state)
                        .ok_or_else(|| StoreError::Corrupt(id.clone()))?,
                    id,
                    user: col(&r, 1)?,
                    label: col(&r, 2)?,
                    kind: col(&r, 3)?,
                    created: col(&r, 5)?,
                    last_used: col(&r, 6)?,
                })
            })
            .collect()
    }

    fn set_state(
        &self,
        user: &str,
        id: &str,
        from: TokenState,
        to: TokenState,
    ) -> Result<bool, StoreError> {
        Ok(self.execute(
            r#"UPDATE tokens SET state = $1 WHERE "user" = $2 AND id = $3 AND state = $4"#,
            &[&to.as_str(), &user, &id, &from.as_str()],
        )? == 1)
    }

    fn delete(&self, user: &str, id: &str) -> Result<bool, StoreError> {
        Ok(self.execute(
            r#"DELETE FROM tokens WHERE "user" = $1 AND id = $2"#,
            &[&user, &id],
        )? == 1)
    }

    fn lockout(&self, user: &str) -> Result<Lockout, StoreError> {
        match self.read_opt(
            r#"SELECT failures, until FROM lockouts WHERE "user" = $1"#,
            &[&user],
        )? {
            Some(r) => Ok(Lockout {
                failures: to_u32(user, col(&r, 0)?)?,
                until: col(&r, 1)?,
            }),
            None => Ok(Lockout::default()),
        }
    }

    fn lock_attempts(&self, user: &str) -> Result<Lockout, StoreError> {
        // The lock is held until this call's transaction ends, on every host sharing the
        // database. The record is read by a statement of its own, pipelined behind the lock:
        // its snapshot is taken once the lock is held, so it sees every failure counted before.
        // With the call's BEGIN still pending, it goes first in the same round trip.
        let mut conn = self.conn();
        let begin = std::mem::take(&mut conn.begin_pending);
        let lock_params: [&(dyn ToSql + Sync); 2] = [&ATTEMPT_LOCK, &user];
        let read_params: [&(dyn ToSql + Sync); 1] = [&user];
        let rows = conn.afresh(begin, |conn| {
            let statements = conn
                .statement("SELECT pg_advisory_xact_lock($1, hashtext($2))")
                .and_then(|lock| {
                    conn.statement(r#"SELECT failures, until FROM lockouts WHERE "user" = $1"#)
                        .map(|read| (lock, read))
                });
            statements.and_then(|(lock, read)| {
                conn.in_transaction |= begin;
                round_trip!(&mut *conn, |c| async {
                    let begun = async {
                        match begin {
                            true => c.batch_execute("BEGIN").await,
                            false => Ok(()),
                        }
                    };
                    let (begun, locked, rows) = tokio::join!(
                        begun,
                        c.execute(&lock, &lock_params),
                        c.query(&read, &read_params)
                    );
                    begun.and(locked).and(rows)
                })
            })
        })?;
        match rows.first() {
            Some(r) => Ok(Lockout {
                failures: to_u32(user, col(r, 0)?)?,
                until: col(r, 1)?,
            }),
            None => Ok(Lockout::default()),
        }
    }

    fn record_failure(
        &self,
        user: &str,
        uid: Option<u32>,
        backoff: &Backoff,
        now: i64,
    ) -> Result<Lockout, StoreError> {
        let row = self.query(
            r#"INSERT INTO lockouts ("user", failures, until, uid) VALUES ($1, 1, 0, $2)
               ON CONFLICT ("user") DO UPDATE SET failures = lockouts.failures + 1
               RETURNING failures"#,
            &[&user, &uid.map(i64::from)],
        )?;
        let row = row
            .first()
            .ok_or_else(|| StoreError::Corrupt(user.into()))?;
        let failures = to_u32(user, col(row, 0)?)?;
        let until = backoff
            .delay(failures)
            .map_or(0, |d| now.saturating_add(d as i64));
        self.execute(
            r#"UPDATE lockouts SET until = $1 WHERE "user" = $2"#,
            &[&until, &user],
        )?;
        Ok(Lockout { failures, until })
    }

    fn forgive_failure(&self, user: &str, backoff: &Backoff) -> Result<(), StoreError> {
        let left = self.query_opt(
            r#"UPDATE lockouts SET failures = failures - 1 WHERE "user" = $1 AND failures > 0
               RETURNING failures"#,
            &[&user],
        )?;
        if let Some(row) = left {
            if backoff.delay(to_u32(user, col(&row, 0)?)?).is_none() {
                self.execute(
                    r#"UPDATE lockouts SET until = 0 WHERE "user" = $1"#,
                    &[&user],
                )?;
            }
        }
        Ok(())
    }

    fn foreign_uid(
        &self,
        user: &str,
        host: &str,
        uid: Option<u32>,
    ) -> Result<Option<u32>, StoreError> {
        Ok(self.login_record(user, host, uid)?.foreign)
    }

    fn login_record(
        &self,
        user: &str,
        host: &str,
        uid: Option<u32>,
    ) -> Result<LoginRecord, StoreError> {
        // One round trip for what a login needs; the binding is written only at first sight.
        let row = self.read(
            r#"SELECT
                 (SELECT uid FROM bindings WHERE "user" = $1 AND host = $2),
                 EXISTS (SELECT 1 FROM tokens WHERE "user" = $1)
                   OR EXISTS (SELECT 1 FROM backup_codes WHERE "user" = $1)
                   OR EXISTS (SELECT 1 FROM lockouts WHERE "user" = $1 AND failures > 0),
                 EXISTS (SELECT 1 FROM tokens WHERE "user" = $1 AND state = 'active'),
                 EXISTS (SELECT 1 FROM backup_codes WHERE "user" = $1)"#,
            &[&user, &host],
        )?;
        let row = row
            .first()
            .ok_or_else(|| StoreError::Corrupt(user.into()))?;
        let (mut bound, has_records): (Option<i64>, bool) = (col(row, 0)?, col(row, 1)?);
        let (active, backup): (bool, bool) = (col(row, 2)?, col(row, 3)?);
        if bound.is_none() && has_records {
            bound = self
                .query_opt(
                    r#"UPDATE bindings SET host = $2 WHERE "user" = $1 AND host = ''
                       RETURNING uid"#,
                    &[&user, &host],
                )?
                .map(|r| col(&r, 0))
                .transpose()?;
        }
        let binding = Binding::decide(has_records, bound, uid);
        match binding {
            Binding::Forget => {
                self.execute(
                    r#"DELETE FROM bindings WHERE "user" = $1 AND host = $2"#,
                    &[&user, &host],
                )?;
            }
            Binding::Bind(uid) => {
                self.execute(
                    r#"INSERT INTO bindings ("user", host, uid) VALUES ($1, $2, $3)
                       ON CONFLICT DO NOTHING"#,
                    &[&user, &host, &i64::from(uid)],
                )?;
            }
            Binding::Keep => {}
        }
        Ok(LoginRecord {
            foreign: binding.foreign(bound, uid),
            active,
            can_answer: active || backup,
        })
    }

    fn add_invitation(
        &self,
        user: &str,
        uid: u32,
        hash: &[u8],
        expires: i64,
    ) -> Result<(), StoreError> {
        self.execute(
            r#"INSERT INTO invitations ("user", uid, hash, expires) VALUES ($1, $2, $3, $4)
               ON CONFLICT ("user") DO UPDATE SET uid = $2, hash = $3, expires = $4"#,
            &[&user, &i64::from(uid), &hash, &expires],
        )?;
        Ok(())
    }

    fn use_invitation(
        &self,
        user: &str,
        uid: u32,
        hash: &[u8],
        now: i64,
    ) -> Result<bool, StoreError> {
        Ok(self.execute(
            r#"DELETE FROM invitations
               WHERE "user" = $1 AND uid = $2 AND hash = $3 AND expires > $4"#,
            &[&user, &i64::from(uid), &hash, &now],
        )? == 1)
    }

    fn clear_failures(&self, user: &str) -> Result<bool, StoreError> {
        Ok(self.execute(r#"DELETE FROM lockouts WHERE "user" = $1"#, &[&user])? > 0)
    }

    fn replace_backup_codes(
        &self,
        user: &str,
        uid: Option<u32>,
        hashes: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        // Inside the call's transaction: the old codes and the new ones never coexist.
        self.execute(r#"DELETE FROM backup_codes WHERE "user" = $1"#, &[&user])?;
        let uid = uid.map(i64::from);
        for hash in hashes {
            self.execute(
                r#"INSERT INTO backup_codes ("user", hash, created, uid) VALUES ($1, $2, $3, $4)"#,
                &[&user, hash, &now, &uid],
            )?;
        }
        Ok(())
    }

    fn backup_codes(&self, user: &str) -> Result<Vec<(i64, String)>, StoreError> {
        self.read(
            r#"SELECT id, hash FROM backup_codes WHERE "user" = $1"#,
            &[&user],
        )?
        .iter()
        .map(|r| Ok((col(r, 0)?, col(r, 1)?)))
        .collect()
    }

    fn use_backup_code(&self, id: i64, hash: &str) -> Result<bool, StoreError> {
        Ok(self.execute(
            "DELETE FROM backup_codes WHERE id = $1 AND hash = $2",
            &[&id, &hash],
        )? == 1)
    }

    fn add_grants(&self, grants: &[Grant], now: i64) -> Result<(), StoreError> {
        self.execute("DELETE FROM grants WHERE expires <= $1", &[&now])?;
        let keep = MAX_PER_USER as i64;
        for g in grants {
            let a = &g.attributes;
            self.execute(
                r#"INSERT INTO grants (id, "user", rule, digest, proof, created, expires, host,
                   service, rhost, tty, ssh_key, session, ssh_connection)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"#,
                &[
                    &g.id,
                    &g.user,
                    &g.rule,
                    &g.digest,
                    &g.proof,
                    &g.created,
                    &g.expires,
                    &a.host,
                    &a.service,
                    &a.rhost,
                    &a.tty,
                    &a.ssh_key,
                    &a.session,
                    &g.ssh_connection,
                ],
            )?;
        }
        let users: std::collections::BTreeSet<&str> =
            grants.iter().map(|g| g.user.as_str()).collect();
        for user in users {
            self.execute(
                r#"DELETE FROM grants WHERE "user" = $1 AND id NOT IN
                   (SELECT id FROM grants WHERE "user" = $1 ORDER BY created DESC, id LIMIT $2)"#,
                &[&user, &keep],
            )?;
        }
        Ok(())
    }

    fn grants(&self, user: &str, now: i64) -> Result<Vec<Grant>, StoreError> {
        self.read(
            r#"SELECT id, rule, digest, proof, created, expires, host, service, rhost, tty,
               ssh_key, session, ssh_connection FROM grants WHERE "user" = $1 AND expires > $2"#,
            &[&user, &now],
        )?
        .iter()
        .map(|r| {
            Ok(Grant {
                id: col(r, 0)?,
                user: user.to_owned(),
                rule: col(r, 1)?,
                digest: col(r, 2)?,
                proof: col(r, 3)?,
                created: col(r, 4)?,
                expires: col(r, 5)?,
                attributes: Attributes {
                    host: col(r, 6)?,
                    service: col(r, 7)?,
                    rhost: col(r, 8)?,
                    tty: col(r, 9)?,
                    ssh_key: col(r, 10)?,
                    session: col(r, 11)?,
                },
                ssh_connection: col(r, 12)?,
            })
        })
        .collect()
    }

    fn bind_session(
        &self,
        user: &str,
        ssh_connection: &str,
        ssh_key: Option<&str>,
        since: i64,
        session: &str,
    ) -> Result<u64, StoreError> {
        self.execute(
            r#"UPDATE grants SET session = $1 WHERE "user" = $2 AND ssh_connection = $3
               AND session IS NULL AND created >= $4 AND ssh_key IS NOT DISTINCT FROM $5"#,
            &[&session, &user, &ssh_connection, &since, &ssh_key],
        )
    }

    fn forget(&self, user: &str) -> Result<u64, StoreError> {
        self.execute(r#"DELETE FROM grants WHERE "user" = $1"#, &[&user])
    }
    fn overview(&self, now: i64, backup_codes_below: u32) -> Result<Overview, StoreError> {
        let (listed, below) = (OVERVIEW_LISTED as i64, i64::from(backup_codes_below));
        let count = |r: &Row, i| col::<i64>(r, i).map(|n| u64::try_from(n).unwrap_or(0));
        let one = |sql, params: &[&(dyn ToSql + Sync)]| -> Result<Row, StoreError> {
            self.read_opt(sql, params)?.ok_or(StoreError::Internal)
        };
        let mut o = Overview {
            users: count(
                &one(r#"SELECT count(DISTINCT "user") FROM tokens"#, &[])?,
                0,
            )?,
            schema_version: col(
                &one("SELECT coalesce(max(version), 0) FROM schema_version", &[])?,
                0,
            )?,
            locked_total: count(
                &one("SELECT count(*) FROM lockouts WHERE until > $1", &[&now])?,
                0,
            )?,
            backup_codes_low_total: count(
                &one(
                    r#"SELECT count(*) FROM (SELECT "user" FROM backup_codes GROUP BY "user"
                       HAVING count(*) < $1) low"#,
                    &[&below],
                )?,
                0,
            )?,
            ..Overview::default()
        };
        for r in self.read("SELECT state, count(*) FROM tokens GROUP BY state", &[])? {
            let state: String = col(&r, 0)?;
            *o.tokens_mut(&state) += count(&r, 1)?;
        }
        for r in self.read(
            r#"SELECT "user", failures, until FROM lockouts WHERE until > $1
               ORDER BY until DESC, "user" LIMIT $2"#,
            &[&now, &listed],
        )? {
            let user: String = col(&r, 0)?;
            let failures = to_u32(&user, col(&r, 1)?)?;
            o.locked.push((
                user,
                Lockout {
                    failures,
                    until: col(&r, 2)?,
                },
            ));
        }
        for r in self.read(
            r#"SELECT "user", count(*) AS n FROM backup_codes GROUP BY "user"
               HAVING count(*) < $1 ORDER BY n, "user" LIMIT $2"#,
            &[&below, &listed],
        )? {
            let user: String = col(&r, 0)?;
            let left = to_u32(&user, col(&r, 1)?)?;
            o.backup_codes_low.push((user, left));
        }
        Ok(o)
    }

    fn probe(&self, host: &str, now: i64) -> Result<(), StoreError> {
        let value = now.to_string().into_bytes();
        self.execute(
            "INSERT INTO meta (key, value) VALUES ('probe:' || $1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&host, &value],
        )?;
        Ok(())
    }
}

/// A copy's reads and upserts (see [`copy`](super::copy)); the sealed secrets are moved as bytes.
impl Rows for PgStore {
    fn begin_copy(&self, write: bool) -> Result<(), StoreError> {
        let mut conn = self.conn();
        if write {
            // Held until the commit: no guardd writes between the merge's read and its writes.
            conn.start(
                "BEGIN; LOCK TABLE tokens, lockouts, backup_codes, invitations, bindings
                 IN EXCLUSIVE MODE",
            )
        } else {
            conn.start("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        }
    }

    fn end_copy(&self, keep: bool) -> Result<(), StoreError> {
        self.end(keep)
    }

    fn read_rows(&self) -> Result<Dump, StoreError> {
        let mut dump = Dump::default();
        let tokens = self.query(
            r#"SELECT id, "user", label, kind, state, secret, algorithm, digits, period, last,
                      drift, created, last_used, uid FROM tokens"#,
            &[],
        )?;
        for r in &tokens {
            let row = TokenRow {
                user: col(r, 1)?,
                label: col(r, 2)?,
                kind: col(r, 3)?,
                state: col(r, 4)?,
                secret: col(r, 5)?,
                algorithm: col(r, 6)?,
                digits: col(r, 7)?,
                period: col(r, 8)?,
                last: col(r, 9)?,
                drift: col(r, 10)?,
                created: col(r, 11)?,
                last_used: col(r, 12)?,
                uid: col(r, 13)?,
            };
            dump.tokens.insert(col(r, 0)?, row);
        }
        for r in &self.query(r#"SELECT "user", failures, until, uid FROM lockouts"#, &[])? {
            let row = LockoutRow {
                failures: col(r, 1)?,
                until: col(r, 2)?,
                uid: col(r, 3)?,
            };
            dump.lockouts.insert(col(r, 0)?, row);
        }
        let codes = self.query(
            r#"SELECT id, "user", hash, created, uid FROM backup_codes"#,
            &[],
        )?;
        for r in &codes {
            let row = BackupCodeRow {
                user: col(r, 1)?,
                hash: col(r, 2)?,
                created: col(r, 3)?,
                uid: col(r, 4)?,
            };
            dump.backup_codes.insert(col(r, 0)?, row);
        }
        for r in &self.query(r#"SELECT "user", uid, hash, expires FROM invitations"#, &[])? {
            let row = InvitationRow {
                uid: col(r, 1)?,
                hash: col(r, 2)?,
                expires: col(r, 3)?,
            };
            dump.invitations.insert(col(r, 0)?, row);
        }
        for r in &self.query(r#"SELECT "user", host, uid FROM bindings"#, &[])? {
            dump.bindings.insert((col(r, 0)?, col(r, 1)?), col(r, 2)?);
        }
        Ok(dump)
    }

    fn upsert_rows(&self, rows: &Dump) -> Result<(), StoreError> {
        for (id, t) in &rows.tokens {
            self.execute(
                r#"INSERT INTO tokens (id, "user", label, kind, state, secret, algorithm, digits,
                       period, last, drift, created, last_used, uid)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                   ON CONFLICT (id) DO UPDATE SET "user" = $2, label = $3, kind = $4, state = $5,
                       secret = $6, algorithm = $7, digits = $8, period = $9, last = $10,
                       drift = $11, created = $12, last_used = $13, uid = $14"#,
                &[
                    id,
                    &t.user,
                    &t.label,
                    &t.kind,
                    &t.state,
                    &t.secret,
                    &t.algorithm,
                    &t.digits,
                    &t.period,
                    &t.last,
                    &t.drift,
                    &t.created,
                    &t.last_used,
                    &t.uid,
                ],
            )?;
        }
        for (user, l) in &rows.lockouts {
            self.execute(
                r#"INSERT INTO lockouts ("user", failures, until, uid) VALUES ($1, $2, $3, $4)
                   ON CONFLICT ("user") DO UPDATE SET failures = $2, until = $3, uid = $4"#,
                &[user, &l.failures, &l.until, &l.uid],
            )?;
        }
        for (id, b) in &rows.backup_codes {
            self.execute(
                r#"INSERT INTO backup_codes (id, "user", hash, created, uid)
                   VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (id) DO UPDATE SET "user" = $2, hash = $3, created = $4, uid = $5"#,
                &[id, &b.user, &b.hash, &b.created, &b.uid],
            )?;
        }
        if !rows.backup_codes.is_empty() {
            // Ids were given, so the sequence did not move: set it past them, never back.
            self.query(
                "SELECT setval(s, greatest(m, coalesce(pg_sequence_last_value(s), 0)))
                 FROM (SELECT pg_get_serial_sequence('backup_codes', 'id')::regclass AS s,
                              max(id) AS m FROM backup_codes) AS b",
                &[],
            )?;
        }
        for (user, i) in &rows.invitations {
            self.execute(
                r#"INSERT INTO invitations ("user", uid, hash, expires) VALUES ($1, $2, $3, $4)
                   ON CONFLICT ("user") DO UPDATE SET uid = $2, hash = $3, expires = $4"#,
                &[user, &i.uid, &i.hash, &i.expires],
            )?;
        }
        for ((user, host), uid) in &rows.bindings {
            self.execute(
                r#"INSERT INTO bindings ("user", host, uid) VALUES ($1, $2, $3)
                   ON CONFLICT ("user", host) DO UPDATE SET uid = $3"#,
                &[user, host, uid],
            )?;
        }
        Ok(())
    }
}
