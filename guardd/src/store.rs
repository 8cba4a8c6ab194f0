use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use zeroize::Zeroizing;

use crate::otp::{HashAlg, TotpParams};

/// How long a writer waits for a lock held by another connection before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the token store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the token database {path}: {source}")]
    Open {
        path: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the token database is busy or locked; try again (another process holds it)")]
    Busy,
    #[error("token database error: {0}")]
    Sqlite(rusqlite::Error),
    #[error("the system random source failed: {0}")]
    Random(String),
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

/// A token's state: pending until its first correct code, then active.
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

/// What verification needs: the secret (zeroized on drop) and how to compute codes.
pub struct TokenSecret {
    pub id: String,
    pub secret: Zeroizing<Vec<u8>>,
    pub params: TotpParams,
}

/// Tokens in one SQLite file (WAL, synchronous=FULL: an accepted step is on disk before the
/// answer leaves the daemon). One connection behind a mutex: SQLite has one writer anyway.
pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    id        TEXT PRIMARY KEY,
    user      TEXT NOT NULL,
    label     TEXT NOT NULL,
    kind      TEXT NOT NULL,
    state     TEXT NOT NULL,
    secret    BLOB NOT NULL,
    algorithm TEXT NOT NULL,
    digits    INTEGER NOT NULL,
    period    INTEGER NOT NULL,
    last_step INTEGER,
    created   INTEGER NOT NULL,
    last_used INTEGER
);
CREATE INDEX IF NOT EXISTS tokens_user ON tokens(user);
";

impl Store {
    /// Opens (creating if needed, mode 0600) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source: Box<dyn std::error::Error + Send + Sync>| StoreError::Open {
            path: path.display().to_string(),
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
        let conn = Connection::open(path).map_err(|e| open_err(e.into()))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| open_err(e.into()))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| open_err(e.into()))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| open_err(e.into()))?;
        conn.execute_batch(SCHEMA).map_err(|e| open_err(e.into()))?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (statements are atomic),
        // so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a pending TOTP token and returns its description.
    pub fn add_pending(
        &self,
        user: &str,
        label: &str,
        secret: &[u8],
        params: TotpParams,
        now: i64,
    ) -> Result<TokenInfo, StoreError> {
        let conn = self.conn();
        loop {
            // 48 bits: short enough to type in `guardctl delete`, collisions retried below.
            let id = crate::otp::random_hex(6).map_err(|e| StoreError::Random(e.to_string()))?;
            let inserted = conn.execute(
                "INSERT OR IGNORE INTO tokens
                 (id, user, label, kind, state, secret, algorithm, digits, period, created)
                 VALUES (?1, ?2, ?3, 'totp', 'pending', ?4, ?5, ?6, ?7, ?8)",
                params![
                    id,
                    user,
                    label,
                    secret,
                    params.algorithm.as_str(),
                    params.digits,
                    params.period as i64,
                    now
                ],
            )?;
            if inserted == 1 {
                return Ok(TokenInfo {
                    id,
                    user: user.into(),
                    label: label.into(),
                    kind: "totp".into(),
                    state: TokenState::Pending.as_str().into(),
                    created: now,
                    last_used: None,
                });
            }
        }
    }

    /// The secrets of `user`'s tokens in `state`, newest first.
    pub fn secrets(&self, user: &str, state: TokenState) -> Result<Vec<TokenSecret>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, secret, algorithm, digits, period FROM tokens
             WHERE user = ?1 AND state = ?2 ORDER BY created DESC, id",
        )?;
        let rows = stmt.query_map(params![user, state.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Zeroizing::new(r.get::<_, Vec<u8>>(1)?),
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, secret, alg, digits, period) = row?;
            let params = match (
                HashAlg::parse(&alg),
                u8::try_from(digits),
                u64::try_from(period),
            ) {
                (Some(algorithm), Ok(digits @ 6..=8), Ok(period @ 1..=300)) => TotpParams {
                    algorithm,
                    digits,
                    period,
                },
                _ => return Err(StoreError::Corrupt(id)),
            };
            out.push(TokenSecret { id, secret, params });
        }
        Ok(out)
    }

    /// Whether `user` has at least one active token.
    pub fn has_active(&self, user: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                "SELECT 1 FROM tokens WHERE user = ?1 AND state = 'active' LIMIT 1",
                [user],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Records that token `id` accepted time step `step`, if and only if no equal or later step
    /// was accepted before and the token is in state `from`. This single UPDATE is the replay
    /// guard: of two concurrent logins with the same code, exactly one sees `true`.
    /// A pending token becomes active by the same statement.
    pub fn accept_step(
        &self,
        id: &str,
        from: TokenState,
        step: u64,
        now: i64,
    ) -> Result<bool, StoreError> {
        let step = i64::try_from(step).map_err(|_| StoreError::Corrupt(id.into()))?;
        let conn = self.conn();
        let changed = conn.execute(
            "UPDATE tokens SET last_step = ?1, last_used = ?2, state = 'active'
             WHERE id = ?3 AND state = ?4 AND (last_step IS NULL OR last_step < ?1)",
            params![step, now, id, from.as_str()],
        )?;
        Ok(changed == 1)
    }

    /// Tokens of `user`, or of everyone when `user` is None, ordered by user then age.
    pub fn list(&self, user: Option<&str>) -> Result<Vec<TokenInfo>, StoreError> {
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

    /// The token `id` if it belongs to `user`.
    pub fn get(&self, user: &str, id: &str) -> Result<Option<TokenInfo>, StoreError> {
        Ok(self.list(Some(user))?.into_iter().find(|t| t.id == id))
    }

    /// Deletes `user`'s token `id`; false when there is no such token.
    pub fn delete(&self, user: &str, id: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        Ok(conn.execute(
            "DELETE FROM tokens WHERE user = ?1 AND id = ?2",
            params![user, id],
        )? == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn database_file_is_private() {
        let (dir, _s) = temp_store();
        let mode = std::fs::metadata(dir.path().join("t.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn pending_token_becomes_active_once_and_steps_only_move_forward() {
        let (_d, s) = temp_store();
        let t = s
            .add_pending("ann", "phone", &[7; 20], TotpParams::default(), 1)
            .unwrap();
        assert!(!s.has_active("ann").unwrap());
        assert!(s.accept_step(&t.id, TokenState::Pending, 100, 2).unwrap());
        assert!(s.has_active("ann").unwrap());
        assert!(!s.accept_step(&t.id, TokenState::Pending, 101, 2).unwrap());
        assert!(
            !s.accept_step(&t.id, TokenState::Active, 100, 3).unwrap(),
            "replay"
        );
        assert!(
            !s.accept_step(&t.id, TokenState::Active, 99, 3).unwrap(),
            "older step"
        );
        assert!(s.accept_step(&t.id, TokenState::Active, 101, 3).unwrap());
        let info = s.get("ann", &t.id).unwrap().unwrap();
        assert_eq!((info.state.as_str(), info.last_used), ("active", Some(3)));
    }

    #[test]
    fn secrets_round_trip_and_delete_is_scoped_to_the_user() {
        let (_d, s) = temp_store();
        let t = s
            .add_pending("ann", "", &[9; 20], TotpParams::default(), 1)
            .unwrap();
        let secrets = s.secrets("ann", TokenState::Pending).unwrap();
        assert_eq!(secrets.len(), 1);
        assert_eq!(*secrets[0].secret, vec![9; 20]);
        assert!(s.secrets("ann", TokenState::Active).unwrap().is_empty());
        assert!(!s.delete("bob", &t.id).unwrap());
        assert!(s.delete("ann", &t.id).unwrap());
        assert!(s.list(None).unwrap().is_empty());
    }

    #[test]
    fn concurrent_accepts_of_one_step_succeed_exactly_once() {
        let (_d, s) = temp_store();
        let t = s
            .add_pending("ann", "", &[1; 20], TotpParams::default(), 1)
            .unwrap();
        assert!(s.accept_step(&t.id, TokenState::Pending, 10, 1).unwrap());
        let wins = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..50)
                .map(|_| scope.spawn(|| s.accept_step(&t.id, TokenState::Active, 11, 2).unwrap()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|&won| won)
                .count()
        });
        assert_eq!(wins, 1);
    }
}
