//! Tokens, failure counters and backup codes, kept sealed. [`Store`] is the seam: one atomic
//! domain step per method. Two backends implement it: [`SqliteStore`], the embedded default (one
//! file, one writer), and [`PgStore`], a shared PostgreSQL for fleets (every guardd of the site
//! points at it). The daemon reaches either only through a [`Runner`]: the SQLite store's own
//! thread, which groups commits, or a small pool of PostgreSQL connections.

use std::future::Future;

use zeroize::Zeroizing;

use crate::grant::Grant;
use crate::lockout::{Backoff, Lockout};
use crate::otp::{Counter, HashAlg, Kind, OtpParams};
use crate::seal::SealError;

mod call;
pub mod copy;
mod pool;
mod postgres;
mod sqlite;
mod thread;

#[cfg(test)]
pub(crate) mod tests;

pub use pool::PgPool;
pub use postgres::{PgSettings, PgStore};
pub use sqlite::SqliteStore;
pub use thread::{Batched, StoreThread};

/// How many schema versions this guardd knows; both backends have the same migrations.
pub const SCHEMA_VERSION: i64 = 4;

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
    #[error("token database error: {0}")]
    Postgres(Box<tokio_postgres::Error>),
    #[error("the token database is unreachable ({0}); guardd reconnects by itself")]
    Unavailable(String),
    #[error("the database setting is unusable: {0}")]
    Settings(String),
    /// The group commit (or transaction) this call was part of failed; every call in it gets
    /// the reason that was logged.
    #[error("the token database did not commit: {0}")]
    NotCommitted(String),
    #[error("internal error in the token store; see the guardd log")]
    Internal,
    #[error("the store stopped; restart guardd")]
    Stopped,
    #[error("the token database holds an invalid row for token {0}")]
    Corrupt(String),
    #[error("copy refused: {0}")]
    CopyRefused(String),
    #[error("the copy does not match its source: {0}")]
    CopyMismatch(String),
}

/// A token's state: pending until its first correct code, then active or disabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    Pending,
    Active,
    Disabled,
}

impl TokenState {
    /// The state a stored name stands for.
    pub fn parse(name: &str) -> Option<TokenState> {
        [
            TokenState::Pending,
            TokenState::Active,
            TokenState::Disabled,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

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
    pub state: TokenState,
    pub created: i64,
    pub last_used: Option<i64>,
}

/// What the store knows about a user for a login decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoginRecord {
    /// The uid of another account the name's records belong to on this host.
    pub foreign: Option<u32>,
    /// At least one active token.
    pub active: bool,
    /// An active token or backup codes: the user can answer a prompt.
    pub can_answer: bool,
}

impl TokenInfo {
    /// The description of `token`, just added as pending under `id`.
    fn pending(id: String, token: &NewToken<'_>, now: i64) -> TokenInfo {
        TokenInfo {
            id,
            user: token.user.into(),
            label: token.label.into(),
            kind: token.kind.as_str().into(),
            state: TokenState::Pending,
            created: now,
            last_used: None,
        }
    }
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
    /// `user`'s failure record, read for a check of a code or proof: until the call ends, any
    /// other such check of the same user, on any guardd sharing the store, waits. So a burst of
    /// guesses spread over hosts sees every failure counted before it.
    fn lock_attempts(&self, user: &str) -> Result<Lockout, StoreError>;
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
    /// The uid that `user` is bound to on `host`, if it is not `uid` (`uid` None: the name has no
    /// account there now). A name is bound, per host, to the uid that host sees for it first
    /// while the user has records (tokens, backup codes, failures), since local accounts may
    /// have other uids on other hosts; a name without records is bound to nothing, so a new
    /// account that reuses a name inherits nothing and is not refused.
    fn foreign_uid(
        &self,
        user: &str,
        host: &str,
        uid: Option<u32>,
    ) -> Result<Option<u32>, StoreError>;
    /// What a login decision needs from the store, in one step: the uid `user` is bound to on
    /// `host` if it is not `uid` (as [`Store::foreign_uid`]), and what the user holds.
    fn login_record(
        &self,
        user: &str,
        host: &str,
        uid: Option<u32>,
    ) -> Result<LoginRecord, StoreError> {
        let foreign = self.foreign_uid(user, host, uid)?;
        let active = self.has_active(user)?;
        Ok(LoginRecord {
            foreign,
            active,
            can_answer: active || !self.backup_codes(user)?.is_empty(),
        })
    }
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
    /// Uses up backup code `id` if it still has `hash` (codes reissued meanwhile may have taken
    /// its id); true only for the one caller that removed it.
    fn use_backup_code(&self, id: i64, hash: &str) -> Result<bool, StoreError>;

    /// Records reuse grants (see [`grant`](crate::grant)), dropping every grant that expired by
    /// `now` and all but the newest [`MAX_PER_USER`](crate::grant::MAX_PER_USER) of each
    /// user's, so grants cannot pile up.
    fn add_grants(&self, grants: &[Grant], now: i64) -> Result<(), StoreError>;
    /// `user`'s grants that have not expired at `now`.
    fn grants(&self, user: &str, now: i64) -> Result<Vec<Grant>, StoreError>;
    /// Binds the grants of `user`'s login over `ssh_connection`, made since `since` with no
    /// session yet and the same keys (`ssh_key`), to `session`; returns how many. The link from
    /// an ssh login's OTP (proved in one sshd process) to its login session (opened in another).
    fn bind_session(
        &self,
        user: &str,
        ssh_connection: &str,
        ssh_key: Option<&str>,
        since: i64,
        session: &str,
    ) -> Result<u64, StoreError>;
    /// Ends all of `user`'s grants; returns how many there were.
    fn forget(&self, user: &str) -> Result<u64, StoreError>;

    /// The token `id` if it belongs to `user`.
    fn get(&self, user: &str, id: &str) -> Result<Option<TokenInfo>, StoreError> {
        Ok(self.list(Some(user))?.into_iter().find(|t| t.id == id))
    }

    /// What the store holds, for operators (`guardctl status`, the metrics): counts, the users
    /// locked out at `now`, the users holding fewer than `backup_codes_below` unused backup
    /// codes (at least one), and the schema version. Lists hold at most [`OVERVIEW_LISTED`].
    fn overview(&self, now: i64, backup_codes_below: u32) -> Result<Overview, StoreError>;
    /// Records that `host` checked the store's health at `now`: a write that must commit, as
    /// an accepted code's must, so a store that reads but cannot write (a lock held elsewhere,
    /// a full disk, a read-only file system or replica) shows as unhealthy.
    fn probe(&self, host: &str, now: i64) -> Result<(), StoreError>;
}

/// Users listed at most per list of an [`Overview`]; the totals count all.
pub const OVERVIEW_LISTED: usize = 100;

/// What [`Store::overview`] reports. No secret, hash or code: names, counts and times.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overview {
    /// Users holding at least one token, in any state.
    pub users: u64,
    pub tokens_pending: u64,
    pub tokens_active: u64,
    pub tokens_disabled: u64,
    /// Users in back-off, the longest wait first, with their record.
    pub locked: Vec<(String, Lockout)>,
    pub locked_total: u64,
    /// Users whose unused backup codes are below the threshold, the fewest first.
    pub backup_codes_low: Vec<(String, u32)>,
    pub backup_codes_low_total: u64,
    pub schema_version: i64,
}

impl Overview {
    /// The count of tokens in the state a stored name stands for (an unknown name counts as
    /// disabled: it answers no prompt).
    pub(crate) fn tokens_mut(&mut self, state: &str) -> &mut u64 {
        match TokenState::parse(state) {
            Some(TokenState::Pending) => &mut self.tokens_pending,
            Some(TokenState::Active) => &mut self.tokens_active,
            Some(TokenState::Disabled) | None => &mut self.tokens_disabled,
        }
    }
}

/// Associated data of the key-check value, which proves at start-up that the key file fits.
pub(crate) const KEY_CHECK: &[u8] = b"soffid-otp key check";

/// Loads the sealing key from `key_file` for the store `store`, which holds sealed secrets when
/// `has_check` (then a missing key file is an error, never replaced by a new key).
pub(crate) fn load_key(
    key_file: &std::path::Path,
    has_check: bool,
    store: &str,
) -> Result<crate::seal::Sealer, StoreError> {
    crate::seal::Sealer::load(key_file, !has_check).map_err(|e| match e {
        SealError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            StoreError::KeyMissing {
                key_file: key_file.display().to_string(),
                path: store.into(),
            }
        }
        e => e.into(),
    })
}

/// Checks `sealer` against a store's recorded key-check value; for a store without one, the
/// value to record.
pub(crate) fn check_key(
    sealer: &crate::seal::Sealer,
    check: Option<&[u8]>,
    key_file: &str,
    store: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    match check {
        Some(sealed) => {
            sealer
                .open(KEY_CHECK, sealed)
                .map_err(|_| StoreError::WrongKey {
                    key_file: key_file.into(),
                    path: store.into(),
                })?;
            Ok(None)
        }
        None => Ok(Some(sealer.seal(KEY_CHECK, KEY_CHECK)?)),
    }
}

/// A token's OTP parameters from a stored row; out-of-range values mark the row corrupt.
pub(crate) fn row_params(
    id: &str,
    alg: &str,
    digits: i64,
    period: i64,
) -> Result<OtpParams, StoreError> {
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

/// Where the service's store calls run. Each call is a closure over `&dyn Store` and is atomic:
/// on SQLite one savepoint in a group commit, on PostgreSQL one transaction. The caller hears
/// back only after its writes are durable.
pub enum Runner {
    /// The embedded store's one thread.
    Sqlite(StoreThread),
    /// A pool of connections to a shared PostgreSQL.
    Postgres(PgPool),
}

impl Runner {
    /// Runs `f` as one atomic call and returns its result once committed; its writes are undone
    /// if it fails or panics.
    pub fn run<T, E>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, E> + Send + 'static,
    ) -> impl Future<Output = Result<T, E>> + Send + '_
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (call, answer) = call::Pending::queue(f);
        async move {
            let started = std::time::Instant::now();
            let submitted = match self {
                Runner::Sqlite(thread) => thread.submit(call),
                Runner::Postgres(pool) => pool.submit(call),
            };
            if let Err(e) = submitted {
                crate::metrics::store_failed(&e.to_string());
                return Err(E::from(e));
            }
            // Bounded, so a database that stops answering cannot hold a login past the module's
            // timeout; the call may still finish, and then its writes stand. (The embedded
            // store bounds its own waits with SQLite's busy timeout.)
            let answer = async {
                answer
                    .await
                    .unwrap_or_else(|_| Err(E::from(StoreError::Stopped)))
            };
            let result = match self {
                Runner::Sqlite(_) => answer.await,
                Runner::Postgres(_) => tokio::time::timeout(pool::CALL_TIMEOUT, answer)
                    .await
                    .unwrap_or_else(|_| {
                        let e = StoreError::Unavailable(format!(
                            "no answer within {} ms",
                            pool::CALL_TIMEOUT.as_millis()
                        ));
                        crate::metrics::store_failed(&e.to_string());
                        Err(E::from(e))
                    }),
            };
            crate::metrics::store_call(started.elapsed());
            result
        }
    }

    /// The kind of store, for status: `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match self {
            Runner::Sqlite(_) => "sqlite",
            Runner::Postgres(_) => "postgres",
        }
    }

    /// What the store is, for logs and status: the SQLite path or the URL without a password.
    pub fn describe(&self) -> String {
        match self {
            Runner::Sqlite(thread) => thread.describe(),
            Runner::Postgres(pool) => pool.describe(),
        }
    }
}

/// What [`Store::foreign_uid`] does with a name's binding on one host; the same rule for every
/// backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Binding {
    /// Leave it as it is.
    Keep,
    /// First sight of a name with records on this host: bind it to this uid.
    Bind(u32),
    /// The name has no records: an old binding to another uid protects nothing, drop it.
    Forget,
}

impl Binding {
    /// The step for a name with or without records, bound on this host to `bound`, seen now
    /// with `uid`.
    pub(crate) fn decide(has_records: bool, bound: Option<i64>, uid: Option<u32>) -> Binding {
        let seen = uid.map(i64::from);
        match (has_records, bound, uid) {
            (false, Some(b), _) if Some(b) != seen => Binding::Forget,
            (true, None, Some(u)) => Binding::Bind(u),
            _ => Binding::Keep,
        }
    }

    /// The other uid the name belongs to, if any, after this step.
    pub(crate) fn foreign(self, bound: Option<i64>, uid: Option<u32>) -> Option<u32> {
        match (self, bound) {
            (Binding::Keep, Some(b)) if Some(b) != uid.map(i64::from) => {
                Some(u32::try_from(b).unwrap_or(u32::MAX))
            }
            _ => None,
        }
    }
}
