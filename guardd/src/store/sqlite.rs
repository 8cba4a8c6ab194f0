//! The embedded store: one SQLite file.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use zeroize::Zeroizing;

use super::copy::{BackupCodeRow, Dump, InvitationRow, LockoutRow, Rows, TokenRow};
use super::{
    check_key, load_key, row_params, Batched, NewToken, Overview, Store, StoreError, TokenInfo,
    TokenSecret, TokenState, OVERVIEW_LISTED, SCHEMA_VERSION,
};
use crate::grant::{Attributes, Grant, MAX_PER_USER};
use crate::lockout::{Backoff, Lockout};
use crate::otp::{Counter, Kind};
use crate::seal::{SealError, Sealer};

/// How long a writer waits for a lock held by another process (a backup, an sqlite3 shell)
/// before giving up; well under the PAM module's default 5 s timeout, so the login gets a clear
/// "unavailable" rather than a timeout.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);
/// Frames of the write-ahead log past which it is copied back into the database (SQLite's own
/// `wal_autocheckpoint` default).
const CHECKPOINT_FRAMES: u64 = 1000;
/// Frames of slack on top of `CHECKPOINT_FRAMES` in the write-ahead log laid out at open: the
/// commits that cross the mark still append before their checkpoint.
const WAL_SLACK_FRAMES: u64 = 64;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StoreError::Busy
            }
            _ => StoreError::Sqlite(e),
        }
    }
}

pub(crate) const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE tokens (
    id        TEXT PRIMARY KEY,
    user      TEXT NOT NULL,
    label     TEXT NOT NULL,
    kind      TEXT NOT NULL,
    state     TEXT NOT NULL,
    secret    BLOB NOT NULL,      -- sealed: nonce || ciphertext, bound to id
    algorithm TEXT NOT NULL,
    digits    INTEGER NOT NULL,
    period    INTEGER NOT NULL,
    last      INTEGER,            -- last accepted TOTP step or HOTP counter
    drift     INTEGER NOT NULL DEFAULT 0,
    created   INTEGER NOT NULL,
    last_used INTEGER
);
CREATE INDEX tokens_user ON tokens(user);
CREATE TABLE lockouts (
    user      TEXT PRIMARY KEY,
    failures  INTEGER NOT NULL,
    until     INTEGER NOT NULL
);
CREATE TABLE backup_codes (
    id        INTEGER PRIMARY KEY,
    user      TEXT NOT NULL,
    hash      TEXT NOT NULL,
    created   INTEGER NOT NULL
);
CREATE INDEX backup_codes_user ON backup_codes(user);
CREATE TABLE meta (
    key       TEXT PRIMARY KEY,
    value     BLOB NOT NULL
);
",
    "
-- The account's uid, so that a new account that reuses a name does not inherit its tokens,
-- backup codes or back-off. NULL: recorded before uids were (belongs to whoever has the name).
ALTER TABLE tokens ADD COLUMN uid INTEGER;
ALTER TABLE lockouts ADD COLUMN uid INTEGER;
ALTER TABLE backup_codes ADD COLUMN uid INTEGER;
CREATE TABLE invitations (
    user      TEXT PRIMARY KEY,
    uid       INTEGER NOT NULL,
    hash      BLOB NOT NULL,      -- SHA-256 of the invitation code
    expires   INTEGER NOT NULL
);
",
    "
-- Which uid a name belongs to, per host: local accounts may have other uids on other hosts.
-- host '': bound before hosts were recorded; the first host that looks claims it.
CREATE TABLE bindings (
    user      TEXT NOT NULL,
    host      TEXT NOT NULL,
    uid       INTEGER NOT NULL,
    PRIMARY KEY (user, host)
);
INSERT OR IGNORE INTO bindings (user, host, uid)
    SELECT user, '', uid FROM tokens WHERE uid IS NOT NULL
    UNION ALL SELECT user, '', uid FROM backup_codes WHERE uid IS NOT NULL
    UNION ALL SELECT user, '', uid FROM lockouts WHERE uid IS NOT NULL;
",
    "
-- Reuse grants: an OTP proven under a rule with `reuse` lets later logins in until `expires`
-- where the scope's attributes (NULL: absent, never equal) match.
CREATE TABLE grants (
    id        TEXT PRIMARY KEY,
    user      TEXT NOT NULL,
    rule      TEXT NOT NULL,
    digest    TEXT NOT NULL,
    proof     TEXT NOT NULL,
    created   INTEGER NOT NULL,
    expires   INTEGER NOT NULL,
    host      TEXT,
    service   TEXT,
    rhost     TEXT,
    tty       TEXT,
    ssh_key   TEXT,
    session   TEXT,
    ssh_connection TEXT
);
CREATE INDEX grants_user ON grants(user);
CREATE INDEX grants_expires ON grants(expires);
",
];

/// The embedded store: one SQLite file (WAL, synchronous=FULL, so an accepted code is on disk
/// before the answer leaves the daemon) behind one connection; SQLite has one writer anyway.
/// The daemon drives it from one [`StoreThread`](super::StoreThread), which groups commits.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    sealer: Sealer,
    path: String,
    /// Set by the commit that fills the log past `CHECKPOINT_FRAMES`, once checkpoints are
    /// deferred to the store thread (`Batched::defer_checkpoints`).
    checkpoint_due: Arc<AtomicBool>,
    /// When the running batch began: its calls share one busy timeout (see `begin_call`).
    batch_started: Mutex<Option<std::time::Instant>>,
}

impl SqliteStore {
    /// Opens (creating if needed, mode 0600) the database at `path`, migrates it, and loads the
    /// sealing key from `key_file` (creating one only for a database without sealed secrets).
    pub fn open(path: &Path, key_file: &Path) -> Result<SqliteStore, StoreError> {
        let display = path.display().to_string();
        let open_err = |source: Box<dyn std::error::Error + Send + Sync>| StoreError::Open {
            path: display.clone(),
            source,
        };
        // Create the file ourselves so it is never, even briefly, readable by others.
        // SQLite gives the -wal and -shm files the same mode.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| open_err(e.into()))?;
        let mut conn = Connection::open(path).map_err(|e| open_err(e.into()))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .and_then(|()| conn.pragma_update(None, "journal_mode", "WAL"))
            .and_then(|()| conn.pragma_update(None, "synchronous", "FULL"))
            // One plan per statement, whatever its values: else SQLite parses a cached
            // statement again whenever a value it could plan by changes (a user's name, a
            // counter), which was several parses per login. Without statistics (no ANALYZE)
            // the plan is the same anyway.
            .and_then(|()| {
                conn.set_db_config(
                    rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
                    true,
                )
                .map(drop)
            })
            .map_err(|e| open_err(e.into()))?;
        migrate(&mut conn, &display).map_err(|e| match e {
            StoreError::Sqlite(e) => open_err(e.into()),
            e => e,
        })?;

        let check: Option<Vec<u8>> = conn
            .query_row("SELECT value FROM meta WHERE key = 'key_check'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let sealer = load_key(key_file, check.is_some(), &display)?;
        let key_name = key_file.display().to_string();
        if let Some(sealed) = check_key(&sealer, check.as_deref(), &key_name, &display)? {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('key_check', ?1)",
                [sealed],
            )?;
        }
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            sealer,
            path: display,
            checkpoint_due: Arc::new(AtomicBool::new(false)),
            batch_started: Mutex::new(None),
        })
    }

    /// Adds many tokens, already active, in one transaction (imports, load tests). Returns
    /// their ids in order.
    pub fn add_active_many(
        &self,
        tokens: &[NewToken<'_>],
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.savepoint()?;
        let mut ids = Vec::with_capacity(tokens.len());
        for token in tokens {
            let id = self.insert_token(&tx, token, TokenState::Active, now)?;
            ids.push(id);
        }
        tx.commit()?;
        Ok(ids)
    }

    /// Inserts `token` in `state` under a fresh id (its sealed secret bound to that id) and
    /// returns the id. 48 random bits: short enough to type in `guardctl delete`; a collision is
    /// retried.
    fn insert_token(
        &self,
        conn: &Connection,
        token: &NewToken<'_>,
        state: TokenState,
        now: i64,
    ) -> Result<String, StoreError> {
        loop {
            let id = crate::otp::random_hex(6).map_err(|_| SealError::Random)?;
            let sealed = self.sealer.seal(id.as_bytes(), token.secret)?;
            let inserted = conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO tokens
                 (id, user, label, kind, state, secret, algorithm, digits, period, created, uid)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )?
                .execute(params![
                    id,
                    token.user,
                    token.label,
                    token.kind.as_str(),
                    state.as_str(),
                    sealed,
                    token.params.algorithm.as_str(),
                    token.params.digits,
                    token.params.period as i64,
                    now,
                    token.uid
                ])?;
            if inserted == 1 {
                return Ok(id);
            }
        }
    }

    /// Runs one statement without parameters, parsed once and cached (the batch statements run
    /// several times per login).
    fn run(&self, sql: &str) -> Result<(), StoreError> {
        self.conn().prepare_cached(sql)?.execute([])?;
        Ok(())
    }

    /// Lays out the write-ahead log ahead of the commits (see `lay_out_wal`): what the daemon
    /// does once after opening its store. A failure is logged; commits still work, slower.
    pub fn lay_out_wal(&self) {
        if let Err(e) = lay_out_wal(&self.conn()) {
            tracing::warn!(
                "cannot lay out {}-wal ahead (commits still work, slower): {e}",
                self.path
            );
        }
    }

    fn batch_started(&self) -> MutexGuard<'_, Option<std::time::Instant>> {
        self.batch_started.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rolls back the transaction a batch whose COMMIT and ROLLBACK both failed left open;
    /// without this, every later batch would fail to begin. Its callers were told it failed.
    fn roll_back_left_open(&self) -> Result<(), StoreError> {
        if !self.conn().is_autocommit() {
            tracing::warn!("rolling back a transaction left open by a failed batch");
            self.run("ROLLBACK")?;
        }
        Ok(())
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // Statements are atomic, so a panic elsewhere while holding the lock leaves nothing
        // half-written: a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes zeros up to the write-ahead log's working size (`CHECKPOINT_FRAMES` and some
/// slack), once per start of the daemon. A commit that appends to the log changes its size, so its fsync also
/// waits for the file system's journal (ext4: about twice the time on the development machine);
/// a commit that overwrites frames in place does not. SQLite restarts the log from the top after
/// each checkpoint and never shrinks it while open (no `journal_size_limit`), and a frame of
/// zeros ends the log for recovery (page 0, wrong salt and checksum), so the padding is never
/// read as data. Without it every commit appends until the first checkpoint: after each start,
/// for the first ~1,000 logins, which on a quiet server is all of them.
///
/// It runs under SQLite's write lock (`BEGIN IMMEDIATE`, then nothing written): no other
/// connection, in this process or another, can append frames between the size read here and
/// the zeros written after it.
fn lay_out_wal(conn: &Connection) -> Result<(), Box<dyn std::error::Error>> {
    let page: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    let page = page.clamp(0, 65_536) as u64;
    // The WAL header (32 bytes), then frames of a 24-byte header and a page.
    let want = 32 + (CHECKPOINT_FRAMES + WAL_SLACK_FRAMES) * (24 + page);
    // The log SQLite itself uses: its database name (symbolic links resolved) and "-wal".
    let Some(db) = conn.path().filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    let wal = format!("{db}-wal");
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let laid = (|| -> Result<(), Box<dyn std::error::Error>> {
        // SQLite created it at the first read, with the database's mode (0600). Never through
        // a symbolic link, never anything but a plain file.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&wal)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(format!("{wal} is not a plain file").into());
        }
        let mut at = meta.len();
        if at >= want {
            return Ok(());
        }
        let zeros = vec![0u8; 64 * 1024];
        while at < want {
            let n = (want - at).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        file.sync_all()?;
        Ok(())
    })();
    conn.execute_batch("ROLLBACK")?;
    laid
}

/// Brings the schema to the newest version, one transaction per migration.
fn migrate(conn: &mut Connection, path: &str) -> Result<(), StoreError> {
    let known = SCHEMA_VERSION;
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > known {
        return Err(StoreError::SchemaTooNew {
            path: path.into(),
            found,
            known,
        });
    }
    let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
    if found == 0 && tables > 0 {
        return Err(StoreError::Unversioned { path: path.into() });
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

impl Store for SqliteStore {
    fn add_pending(&self, token: NewToken<'_>, now: i64) -> Result<TokenInfo, StoreError> {
        let id = self.insert_token(&self.conn(), &token, TokenState::Pending, now)?;
        Ok(TokenInfo::pending(id, &token, now))
    }

    fn secrets(&self, user: &str, state: TokenState) -> Result<Vec<TokenSecret>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, kind, secret, algorithm, digits, period, last, drift FROM tokens
             WHERE user = ?1 AND state = ?2 ORDER BY created DESC, id",
        )?;
        let rows = stmt.query_map(params![user, state.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                Zeroizing::new(r.get::<_, Vec<u8>>(2)?),
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, kind, sealed, alg, digits, period, last, drift) = row?;
            let params = row_params(&id, &alg, digits, period)?;
            let kind = Kind::parse(&kind).ok_or_else(|| StoreError::Corrupt(id.clone()))?;
            let last = last
                .map(u64::try_from)
                .transpose()
                .map_err(|_| StoreError::Corrupt(id.clone()))?;
            let secret = self.sealer.open(id.as_bytes(), &sealed)?;
            out.push(TokenSecret {
                counter: Counter {
                    kind,
                    params,
                    last,
                    drift,
                },
                id,
                secret,
            });
        }
        Ok(out)
    }

    fn has_active(&self, user: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT 1 FROM tokens WHERE user = ?1 AND state = 'active' LIMIT 1")?
            .exists([user])?)
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
        Ok(self
            .conn()
            .prepare_cached(
                "UPDATE tokens SET last = ?1, drift = ?2, last_used = ?3, state = 'active'
                 WHERE id = ?4 AND state = ?5 AND (last IS NULL OR last < ?1)",
            )?
            .execute(params![counter, drift, now, id, from.as_str()])?
            == 1)
    }

    fn list(&self, user: Option<&str>) -> Result<Vec<TokenInfo>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, user, label, kind, state, created, last_used FROM tokens
             WHERE ?1 IS NULL OR user = ?1 ORDER BY user, created, id",
        )?;
        let rows = stmt.query_map([user], |r| {
            Ok((
                TokenInfo {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    label: r.get(2)?,
                    kind: r.get(3)?,
                    state: TokenState::Pending,
                    created: r.get(5)?,
                    last_used: r.get(6)?,
                },
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut info, state) = row?;
            info.state =
                TokenState::parse(&state).ok_or_else(|| StoreError::Corrupt(info.id.clone()))?;
            out.push(info);
        }
        Ok(out)
    }

    fn set_state(
        &self,
        user: &str,
        id: &str,
        from: TokenState,
        to: TokenState,
    ) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "UPDATE tokens SET state = ?1 WHERE user = ?2 AND id = ?3 AND state = ?4",
            params![to.as_str(), user, id, from.as_str()],
        )? == 1)
    }

    fn delete(&self, user: &str, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM tokens WHERE user = ?1 AND id = ?2",
            params![user, id],
        )? == 1)
    }

    fn lockout(&self, user: &str) -> Result<Lockout, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT failures, until FROM lockouts WHERE user = ?1")?
            .query_row([user], |r| {
                Ok(Lockout {
                    failures: r.get(0)?,
                    until: r.get(1)?,
                })
            })
            .optional()?
            .unwrap_or_default())
    }

    fn lock_attempts(&self, user: &str) -> Result<Lockout, StoreError> {
        // One call or batch holds this store at a time (the store thread's turn): checks of a
        // user never interleave.
        self.lockout(user)
    }

    fn record_failure(
        &self,
        user: &str,
        uid: Option<u32>,
        backoff: &Backoff,
        now: i64,
    ) -> Result<Lockout, StoreError> {
        let mut conn = self.conn();
        let tx = conn.savepoint()?;
        let failures: u32 = tx.query_row(
            "INSERT INTO lockouts (user, failures, until, uid) VALUES (?1, 1, 0, ?2)
             ON CONFLICT(user) DO UPDATE SET failures = failures + 1
             RETURNING failures",
            params![user, uid],
            |r| r.get(0),
        )?;
        let until = backoff
            .delay(failures)
            .map_or(0, |d| now.saturating_add(d as i64));
        tx.execute(
            "UPDATE lockouts SET until = ?1 WHERE user = ?2",
            params![until, user],
        )?;
        tx.commit()?;
        Ok(Lockout { failures, until })
    }

    fn forgive_failure(&self, user: &str, backoff: &Backoff) -> Result<(), StoreError> {
        let failures: Option<u32> = self
            .conn()
            .query_row(
                "UPDATE lockouts SET failures = failures - 1 WHERE user = ?1 AND failures > 0
                 RETURNING failures",
                [user],
                |r| r.get(0),
            )
            .optional()?;
        if failures.is_some_and(|f| backoff.delay(f).is_none()) {
            self.conn()
                .execute("UPDATE lockouts SET until = 0 WHERE user = ?1", [user])?;
        }
        Ok(())
    }

    fn foreign_uid(
        &self,
        user: &str,
        host: &str,
        uid: Option<u32>,
    ) -> Result<Option<u32>, StoreError> {
        let conn = self.conn();
        let has_records = conn
            .prepare_cached(
                "SELECT 1 FROM tokens WHERE user = ?1
                 UNION ALL SELECT 1 FROM backup_codes WHERE user = ?1
                 UNION ALL SELECT 1 FROM lockouts WHERE user = ?1 AND failures > 0
                 LIMIT 1",
            )?
            .exists([user])?;
        let mut bound: Option<i64> = conn
            .prepare_cached("SELECT uid FROM bindings WHERE user = ?1 AND host = ?2")?
            .query_row([user, host], |r| r.get(0))
            .optional()?;
        if bound.is_none() && has_records {
            bound = conn
                .prepare_cached(
                    "UPDATE bindings SET host = ?2 WHERE user = ?1 AND host = '' RETURNING uid",
                )?
                .query_row([user, host], |r| r.get(0))
                .optional()?;
        }
        let binding = super::Binding::decide(has_records, bound, uid);
        match binding {
            super::Binding::Forget => {
                conn.prepare_cached("DELETE FROM bindings WHERE user = ?1 AND host = ?2")?
                    .execute([user, host])?;
            }
            super::Binding::Bind(uid) => {
                conn.prepare_cached(
                    "INSERT OR IGNORE INTO bindings (user, host, uid) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![user, host, uid])?;
            }
            super::Binding::Keep => {}
        }
        Ok(binding.foreign(bound, uid))
    }

    fn add_invitation(
        &self,
        user: &str,
        uid: u32,
        hash: &[u8],
        expires: i64,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO invitations (user, uid, hash, expires) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(user) DO UPDATE SET uid = ?2, hash = ?3, expires = ?4",
            params![user, uid, hash, expires],
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
        Ok(self.conn().execute(
            "DELETE FROM invitations WHERE user = ?1 AND uid = ?2 AND hash = ?3 AND expires > ?4",
            params![user, uid, hash, now],
        )? == 1)
    }

    fn clear_failures(&self, user: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM lockouts WHERE user = ?1", [user])?
            > 0)
    }

    fn replace_backup_codes(
        &self,
        user: &str,
        uid: Option<u32>,
        hashes: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.savepoint()?;
        tx.execute("DELETE FROM backup_codes WHERE user = ?1", [user])?;
        for hash in hashes {
            tx.execute(
                "INSERT INTO backup_codes (user, hash, created, uid) VALUES (?1, ?2, ?3, ?4)",
                params![user, hash, now, uid],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn backup_codes(&self, user: &str) -> Result<Vec<(i64, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT id, hash FROM backup_codes WHERE user = ?1")?;
        let rows = stmt.query_map([user], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn use_backup_code(&self, id: i64, hash: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM backup_codes WHERE id = ?1 AND hash = ?2",
            params![id, hash],
        )? == 1)
    }

    fn add_grants(&self, grants: &[Grant], now: i64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.savepoint()?;
        tx.execute("DELETE FROM grants WHERE expires <= ?1", [now])?;
        for g in grants {
            let a = &g.attributes;
            tx.prepare_cached(
                "INSERT INTO grants (id, user, rule, digest, proof, created, expires, host, \
                 service, rhost, tty, ssh_key, session, ssh_connection) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?
            .execute(params![
                g.id,
                g.user,
                g.rule,
                g.digest,
                g.proof,
                g.created,
                g.expires,
                a.host,
                a.service,
                a.rhost,
                a.tty,
                a.ssh_key,
                a.session,
                g.ssh_connection
            ])?;
        }
        let users: std::collections::BTreeSet<&str> =
            grants.iter().map(|g| g.user.as_str()).collect();
        for user in users {
            tx.execute(
                "DELETE FROM grants WHERE user = ?1 AND id NOT IN \
                 (SELECT id FROM grants WHERE user = ?1 ORDER BY created DESC, id LIMIT ?2)",
                params![user, MAX_PER_USER as i64],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn grants(&self, user: &str, now: i64) -> Result<Vec<Grant>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, rule, digest, proof, created, expires, host, service, rhost, tty, \
             ssh_key, session, ssh_connection FROM grants WHERE user = ?1 AND expires > ?2",
        )?;
        let rows = stmt.query_map(params![user, now], |r| {
            Ok(Grant {
                id: r.get(0)?,
                user: user.to_owned(),
                rule: r.get(1)?,
                digest: r.get(2)?,
                proof: r.get(3)?,
                created: r.get(4)?,
                expires: r.get(5)?,
                attributes: Attributes {
                    host: r.get(6)?,
                    service: r.get(7)?,
                    rhost: r.get(8)?,
                    tty: r.get(9)?,
                    ssh_key: r.get(10)?,
                    session: r.get(11)?,
                },
                ssh_connection: r.get(12)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn bind_session(
        &self,
        user: &str,
        ssh_connection: &str,
        ssh_key: Option<&str>,
        since: i64,
        session: &str,
    ) -> Result<u64, StoreError> {
        Ok(self.conn().execute(
            "UPDATE grants SET session = ?1 WHERE user = ?2 AND ssh_connection = ?3 \
             AND session IS NULL AND created >= ?4 AND ssh_key IS ?5",
            params![session, user, ssh_connection, since, ssh_key],
        )? as u64)
    }

    fn forget(&self, user: &str) -> Result<u64, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM grants WHERE user = ?1", [user])? as u64)
    }
    fn overview(&self, now: i64, backup_codes_below: u32) -> Result<Overview, StoreError> {
        let conn = self.conn();
        let listed = OVERVIEW_LISTED as i64;
        let count = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<u64, StoreError> {
            let n: i64 = conn.query_row(sql, p, |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        let mut o = Overview {
            users: count("SELECT count(DISTINCT user) FROM tokens", &[])?,
            locked_total: count("SELECT count(*) FROM lockouts WHERE until > ?1", &[&now])?,
            backup_codes_low_total: count(
                "SELECT count(*) FROM (SELECT user FROM backup_codes GROUP BY user
                 HAVING count(*) < ?1)",
                &[&backup_codes_below],
            )?,
            schema_version: conn.pragma_query_value(None, "user_version", |r| r.get(0))?,
            ..Overview::default()
        };
        let mut stmt = conn.prepare("SELECT state, count(*) FROM tokens GROUP BY state")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let (state, n): (String, i64) = (r.get(0)?, r.get(1)?);
            *o.tokens_mut(&state) += u64::try_from(n).unwrap_or(0);
        }
        let mut stmt = conn.prepare(
            "SELECT user, failures, until FROM lockouts WHERE until > ?1
             ORDER BY until DESC, user LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![now, listed], |r| {
            Ok((
                r.get(0)?,
                Lockout {
                    failures: r.get(1)?,
                    until: r.get(2)?,
                },
            ))
        })?;
        o.locked = rows.collect::<Result<_, _>>()?;
        let mut stmt = conn.prepare(
            "SELECT user, count(*) AS n FROM backup_codes GROUP BY user HAVING n < ?1
             ORDER BY n, user LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![backup_codes_below, listed], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        o.backup_codes_low = rows.collect::<Result<_, _>>()?;
        Ok(o)
    }

    fn probe(&self, host: &str, now: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO meta (key, value) VALUES ('probe:' || ?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![host, now.to_string().into_bytes()],
        )?;
        Ok(())
    }
}

impl Batched for SqliteStore {
    fn begin_batch(&self) -> Result<(), StoreError> {
        // Deferred: reads need no lock in WAL mode, so while another process holds the write
        // lock, logins that only read (a permit, a prompt) still go through; the first write
        // waits for the lock (the busy timeout), and only the calls that write get "busy".
        self.roll_back_left_open()?;
        self.run("BEGIN")?;
        *self.batch_started() = Some(std::time::Instant::now());
        Ok(())
    }

    fn try_begin_alone(&self) -> Result<bool, StoreError> {
        self.roll_back_left_open()?;
        let conn = self.conn();
        // Immediate, so that the write lock is taken before the call runs: a call that has
        // started cannot be handed on. No wait: with the lock held elsewhere, the caller queues
        // the call for the store thread instead, which waits for it as any batch does.
        conn.busy_timeout(Duration::ZERO)?;
        let begun = conn.execute_batch("BEGIN IMMEDIATE");
        // Whatever became of the BEGIN: every later batch waits for the lock again.
        if let Err(e) = conn.busy_timeout(BUSY_TIMEOUT) {
            if begun.is_ok() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            return Err(e.into());
        }
        match begun.map_err(StoreError::from) {
            Ok(()) => Ok(true),
            Err(StoreError::Busy) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn end_batch(&self, keep: bool) -> Result<(), StoreError> {
        // The next batch waits its whole time again; restored first, so that the COMMIT never
        // runs without waiting.
        let batch = self.batch_started().take();
        if batch.is_some() {
            if let Err(e) = self.conn().busy_timeout(BUSY_TIMEOUT) {
                tracing::error!("cannot restore the store's busy timeout: {e}");
            }
        }
        if !keep {
            return self.run("ROLLBACK");
        }
        self.run("COMMIT").inspect_err(|_| {
            let _ = self.run("ROLLBACK");
        })
    }

    fn begin_call(&self) -> Result<(), StoreError> {
        // A batch waits for a lock held by another process (an admin's sqlite3, a backup) for
        // the busy timeout in all, not each of its calls in turn: each call waits only what is
        // left of it, and past it the calls left fail "busy" at once if they write, while those
        // that only read still go through. Else a batch of writes queued ahead of root's login
        // (any user can queue failed attempts) would hold that login for the busy timeout once
        // per write.
        let started = *self.batch_started();
        if let Some(started) = started {
            self.conn()
                .busy_timeout(BUSY_TIMEOUT.saturating_sub(started.elapsed()))?;
        }
        self.run("SAVEPOINT call")
    }

    fn end_call(&self, keep: bool) -> Result<(), StoreError> {
        if !keep {
            self.run("ROLLBACK TO call")?;
        }
        self.run("RELEASE call")
    }

    fn describe(&self) -> String {
        self.path.clone()
    }

    fn defer_checkpoints(&self) -> Result<(), StoreError> {
        let due = self.checkpoint_due.clone();
        // Replaces SQLite's own checkpoint at commit, which would run inside the commit of
        // whichever call crossed the mark, on whichever thread ran it.
        self.conn()
            .wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, frames| {
                if frames as u64 >= CHECKPOINT_FRAMES {
                    due.store(true, Ordering::Release);
                }
                Ok(())
            }))?;
        Ok(())
    }

    fn checkpoint_due(&self) -> bool {
        self.checkpoint_due.load(Ordering::Acquire)
    }

    fn checkpoint(&self) {
        self.checkpoint_due.store(false, Ordering::Release);
        // Passive: copies what no reader still needs and never waits for a lock. What it leaves
        // is copied by a later one, as the next commits set the mark again.
        let done = self
            .conn()
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        if let Err(e) = done {
            tracing::warn!(
                "checkpoint of {}-wal failed (retried later): {e}",
                self.path
            );
        }
    }
}

/// A copy's reads and upserts (see [`copy`](super::copy)); the sealed secrets are moved as bytes.
impl Rows for SqliteStore {
    fn begin_copy(&self, write: bool) -> Result<(), StoreError> {
        // IMMEDIATE: the write lock is taken before the rows the merge depends on are read.
        self.run(if write { "BEGIN IMMEDIATE" } else { "BEGIN" })
    }

    fn end_copy(&self, keep: bool) -> Result<(), StoreError> {
        self.end_batch(keep)
    }

    fn read_rows(&self) -> Result<Dump, StoreError> {
        let conn = self.conn();
        let mut dump = Dump::default();
        let mut stmt = conn.prepare(
            "SELECT id, user, label, kind, state, secret, algorithm, digits, period, last, drift,
                    created, last_used, uid FROM tokens",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let row = TokenRow {
                user: r.get(1)?,
                label: r.get(2)?,
                kind: r.get(3)?,
                state: r.get(4)?,
                secret: r.get(5)?,
                algorithm: r.get(6)?,
                digits: r.get(7)?,
                period: r.get(8)?,
                last: r.get(9)?,
                drift: r.get(10)?,
                created: r.get(11)?,
                last_used: r.get(12)?,
                uid: r.get(13)?,
            };
            dump.tokens.insert(r.get(0)?, row);
        }
        let mut stmt = conn.prepare("SELECT user, failures, until, uid FROM lockouts")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let row = LockoutRow {
                failures: r.get(1)?,
                until: r.get(2)?,
                uid: r.get(3)?,
            };
            dump.lockouts.insert(r.get(0)?, row);
        }
        let mut stmt = conn.prepare("SELECT id, user, hash, created, uid FROM backup_codes")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let row = BackupCodeRow {
                user: r.get(1)?,
                hash: r.get(2)?,
                created: r.get(3)?,
                uid: r.get(4)?,
            };
            dump.backup_codes.insert(r.get(0)?, row);
        }
        let mut stmt = conn.prepare("SELECT user, uid, hash, expires FROM invitations")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let row = InvitationRow {
                uid: r.get(1)?,
                hash: r.get(2)?,
                expires: r.get(3)?,
            };
            dump.invitations.insert(r.get(0)?, row);
        }
        let mut stmt = conn.prepare("SELECT user, host, uid FROM bindings")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            dump.bindings.insert((r.get(0)?, r.get(1)?), r.get(2)?);
        }
        Ok(dump)
    }

    fn upsert_rows(&self, rows: &Dump) -> Result<(), StoreError> {
        // No triggers or foreign keys: REPLACE is an upsert by primary key.
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "INSERT OR REPLACE INTO tokens (id, user, label, kind, state, secret, algorithm,
                 digits, period, last, drift, created, last_used, uid)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        )?;
        for (id, t) in &rows.tokens {
            stmt.execute(params![
                id,
                t.user,
                t.label,
                t.kind,
                t.state,
                t.secret,
                t.algorithm,
                t.digits,
                t.period,
                t.last,
                t.drift,
                t.created,
                t.last_used,
                t.uid
            ])?;
        }
        let mut stmt = conn.prepare(
            "INSERT OR REPLACE INTO lockouts (user, failures, until, uid) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for (user, l) in &rows.lockouts {
            stmt.execute(params![user, l.failures, l.until, l.uid])?;
        }
        let mut stmt = conn.prepare(
            "INSERT OR REPLACE INTO backup_codes (id, user, hash, created, uid)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for (id, b) in &rows.backup_codes {
            stmt.execute(params![id, b.user, b.hash, b.created, b.uid])?;
        }
        let mut stmt = conn.prepare(
            "INSERT OR REPLACE INTO invitations (user, uid, hash, expires) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for (user, i) in &rows.invitations {
            stmt.execute(params![user, i.uid, i.hash, i.expires])?;
        }
        let mut stmt =
            conn.prepare("INSERT OR REPLACE INTO bindings (user, host, uid) VALUES (?1, ?2, ?3)")?;
        for ((user, host), uid) in &rows.bindings {
            stmt.execute(params![user, host, uid])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otp::OtpParams;
    use std::os::unix::fs::PermissionsExt;

    fn temp_store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), &dir.path().join("k")).unwrap();
        (dir, store)
    }

    fn new_token<'a>(user: &'a str, secret: &'a [u8]) -> NewToken<'a> {
        NewToken {
            user,
            uid: Some(1000),
            label: "phone",
            kind: Kind::Totp,
            params: OtpParams::default(),
            secret,
        }
    }

    #[test]
    fn database_and_key_files_are_private() {
        let (dir, _s) = temp_store();
        for f in ["t.db", "k"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }

    #[test]
    fn the_log_is_laid_out_at_open_overwritten_in_place_and_a_crash_image_recovers() {
        let (dir, s) = temp_store();
        s.lay_out_wal();
        let wal = dir.path().join("t.db-wal");
        let laid_out = std::fs::metadata(&wal).unwrap().len();
        assert!(laid_out >= 32 + 1000 * (24 + 4096), "{laid_out}");
        assert_eq!(
            std::fs::metadata(&wal).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let t = s.add_pending(new_token("ann", &[7; 20]), 1).unwrap();
        assert!(s.accept(&t.id, TokenState::Pending, 100, 0, 2).unwrap());
        for step in 101..150 {
            assert!(s.accept(&t.id, TokenState::Active, step, 0, 2).unwrap());
        }
        // Commits wrote frames inside the laid-out log: it did not grow.
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), laid_out);
        // What a power cut leaves while guardd runs: the database and its log (frames, then
        // zeros), without the shared-memory index. Every committed step is recovered from it.
        let image = tempfile::tempdir().unwrap();
        for f in ["t.db", "t.db-wal", "k"] {
            std::fs::copy(dir.path().join(f), image.path().join(f)).unwrap();
        }
        let recovered =
            SqliteStore::open(&image.path().join("t.db"), &image.path().join("k")).unwrap();
        let got = recovered.secrets("ann", TokenState::Active).unwrap();
        assert_eq!(got[0].counter.last, Some(149));
        assert!(!recovered
            .accept(&t.id, TokenState::Active, 149, 0, 2)
            .unwrap());
    }

    #[test]
    fn cached_statements_are_not_parsed_again_for_new_values() {
        let (_dir, s) = temp_store();
        s.add_active_many(&[new_token("ann", &[1; 20]), new_token("bob", &[2; 20])], 0)
            .unwrap();
        for user in ["ann", "bob", "cy", "ann"] {
            s.secrets(user, TokenState::Active).unwrap();
        }
        let conn = s.conn();
        let stmt = conn
            .prepare_cached(
                "SELECT id, kind, secret, algorithm, digits, period, last, drift FROM tokens
             WHERE user = ?1 AND state = ?2 ORDER BY created DESC, id",
            )
            .unwrap();
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::Run), 4);
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
    }

    #[test]
    fn deferred_checkpoints_wait_for_the_store_thread_and_then_restart_the_log() {
        let (dir, s) = temp_store();
        let id = s.add_active_many(&[new_token("ann", &[1; 20])], 0).unwrap()[0].clone();
        s.lay_out_wal();
        s.defer_checkpoints().unwrap();
        let wal = dir.path().join("t.db-wal");
        let laid_out = std::fs::metadata(&wal).unwrap().len();
        let mut n = 0;
        while !s.checkpoint_due() {
            n += 1;
            assert!(s.accept(&id, TokenState::Active, n, 0, 1).unwrap());
            assert!(n < 2 * CHECKPOINT_FRAMES, "the mark is never reached");
        }
        // No commit checkpointed by itself: the log grew to the mark.
        assert!(n > CHECKPOINT_FRAMES / 4, "{n} commits");
        s.checkpoint();
        assert!(!s.checkpoint_due());
        for _ in 0..CHECKPOINT_FRAMES / 2 {
            n += 1;
            assert!(s.accept(&id, TokenState::Active, n, 0, 1).unwrap());
        }
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), laid_out);
        assert!(!s.checkpoint_due(), "the log restarted from the top");
    }

    #[test]
    fn the_log_is_laid_out_only_under_the_write_lock() {
        // Another connection in the middle of a write: the lay-out waits for the lock (the busy
        // timeout), then gives up without touching the log; that writer's commit stands.
        let (dir, s) = temp_store();
        let t = s.add_pending(new_token("ann", &[7; 20]), 1).unwrap();
        drop(s);
        let wal = dir.path().join("t.db-wal");
        let other = Connection::open(dir.path().join("t.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let before = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        let s = SqliteStore::open(&dir.path().join("t.db"), &dir.path().join("k")).unwrap();
        assert_eq!(
            std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0),
            before
        );
        other
            .execute("UPDATE tokens SET label = 'desk' WHERE id = ?1", [&t.id])
            .unwrap();
        other.execute_batch("COMMIT").unwrap();
        let label: String = s
            .conn()
            .query_row("SELECT label FROM tokens WHERE id = ?1", [&t.id], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(label, "desk");
    }

    #[test]
    fn a_batch_left_open_is_rolled_back_by_the_next_one() {
        let (_d, s) = temp_store();
        let t = s.add_pending(new_token("ann", &[7; 20]), 1).unwrap();
        s.begin_batch().unwrap();
        assert!(s.accept(&t.id, TokenState::Pending, 100, 0, 2).unwrap());
        // As if COMMIT and ROLLBACK had both failed: the next batch still begins, without the
        // failed batch's write.
        s.begin_batch().unwrap();
        assert!(!s.has_active("ann").unwrap());
        s.end_batch(true).unwrap();
        assert!(s.accept(&t.id, TokenState::Pending, 100, 0, 2).unwrap());
    }

    #[test]
    fn secrets_are_sealed_on_disk_and_round_trip() {
        let (dir, s) = temp_store();
        let secret = b"0123456789abcdefghij";
        let t = s.add_pending(new_token("ann", secret), 1).unwrap();
        let got = s.secrets("ann", TokenState::Pending).unwrap();
        assert_eq!(&**got[0].secret, secret);
        drop(s);
        let raw = Connection::open(dir.path().join("t.db")).unwrap();
        let stored: Vec<u8> = raw
            .query_row("SELECT secret FROM tokens WHERE id = ?1", [&t.id], |r| {
                r.get(0)
            })
            .unwrap();
        assert!(!stored.windows(secret.len()).any(|w| w == secret));
    }

    #[test]
    fn swapped_sealed_secrets_do_not_open() {
        let (dir, s) = temp_store();
        let a = s.add_pending(new_token("ann", &[1; 20]), 1).unwrap();
        let b = s.add_pending(new_token("bob", &[2; 20]), 1).unwrap();
        drop(s);
        let raw = Connection::open(dir.path().join("t.db")).unwrap();
        raw.execute(
            "UPDATE tokens SET secret = (SELECT secret FROM tokens WHERE id = ?1) WHERE id = ?2",
            [&a.id, &b.id],
        )
        .unwrap();
        drop(raw);
        let s = SqliteStore::open(&dir.path().join("t.db"), &dir.path().join("k")).unwrap();
        assert!(matches!(
            s.secrets("bob", TokenState::Pending),
            Err(StoreError::Seal(SealError::Open))
        ));
    }

    #[test]
    fn missing_or_wrong_key_file_is_refused_and_nothing_changes() {
        let (dir, s) = temp_store();
        s.add_pending(new_token("ann", &[1; 20]), 1).unwrap();
        drop(s);
        let db = dir.path().join("t.db");
        let err = SqliteStore::open(&db, &dir.path().join("absent"))
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::KeyMissing { .. }), "{err}");
        assert!(
            !dir.path().join("absent").exists(),
            "must not create a new key"
        );
        let other = tempfile::tempdir().unwrap();
        SqliteStore::open(&other.path().join("o.db"), &other.path().join("k2")).unwrap();
        let err = SqliteStore::open(&db, &other.path().join("k2"))
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
        let s = SqliteStore::open(&db, &dir.path().join("k")).unwrap();
        assert_eq!(s.list(None).unwrap().len(), 1);
    }

    #[test]
    fn newer_schema_is_refused() {
        let (dir, s) = temp_store();
        drop(s);
        let db = dir.path().join("t.db");
        Connection::open(&db)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = SqliteStore::open(&db, &dir.path().join("k")).err().unwrap();
        assert!(err.to_string().contains("upgrade guardd"), "{err}");
    }
}
