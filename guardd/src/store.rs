//! Tokens, failure counters and backup codes on disk. `Store` is the seam for other backends
//! (a shared PostgreSQL for fleets); `SqliteStore` is the embedded one; the daemon reaches either
//! only through a [`StoreThread`](crate::store::StoreThread).

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use zeroize::Zeroizing;

use crate::lockout::{Backoff, Lockout};
use crate::otp::{Counter, HashAlg, Kind, OtpParams};
use crate::seal::{SealError, Sealer};

mod thread;
pub use thread::StoreThread;

/// How long a writer waits for a lock held by another process (a backup, an sqlite3 shell)
/// before giving up; well under the PAM module's default 5 s timeout, so the login gets a clear
/// "unavailable" rather than a timeout.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the token database {path}: {source}")]
    Open {
        path: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "the token database {path} has schema version {found}, newer than this guardd knows ({known}); upgrade guardd"
    )]
    SchemaTooNew {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("{path} holds tables but no schema version (not a guardd database, or a pre-release one); move it aside")]
    Unversioned { path: String },
    #[error(
        "the key file {key_file} is missing, but {path} holds sealed secrets: restore the key file from backup (a new key cannot open them)"
    )]
    KeyMissing { key_file: String, path: String },
    #[error("the key file {key_file} does not open the secrets in {path}: wrong key file for this database")]
    WrongKey { key_file: String, path: String },
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("the token database is busy or locked; try again (another process holds it)")]
    Busy,
    #[error("guardd is overloaded (too many calls waiting for the token database); try again")]
    Overloaded,
    #[error("token database error: {0}")]
    Sqlite(rusqlite::Error),
    #[error("{0}")]
    Batch(String),
    #[error("the token database holds an invalid row for token {0}")]
    Corrupt(String),
}

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

/// A token's state: pending until its first correct code, then active or disabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    Pending,
    Active,
    Disabled,
}

impl TokenState {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Pending => "pending",
            TokenState::Active => "active",
            TokenState::Disabled => "disabled",
        }
    }
}

/// What may be shown about a token: everything but its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub user: String,
    pub label: String,
    pub kind: String,
    pub state: String,
    pub created: i64,
    pub last_used: Option<i64>,
}

/// What verification needs: the opened secret (zeroized on drop) and the counter state.
pub struct TokenSecret {
    pub id: String,
    pub secret: Zeroizing<Vec<u8>>,
    pub counter: Counter,
}

/// A token to create.
pub struct NewToken<'a> {
    pub user: &'a str,
    /// The account's uid: the token works only while the name still has this uid.
    pub uid: Option<u32>,
    pub label: &'a str,
    pub kind: Kind,
    pub params: OtpParams,
    pub secret: &'a [u8],
}

/// The persistence guardd needs. Every method is one atomic step; the ones that accept a code
/// are compare-and-set, so concurrent logins cannot both use it.
pub trait Store: Send + Sync {
    /// Adds a pending token and returns its description.
    fn add_pending(&self, token: NewToken<'_>, now: i64) -> Result<TokenInfo, StoreError>;
    /// The secrets of `user`'s tokens in `state`, newest first.
    fn secrets(&self, user: &str, state: TokenState) -> Result<Vec<TokenSecret>, StoreError>;
    /// Whether `user` has at least one active token.
    fn has_active(&self, user: &str) -> Result<bool, StoreError>;
    /// Records that token `id`, in state `from`, accepted `counter` (a TOTP step or HOTP
    /// counter) with clock `drift`, if and only if no equal or later counter was accepted
    /// before. A pending token becomes active by the same step. True when recorded.
    fn accept(
        &self,
        id: &str,
        from: TokenState,
        counter: u64,
        drift: i64,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Tokens of `user`, or of everyone, ordered by user then age.
    fn list(&self, user: Option<&str>) -> Result<Vec<TokenInfo>, StoreError>;
    /// Moves `user`'s token `id` from state `from` to `to`; false when it is not in `from`.
    fn set_state(
        &self,
        user: &str,
        id: &str,
        from: TokenState,
        to: TokenState,
    ) -> Result<bool, StoreError>;
    /// Deletes `user`'s token `id`; false when there is no such token.
    fn delete(&self, user: &str, id: &str) -> Result<bool, StoreError>;
    /// `user`'s failure record.
    fn lockout(&self, user: &str) -> Result<Lockout, StoreError>;
    /// Counts one more failure for `user` (with uid `uid`) and applies the back-off; returns
    /// the new record.
    fn record_failure(
        &self,
        user: &str,
        uid: Option<u32>,
        backoff: &Backoff,
        now: i64,
    ) -> Result<Lockout, StoreError>;
    /// Takes back one failure counted before a slow check that then succeeded (a password);
    /// the wait it started ends with it, a wait earlier failures imposed stays.
    fn forgive_failure(&self, user: &str, backoff: &Backoff) -> Result<(), StoreError>;
    /// A uid other than `uid` that `user`'s tokens, backup codes or failure record belong to
    /// (`uid` None: the name has no account now, so any record with a uid is someone else's).
    /// Rows without a uid (recorded before uids were, or bulk imports) bind to no account.
    fn foreign_uid(&self, user: &str, uid: Option<u32>) -> Result<Option<u32>, StoreError>;
    /// Records an invitation for `user` (uid `uid`) to enrol once before `expires`, replacing
    /// any earlier one; `hash` is the SHA-256 of the invitation code.
    fn add_invitation(
        &self,
        user: &str,
        uid: u32,
        hash: &[u8],
        expires: i64,
    ) -> Result<(), StoreError>;
    /// Uses up `user`'s invitation if it matches `hash`, `uid` and has not expired at `now`.
    fn use_invitation(
        &self,
        user: &str,
        uid: u32,
        hash: &[u8],
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Forgets `user`'s failures; true when there were any.
    fn clear_failures(&self, user: &str) -> Result<bool, StoreError>;
    /// Replaces `user`'s backup codes with these hashes.
    fn replace_backup_codes(
        &self,
        user: &str,
        uid: Option<u32>,
        hashes: &[String],
        now: i64,
    ) -> Result<(), StoreError>;
    /// `user`'s unused backup-code hashes, with their row ids.
    fn backup_codes(&self, user: &str) -> Result<Vec<(i64, String)>, StoreError>;
    /// Uses up backup code `id`; true only for the one caller that removed it.
    fn use_backup_code(&self, id: i64) -> Result<bool, StoreError>;

    /// Opens the transaction that holds the calls of one batch, so their writes reach the disk
    /// together (see [`StoreThread`]). Until `end_batch`, only the calling thread may use the store.
    fn begin_batch(&self) -> Result<(), StoreError>;
    /// Commits the batch (`keep`) or undoes all of it.
    fn end_batch(&self, keep: bool) -> Result<(), StoreError>;
    /// Marks where one call inside a batch starts, so that its writes can be undone alone.
    fn begin_call(&self) -> Result<(), StoreError>;
    /// Keeps (`keep`) or undoes the writes made since `begin_call`.
    fn end_call(&self, keep: bool) -> Result<(), StoreError>;

    /// The token `id` if it belongs to `user`.
    fn get(&self, user: &str, id: &str) -> Result<Option<TokenInfo>, StoreError> {
        Ok(self.list(Some(user))?.into_iter().find(|t| t.id == id))
    }
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
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
];

/// Associated data of the key-check value, which proves at start-up that the key file fits.
const KEY_CHECK: &[u8] = b"soffid-otp key check";

/// The embedded store: one SQLite file (WAL, synchronous=FULL, so an accepted code is on disk
/// before the answer leaves the daemon) behind one connection; SQLite has one writer anyway.
/// The daemon drives it from one [`StoreThread`], which groups commits.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    sealer: Sealer,
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
        let key_name = key_file.display().to_string();
        let sealer = match Sealer::load(key_file, check.is_none()) {
            Ok(sealer) => sealer,
            Err(SealError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Err(StoreError::KeyMissing {
                    key_file: key_name,
                    path: display,
                })
            }
            Err(e) => return Err(e.into()),
        };
        match check {
            Some(sealed) => {
                sealer
                    .open(KEY_CHECK, &sealed)
                    .map_err(|_| StoreError::WrongKey {
                        key_file: key_name,
                        path: display,
                    })?;
            }
            None => {
                let sealed = sealer.seal(KEY_CHECK, KEY_CHECK)?;
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('key_check', ?1)",
                    [sealed],
                )?;
            }
        }
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            sealer,
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

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // Statements are atomic, so a panic elsewhere while holding the lock leaves nothing
        // half-written: a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Brings the schema to the newest version, one transaction per migration.
fn migrate(conn: &mut Connection, path: &str) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
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

fn row_params(id: &str, alg: &str, digits: i64, period: i64) -> Result<OtpParams, StoreError> {
    match (
        HashAlg::parse(alg),
        u8::try_from(digits),
        u64::try_from(period),
    ) {
        (Some(algorithm), Ok(digits @ 6..=8), Ok(period @ 1..=300)) => Ok(OtpParams {
            algorithm,
            digits,
            period,
        }),
        _ => Err(StoreError::Corrupt(id.into())),
    }
}

impl Store for SqliteStore {
    fn add_pending(&self, token: NewToken<'_>, now: i64) -> Result<TokenInfo, StoreError> {
        let id = self.insert_token(&self.conn(), &token, TokenState::Pending, now)?;
        Ok(TokenInfo {
            id,
            user: token.user.into(),
            label: token.label.into(),
            kind: token.kind.as_str().into(),
            state: TokenState::Pending.as_str().into(),
            created: now,
            last_used: None,
        })
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
            Ok(TokenInfo {
                id: r.get(0)?,
                user: r.get(1)?,
                label: r.get(2)?,
                kind: r.get(3)?,
                state: r.get(4)?,
                created: r.get(5)?,
                last_used: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
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

    fn foreign_uid(&self, user: &str, uid: Option<u32>) -> Result<Option<u32>, StoreError> {
        // -1 stands for "no account": it matches no recorded uid.
        let uid = uid.map_or(-1, i64::from);
        let found: Option<i64> = self
            .conn()
            .prepare_cached(
                "SELECT uid FROM tokens WHERE user = ?1 AND uid IS NOT NULL AND uid != ?2
                 UNION ALL
                 SELECT uid FROM backup_codes WHERE user = ?1 AND uid IS NOT NULL AND uid != ?2
                 UNION ALL
                 SELECT uid FROM lockouts WHERE user = ?1 AND uid IS NOT NULL AND uid != ?2
                 LIMIT 1",
            )?
            .query_row(params![user, uid], |r| r.get(0))
            .optional()?;
        Ok(found.map(|u: i64| u32::try_from(u).unwrap_or(u32::MAX)))
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

    fn use_backup_code(&self, id: i64) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM backup_codes WHERE id = ?1", [id])?
            == 1)
    }

    fn begin_batch(&self) -> Result<(), StoreError> {
        // Deferred: reads need no lock in WAL mode, so while another process holds the write
        // lock, logins that only read (a permit, a prompt) still go through; the first write
        // waits for the lock (the busy timeout), and only the calls that write get "busy".
        if !self.conn().is_autocommit() {
            // A batch whose COMMIT and ROLLBACK both failed left its transaction open; without
            // this, every later batch would fail to begin. Its callers were told it failed.
            tracing::warn!("rolling back a transaction left open by a failed batch");
            self.run("ROLLBACK")?;
        }
        self.run("BEGIN")
    }

    fn end_batch(&self, keep: bool) -> Result<(), StoreError> {
        if !keep {
            return self.run("ROLLBACK");
        }
        self.run("COMMIT").inspect_err(|_| {
            let _ = self.run("ROLLBACK");
        })
    }

    fn begin_call(&self) -> Result<(), StoreError> {
        self.run("SAVEPOINT call")
    }

    fn end_call(&self, keep: bool) -> Result<(), StoreError> {
        if !keep {
            self.run("ROLLBACK TO call")?;
        }
        self.run("RELEASE call")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn pending_token_becomes_active_once_and_counters_only_move_forward() {
        let (_d, s) = temp_store();
        let t = s.add_pending(new_token("ann", &[7; 20]), 1).unwrap();
        assert!(!s.has_active("ann").unwrap());
        assert!(s.accept(&t.id, TokenState::Pending, 100, 0, 2).unwrap());
        assert!(s.has_active("ann").unwrap());
        assert!(!s.accept(&t.id, TokenState::Pending, 101, 0, 2).unwrap());
        assert!(
            !s.accept(&t.id, TokenState::Active, 100, 0, 3).unwrap(),
            "replay"
        );
        assert!(
            !s.accept(&t.id, TokenState::Active, 99, 0, 3).unwrap(),
            "older"
        );
        assert!(s.accept(&t.id, TokenState::Active, 101, -1, 3).unwrap());
        let info = s.get("ann", &t.id).unwrap().unwrap();
        assert_eq!((info.state.as_str(), info.last_used), ("active", Some(3)));
        let secret = &s.secrets("ann", TokenState::Active).unwrap()[0];
        assert_eq!((secret.counter.last, secret.counter.drift), (Some(101), -1));
    }

    #[test]
    fn concurrent_accepts_record_one_step_once() {
        let (_d, s) = temp_store();
        let a = s.add_pending(new_token("ann", &[1; 20]), 1).unwrap();
        let b = s.add_pending(new_token("bob", &[2; 20]), 1).unwrap();
        assert!(s.accept(&a.id, TokenState::Pending, 10, 0, 1).unwrap());
        assert!(s.accept(&b.id, TokenState::Pending, 10, 0, 1).unwrap());
        let (wins_a, wins_b) = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..64)
                .map(|i| {
                    let (id, s) = (if i % 2 == 0 { &a.id } else { &b.id }, &s);
                    scope
                        .spawn(move || (i % 2, s.accept(id, TokenState::Active, 11, 0, 2).unwrap()))
                })
                .collect();
            let results: Vec<(usize, bool)> =
                handles.into_iter().map(|h| h.join().unwrap()).collect();
            let count = |k| results.iter().filter(|(t, won)| *t == k && *won).count();
            (count(0), count(1))
        });
        assert_eq!((wins_a, wins_b), (1, 1));
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

    #[test]
    fn state_changes_and_delete_are_scoped_to_the_user() {
        let (_d, s) = temp_store();
        let t = s.add_pending(new_token("ann", &[9; 20]), 1).unwrap();
        assert!(s.accept(&t.id, TokenState::Pending, 1, 0, 1).unwrap());
        assert!(!s
            .set_state("bob", &t.id, TokenState::Active, TokenState::Disabled)
            .unwrap());
        assert!(s
            .set_state("ann", &t.id, TokenState::Active, TokenState::Disabled)
            .unwrap());
        assert!(!s.has_active("ann").unwrap());
        assert!(!s.delete("bob", &t.id).unwrap());
        assert!(s.delete("ann", &t.id).unwrap());
        assert!(s.list(None).unwrap().is_empty());
    }

    #[test]
    fn failures_back_off_and_clear() {
        let (_d, s) = temp_store();
        let b = Backoff::default();
        for i in 1..5 {
            assert_eq!(
                s.record_failure("ann", Some(1000), &b, 1000).unwrap().until,
                0,
                "{i}"
            );
        }
        assert_eq!(
            s.record_failure("ann", Some(1000), &b, 1000).unwrap().until,
            1030
        );
        assert_eq!(
            s.record_failure("ann", Some(1000), &b, 1000).unwrap().until,
            1060
        );
        assert_eq!(s.lockout("bob").unwrap(), Lockout::default());
        assert!(s.clear_failures("ann").unwrap());
        assert_eq!(s.lockout("ann").unwrap(), Lockout::default());
    }

    #[test]
    fn records_of_an_earlier_account_with_the_same_name_are_foreign() {
        let (_d, s) = temp_store();
        s.add_pending(new_token("ann", &[7; 20]), 1).unwrap();
        assert_eq!(s.foreign_uid("ann", Some(1000)).unwrap(), None);
        assert_eq!(s.foreign_uid("ann", Some(1001)).unwrap(), Some(1000));
        assert_eq!(s.foreign_uid("ann", None).unwrap(), Some(1000));
        assert_eq!(s.foreign_uid("bob", None).unwrap(), None);
        s.record_failure("bob", Some(5), &Backoff::default(), 1)
            .unwrap();
        assert_eq!(s.foreign_uid("bob", Some(6)).unwrap(), Some(5));
        // Rows without a uid bind to no account.
        s.replace_backup_codes("cat", None, &["h".into()], 1)
            .unwrap();
        assert_eq!(s.foreign_uid("cat", Some(9)).unwrap(), None);
        assert_eq!(s.foreign_uid("cat", None).unwrap(), None);
    }

    #[test]
    fn a_forgiven_failure_ends_the_wait_it_started() {
        let (_d, s) = temp_store();
        let b = Backoff::default();
        for _ in 0..5 {
            s.record_failure("ann", None, &b, 1000).unwrap();
        }
        assert_eq!(s.lockout("ann").unwrap().until, 1030);
        s.forgive_failure("ann", &b).unwrap();
        assert_eq!(
            s.lockout("ann").unwrap(),
            Lockout {
                failures: 4,
                until: 0
            }
        );
        // Two failures past the free ones: forgiving one leaves the first wait.
        s.record_failure("ann", None, &b, 1000).unwrap();
        s.record_failure("ann", None, &b, 1000).unwrap();
        s.forgive_failure("ann", &b).unwrap();
        assert_eq!(s.lockout("ann").unwrap().failures, 5);
        assert_ne!(s.lockout("ann").unwrap().until, 0);
    }

    #[test]
    fn invitations_are_single_use_bound_to_the_uid_and_expire() {
        let (_d, s) = temp_store();
        s.add_invitation("ann", 1000, b"h1", 100).unwrap();
        assert!(
            !s.use_invitation("ann", 1001, b"h1", 50).unwrap(),
            "other uid"
        );
        assert!(
            !s.use_invitation("ann", 1000, b"h2", 50).unwrap(),
            "other code"
        );
        assert!(
            !s.use_invitation("ann", 1000, b"h1", 100).unwrap(),
            "expired"
        );
        assert!(s.use_invitation("ann", 1000, b"h1", 99).unwrap());
        assert!(!s.use_invitation("ann", 1000, b"h1", 99).unwrap(), "used");
    }

    #[test]
    fn backup_codes_are_replaced_and_used_once() {
        let (_d, s) = temp_store();
        s.replace_backup_codes("ann", None, &["h1".into(), "h2".into()], 1)
            .unwrap();
        s.replace_backup_codes("ann", None, &["h3".into()], 2)
            .unwrap();
        let codes = s.backup_codes("ann").unwrap();
        assert_eq!(codes.len(), 1);
        assert!(s.use_backup_code(codes[0].0).unwrap());
        assert!(!s.use_backup_code(codes[0].0).unwrap());
    }
}
