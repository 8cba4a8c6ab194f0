//! Moving a site between stores: an offline copy of every row from one store (SQLite or
//! PostgreSQL) into another, sealed secrets copied as the bytes they are, never opened. Both
//! stores must belong to one key file (the destination's key check is verified before anything is
//! written). The copy is a merge, so it can be repeated: the destination ends up holding every
//! source row (upserts by primary key), rows only it holds stay, and a token's accepted counter
//! never moves back (a code used on either side stays used). All writes are one transaction;
//! the destination is then read again and checked against the source.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::postgres::{prepare, Connector};
use super::{PgSettings, PgStore, SqliteStore, StoreError};

/// One end of a copy.
#[derive(Debug, Clone)]
pub enum Target {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database.
    Postgres(PgSettings),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Sqlite(path) => write!(f, "{}", path.display()),
            // A URL with a password is refused when connecting, and one that does not parse may
            // hold one: neither is echoed meanwhile.
            Target::Postgres(settings)
                if settings
                    .url
                    .parse::<tokio_postgres::Config>()
                    .is_ok_and(|c| c.get_password().is_none()) =>
            {
                f.write_str(&settings.url)
            }
            Target::Postgres(_) => {
                f.write_str("the database URL (not shown: it holds a password or does not parse)")
            }
        }
    }
}

/// Every row of a store, keyed by primary key, as plain values: what a copy reads and writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dump {
    /// By token id.
    pub tokens: BTreeMap<String, TokenRow>,
    /// By user.
    pub lockouts: BTreeMap<String, LockoutRow>,
    /// By row id (kept, so a copy can be repeated without doubling codes).
    pub backup_codes: BTreeMap<i64, BackupCodeRow>,
    /// By user.
    pub invitations: BTreeMap<String, InvitationRow>,
    /// The uid, by (user, host).
    pub bindings: BTreeMap<(String, String), i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub user: String,
    pub label: String,
    pub kind: String,
    pub state: String,
    /// Sealed (bound to the token id); copied as it is.
    pub secret: Vec<u8>,
    pub algorithm: String,
    pub digits: i64,
    pub period: i64,
    pub last: Option<i64>,
    pub drift: i64,
    pub created: i64,
    pub last_used: Option<i64>,
    pub uid: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockoutRow {
    pub failures: i64,
    pub until: i64,
    pub uid: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupCodeRow {
    pub user: String,
    pub hash: String,
    pub created: i64,
    pub uid: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvitationRow {
    pub uid: i64,
    pub hash: Vec<u8>,
    pub expires: i64,
}

/// What a backend offers a copy: transactions, all its rows, and upserts by primary key.
pub(super) trait Rows {
    /// Starts a transaction: a consistent read, or (`write`) one that holds the tables until it
    /// ends.
    fn begin_copy(&self, write: bool) -> Result<(), StoreError>;
    /// Commits (`keep`) or undoes it.
    fn end_copy(&self, keep: bool) -> Result<(), StoreError>;
    fn read_rows(&self) -> Result<Dump, StoreError>;
    /// Inserts these rows, replacing rows with the same primary keys.
    fn upsert_rows(&self, rows: &Dump) -> Result<(), StoreError>;
}

/// Rows per table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub tokens: usize,
    pub lockouts: usize,
    pub backup_codes: usize,
    pub invitations: usize,
    pub bindings: usize,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tokens {}, lockouts {}, backup_codes {}, invitations {}, bindings {}",
            self.tokens, self.lockouts, self.backup_codes, self.invitations, self.bindings
        )
    }
}

/// What a copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The source's rows, all now in the destination.
    pub copied: Counts,
    /// Rows the destination lacked or held otherwise (zero when copying again).
    pub written: Counts,
    /// Rows only the destination holds, left as they are.
    pub only_in_destination: Counts,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "copied: {}", self.copied)?;
        writeln!(f, "written: {}", self.written)?;
        writeln!(
            f,
            "kept, only in the destination: {}",
            self.only_in_destination
        )?;
        writeln!(f, "verified")
    }
}

impl Dump {
    /// Reads every row of `target` (opened with `key_file`, which must fit it).
    pub fn read(target: &Target, key_file: &Path) -> Result<Dump, StoreError> {
        require_key(key_file)?;
        require_source(target)?;
        snapshot(open(target, key_file)?.as_ref())
    }

    pub fn counts(&self) -> Counts {
        Counts {
            tokens: self.tokens.len(),
            lockouts: self.lockouts.len(),
            backup_codes: self.backup_codes.len(),
            invitations: self.invitations.len(),
            bindings: self.bindings.len(),
        }
    }

    /// The rows `dest` must take to hold all of these: missing or different ones, merged.
    fn missing_from(&self, dest: &Dump) -> Dump {
        Dump {
            tokens: to_write(&self.tokens, &dest.tokens, merge_token),
            lockouts: to_write(&self.lockouts, &dest.lockouts, merge_lockout),
            backup_codes: to_write(&self.backup_codes, &dest.backup_codes, take_source),
            invitations: to_write(&self.invitations, &dest.invitations, take_source),
            bindings: to_write(&self.bindings, &dest.bindings, take_source),
        }
    }

    /// How many rows of `dest` `source` lacks.
    fn only_in(dest: &Dump, source: &Dump) -> Counts {
        fn extra<K: Ord, V>(dest: &BTreeMap<K, V>, source: &BTreeMap<K, V>) -> usize {
            dest.keys().filter(|k| !source.contains_key(k)).count()
        }
        Counts {
            tokens: extra(&dest.tokens, &source.tokens),
            lockouts: extra(&dest.lockouts, &source.lockouts),
            backup_codes: extra(&dest.backup_codes, &source.backup_codes),
            invitations: extra(&dest.invitations, &source.invitations),
            bindings: extra(&dest.bindings, &source.bindings),
        }
    }
}

/// A token row merged into the destination's: the source's values, except that the accepted
/// counter is the later of the two (NULL, never used, is the earliest), and the drift and last
/// use go with it (a tie keeps the source's), and the state is the further of the two: a token
/// disabled on either side stays disabled, one confirmed on either side stays active.
fn merge_token(source: &TokenRow, dest: Option<&TokenRow>) -> TokenRow {
    let mut row = source.clone();
    if let Some(d) = dest.filter(|d| d.last > source.last) {
        row.last = d.last;
        row.drift = d.drift;
        row.last_used = d.last_used;
    }
    fn rank(state: &str) -> u8 {
        match state {
            "pending" => 0,
            "active" => 1,
            // Disabled, or a state this guardd does not know: kept.
            _ => 2,
        }
    }
    if let Some(d) = dest.filter(|d| rank(&d.state) > rank(&source.state)) {
        row.state = d.state.clone();
    }
    row
}

/// A failure record merged into the destination's: the more failures and the later end of the
/// back-off, so a copy never shortens a wait or hands out fresh free failures.
fn merge_lockout(source: &LockoutRow, dest: Option<&LockoutRow>) -> LockoutRow {
    let mut row = source.clone();
    if let Some(d) = dest {
        row.failures = row.failures.max(d.failures);
        row.until = row.until.max(d.until);
    }
    row
}

fn take_source<V: Clone>(source: &V, _dest: Option<&V>) -> V {
    source.clone()
}

/// The merged rows of `source` that differ from what `dest` holds under their keys.
fn to_write<K: Ord + Clone, V: Clone + PartialEq>(
    source: &BTreeMap<K, V>,
    dest: &BTreeMap<K, V>,
    merge: fn(&V, Option<&V>) -> V,
) -> BTreeMap<K, V> {
    source
        .iter()
        .filter_map(|(k, v)| {
            let want = merge(v, dest.get(k));
            (dest.get(k) != Some(&want)).then(|| (k.clone(), want))
        })
        .collect()
}

/// Copies every row of `from` into `to` (created and migrated if needed), both sealed with the
/// key in `key_file`, then reads `to` again and checks it. Offline: no guardd may use either
/// store meanwhile.
pub fn copy(from: &Target, to: &Target, key_file: &Path) -> Result<Report, StoreError> {
    require_key(key_file)?;
    if same(from, to) {
        return Err(StoreError::CopyRefused(format!(
            "{to} is the store being copied"
        )));
    }
    require_source(from)?;
    let source = snapshot(open(from, key_file)?.as_ref())?;
    let dest = open(to, key_file).map_err(|e| match e {
        StoreError::WrongKey { .. } => StoreError::CopyRefused(format!(
            "{to} is sealed with another key than {}: nothing was written (the stores of a site share one key file)",
            key_file.display()
        )),
        e => e,
    })?;
    let written = within(dest.as_ref(), true, || {
        let held = dest.read_rows()?;
        refuse_resurrection(&source, &held, to)?;
        let writes = source.missing_from(&held);
        dest.upsert_rows(&writes)?;
        Ok(writes.counts())
    })?;
    drop(dest);
    // Read back through a connection of its own: what was committed, not what was sent.
    let after = snapshot(open(to, key_file)?.as_ref())?;
    verify(&source, &after)?;
    Ok(Report {
        copied: source.counts(),
        written,
        only_in_destination: Dump::only_in(&after, &source),
    })
}

/// A destination that holds rows of an earlier copy of `source` (a token id, or a backup code
/// with its hash) but lacks other single-use rows of it (tokens, backup codes, invitations) may
/// have used them up or deleted them since: a merge would bring a used backup code or
/// invitation, or a deleted (lost) token, back. Such a copy is refused; nothing is written.
fn refuse_resurrection(source: &Dump, dest: &Dump, to: &Target) -> Result<(), StoreError> {
    let shared = source.tokens.keys().any(|id| dest.tokens.contains_key(id))
        || source.backup_codes.iter().any(|(id, code)| {
            dest.backup_codes
                .get(id)
                .is_some_and(|d| d.hash == code.hash)
        });
    if !shared {
        return Ok(());
    }
    fn lacking<K: Ord, V>(source: &BTreeMap<K, V>, dest: &BTreeMap<K, V>) -> usize {
        source.keys().filter(|k| !dest.contains_key(k)).count()
    }
    let missing = [
        ("tokens", lacking(&source.tokens, &dest.tokens)),
        (
            "backup_codes",
            lacking(&source.backup_codes, &dest.backup_codes),
        ),
        (
            "invitations",
            lacking(&source.invitations, &dest.invitations),
        ),
    ];
    let missing: Vec<String> = missing
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(table, n)| format!("{table} {n}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(StoreError::CopyRefused(format!(
        "{to} holds rows of an earlier copy of this store but lacks others it holds ({}): they \
         may have been used up or deleted there since (a used backup code or invitation, a \
         deleted token), and copying would bring them back. Nothing was written; for a move, \
         copy into a new file or an empty database",
        missing.join(", ")
    )))
}

/// Every source row is in `after` as the merge leaves it.
fn verify(source: &Dump, after: &Dump) -> Result<(), StoreError> {
    fn bad<K: Ord + std::fmt::Debug>(table: &str, rows: &BTreeMap<K, impl Sized>) -> Vec<String> {
        rows.keys().map(|k| format!("{table} {k:?}")).collect()
    }
    let wrong = source.missing_from(after);
    let mut found = bad("tokens", &wrong.tokens);
    found.extend(bad("lockouts", &wrong.lockouts));
    found.extend(bad("backup_codes", &wrong.backup_codes));
    found.extend(bad("invitations", &wrong.invitations));
    found.extend(bad("bindings", &wrong.bindings));
    if found.is_empty() {
        return Ok(());
    }
    let shown = found.len().min(10);
    Err(StoreError::CopyMismatch(format!(
        "{} rows missing or different after the copy (was a guardd running?): {}{}",
        found.len(),
        found[..shown].join(", "),
        if found.len() > shown { ", ..." } else { "" }
    )))
}

fn require_key(key_file: &Path) -> Result<(), StoreError> {
    if key_file.exists() {
        return Ok(());
    }
    Err(StoreError::CopyRefused(format!(
        "the key file {} is missing: a copy uses the site's key file and never makes one",
        key_file.display()
    )))
}

/// A SQLite file to read from must exist: opening would create an empty one.
fn require_source(target: &Target) -> Result<(), StoreError> {
    match target {
        Target::Sqlite(path) if !path.exists() => Err(StoreError::CopyRefused(format!(
            "{} does not exist",
            path.display()
        ))),
        _ => Ok(()),
    }
}

fn same(a: &Target, b: &Target) -> bool {
    match (a, b) {
        (Target::Sqlite(a), Target::Sqlite(b)) => {
            a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
        }
        (Target::Postgres(a), Target::Postgres(b)) => a.url == b.url,
        _ => false,
    }
}

/// Opens `target` through the path guardd starts with: created and migrated if needed, and its
/// key check verified against `key_file` (recorded in a store without one).
fn open(target: &Target, key_file: &Path) -> Result<Box<dyn Rows>, StoreError> {
    Ok(match target {
        Target::Sqlite(path) => Box::new(SqliteStore::open(path, key_file)?),
        Target::Postgres(settings) => {
            let connector = Arc::new(Connector::new(settings)?);
            let sealer = prepare(connector.clone(), key_file)?;
            Box::new(
                PgStore::new(connector, Arc::new(sealer))
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?,
            )
        }
    })
}

/// Runs `f` in one transaction of `store`, committed only if it succeeds.
fn within<T>(
    store: &dyn Rows,
    write: bool,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    store.begin_copy(write)?;
    match f() {
        Ok(value) => store.end_copy(true).map(|()| value),
        Err(e) => {
            let _ = store.end_copy(false);
            Err(e)
        }
    }
}

fn snapshot(store: &dyn Rows) -> Result<Dump, StoreError> {
    within(store, false, || store.read_rows())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lockout::Backoff;
    use crate::otp::{Kind, OtpParams};
    use crate::store::tests::{settings, Fixture};
    use crate::store::{NewToken, Store, TokenState};

    fn token<'a>(user: &'a str, uid: u32, kind: Kind, secret: &'a [u8]) -> NewToken<'a> {
        NewToken {
            user,
            uid: Some(uid),
            label: "phone",
            kind,
            params: OtpParams::default(),
            secret,
        }
    }

    /// A site with a bit of everything: pending, active and disabled tokens with counters and
    /// drift, a lock-out, backup codes, an invitation and bindings on two hosts.
    fn populate(s: &dyn Store) {
        let pending = s.add_pending(token("ann", 1001, Kind::Totp, &[1; 20]), 10);
        assert!(pending.is_ok());
        let active = s
            .add_pending(token("bob", 1002, Kind::Totp, &[2; 20]), 11)
            .unwrap();
        assert!(s
            .accept(&active.id, TokenState::Pending, 59_000_123, -1, 12)
            .unwrap());
        let hotp = s
            .add_pending(token("bob", 1002, Kind::Hotp, &[3; 20]), 13)
            .unwrap();
        assert!(s.accept(&hotp.id, TokenState::Pending, 7, 0, 14).unwrap());
        let off = s
            .add_pending(token("cy", 1003, Kind::Totp, &[4; 20]), 15)
            .unwrap();
        assert!(s
            .accept(&off.id, TokenState::Pending, 59_000_100, 1, 16)
            .unwrap());
        assert!(s
            .set_state("cy", &off.id, TokenState::Active, TokenState::Disabled)
            .unwrap());
        let backoff = Backoff {
            free_failures: 1,
            first_delay: 30,
            max_delay: 60,
        };
        s.record_failure("cy", Some(1003), &backoff, 20).unwrap();
        s.record_failure("cy", Some(1003), &backoff, 21).unwrap();
        let hashes: Vec<String> = (0..10).map(|i| format!("$argon2id$fake{i}")).collect();
        s.replace_backup_codes("bob", Some(1002), &hashes, 22)
            .unwrap();
        s.add_invitation("dee", 1004, &[9; 32], 99).unwrap();
        for (user, uid) in [("ann", 1001), ("bob", 1002), ("cy", 1003)] {
            assert_eq!(s.foreign_uid(user, "h1", Some(uid)).unwrap(), None);
        }
        assert_eq!(s.foreign_uid("bob", "h2", Some(2002)).unwrap(), None);
    }

    fn sqlite_at(dir: &Path, name: &str) -> Target {
        Target::Sqlite(dir.join(name))
    }

    /// The store at `target`, sealed with `key` (made if the store is new).
    fn store_at(target: &Target, key: &Path) -> Box<dyn Store> {
        match target {
            Target::Sqlite(path) => Box::new(SqliteStore::open(path, key).unwrap()),
            Target::Postgres(settings) => {
                let connector = Arc::new(Connector::new(settings).unwrap());
                let sealer = prepare(connector.clone(), key).unwrap();
                Box::new(PgStore::new(connector, Arc::new(sealer)).unwrap())
            }
        }
    }

    fn postgres() -> Target {
        Target::Postgres(settings(&pgtemp::Cluster::shared().database()))
    }

    #[test]
    fn sqlite_to_postgres_and_back_compares_equal_and_secrets_still_open() {
        let (f, s) = Fixture::sqlite();
        populate(&s);
        drop(s);
        let key = f.dir.path().join("k");
        let (a, pg, b) = (
            sqlite_at(f.dir.path(), "t.db"),
            postgres(),
            sqlite_at(f.dir.path(), "back.db"),
        );
        let original = Dump::read(&a, &key).unwrap();
        let expected = Counts {
            tokens: 4,
            lockouts: 1,
            backup_codes: 10,
            invitations: 1,
            bindings: 4,
        };
        assert_eq!(original.counts(), expected);

        let there = copy(&a, &pg, &key).unwrap();
        assert_eq!((there.copied, there.written), (expected, expected));
        assert_eq!(there.only_in_destination, Counts::default());
        assert_eq!(Dump::read(&pg, &key).unwrap(), original);
        let back = copy(&pg, &b, &key).unwrap();
        assert_eq!(back.written, expected);
        assert_eq!(Dump::read(&b, &key).unwrap(), original);
        assert_eq!(
            back.to_string(),
            "copied: tokens 4, lockouts 1, backup_codes 10, invitations 1, bindings 4\n\
             written: tokens 4, lockouts 1, backup_codes 10, invitations 1, bindings 4\n\
             kept, only in the destination: tokens 0, lockouts 0, backup_codes 0, invitations 0, bindings 0\n\
             verified\n"
        );

        // The sealed secrets still open under their ids at both ends.
        let moved = SqliteStore::open(&f.dir.path().join("back.db"), &key).unwrap();
        assert_eq!(
            &**moved.secrets("bob", TokenState::Active).unwrap()[1].secret,
            &[2; 20]
        );
        let shared = store_at(&pg, &key);
        assert_eq!(
            &**shared.secrets("ann", TokenState::Pending).unwrap()[0].secret,
            &[1; 20]
        );
        // The id sequence was moved past the copied backup codes: new codes get new ids.
        shared
            .replace_backup_codes("ann", Some(1001), &["$argon2id$new".into()], 30)
            .unwrap();
        let ids: Vec<i64> = shared
            .backup_codes("ann")
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect();
        assert!(
            ids.iter().all(|id| !original.backup_codes.contains_key(id)),
            "{ids:?}"
        );
    }

    #[test]
    fn copying_again_changes_nothing() {
        let (f, s) = Fixture::sqlite();
        populate(&s);
        drop(s);
        let key = f.dir.path().join("k");
        let (a, pg) = (sqlite_at(f.dir.path(), "t.db"), postgres());
        copy(&a, &pg, &key).unwrap();
        let first = Dump::read(&pg, &key).unwrap();
        let again = copy(&a, &pg, &key).unwrap();
        assert_eq!(again.written, Counts::default());
        assert_eq!(again.copied, first.counts());
        assert_eq!(Dump::read(&pg, &key).unwrap(), first);
    }

    /// A code used on the destination after an earlier copy stays used: the later counter (and
    /// its drift) wins, whichever side holds it, and rows only the destination holds stay.
    #[test]
    fn counters_never_move_back_and_destination_rows_stay() {
        let (f, s) = Fixture::sqlite();
        populate(&s);
        let key = f.dir.path().join("k");
        let (a, b) = (
            sqlite_at(f.dir.path(), "t.db"),
            sqlite_at(f.dir.path(), "b.db"),
        );
        copy(&a, &b, &key).unwrap();
        let bob = s.secrets("bob", TokenState::Active).unwrap();
        let (totp, hotp) = (bob[1].id.clone(), bob[0].id.clone());
        // Later on the destination: bob's TOTP token; later on the source: his HOTP token.
        let dest = SqliteStore::open(&f.dir.path().join("b.db"), &key).unwrap();
        assert!(dest
            .accept(&totp, TokenState::Active, 59_000_200, 2, 40)
            .unwrap());
        let extra = dest
            .add_pending(token("eve", 1005, Kind::Totp, &[5; 20]), 41)
            .unwrap();
        drop(dest);
        assert!(s.accept(&hotp, TokenState::Active, 9, 0, 42).unwrap());
        drop(s);

        let report = copy(&a, &b, &key).unwrap();
        assert_eq!(report.written.tokens, 1, "{report}");
        assert_eq!(report.only_in_destination.tokens, 1, "{report}");
        let after = Dump::read(&b, &key).unwrap();
        let row = &after.tokens[&totp];
        assert_eq!(
            (row.last, row.drift, row.last_used),
            (Some(59_000_200), 2, Some(40))
        );
        assert_eq!(after.tokens[&hotp].last, Some(9));
        assert!(after.tokens.contains_key(&extra.id));
        // And once more: nothing to do.
        assert_eq!(copy(&a, &b, &key).unwrap().written, Counts::default());
    }

    /// What the destination did after an earlier copy holds when the (older) source is copied
    /// in again: a token it disabled stays disabled, its failures and back-off stay, and a
    /// backup code or invitation it used up is not brought back.
    #[test]
    fn copying_again_never_undoes_what_the_destination_disabled_counted_or_used() {
        let (f, s) = Fixture::sqlite();
        populate(&s);
        drop(s);
        let key = f.dir.path().join("k");
        for dest in [postgres(), sqlite_at(f.dir.path(), "b.db")] {
            let a = sqlite_at(f.dir.path(), "t.db");
            copy(&a, &dest, &key).unwrap();
            let b = store_at(&dest, &key);
            let bob = b.secrets("bob", TokenState::Active).unwrap();
            let stolen = bob[0].id.clone();
            assert!(b
                .set_state("bob", &stolen, TokenState::Active, TokenState::Disabled)
                .unwrap());
            let backoff = Backoff::default();
            for _ in 0..6 {
                b.record_failure("ann", Some(1001), &backoff, 50).unwrap();
            }
            let locked = b.lockout("ann").unwrap();
            drop(b);
            copy(&a, &dest, &key).unwrap();
            let b = store_at(&dest, &key);
            assert_eq!(
                b.get("bob", &stolen).unwrap().unwrap().state,
                TokenState::Disabled,
                "{dest}: a token disabled in the destination was enabled again"
            );
            assert_eq!(b.lockout("ann").unwrap(), locked, "{dest}");

            // A backup code and an invitation used up in the destination.
            let (code, hash) = b.backup_codes("bob").unwrap()[0].clone();
            assert!(b.use_backup_code(code, &hash).unwrap());
            assert!(b.use_invitation("dee", 1004, &[9; 32], 50).unwrap());
            drop(b);
            let before = Dump::read(&dest, &key).unwrap();
            match copy(&a, &dest, &key) {
                Err(StoreError::CopyRefused(m)) => {
                    assert!(
                        m.contains("backup_codes") && m.contains("invitations"),
                        "{m}"
                    );
                    assert_eq!(Dump::read(&dest, &key).unwrap(), before, "{dest}");
                }
                other => {
                    let b = store_at(&dest, &key);
                    let codes: Vec<i64> =
                        b.backup_codes("bob").unwrap().iter().map(|c| c.0).collect();
                    assert!(
                        !codes.contains(&code),
                        "{dest}: a used backup code is back ({other:?})"
                    );
                    assert!(!b.use_invitation("dee", 1004, &[9; 32], 50).unwrap());
                }
            }
        }
    }

    #[test]
    fn a_destination_sealed_with_another_key_is_refused_and_untouched() {
        let (f, s) = Fixture::sqlite();
        populate(&s);
        drop(s);
        let key = f.dir.path().join("k");
        let other_key = f.dir.path().join("other.k");
        let a = sqlite_at(f.dir.path(), "t.db");
        for dest in [postgres(), sqlite_at(f.dir.path(), "other.db")] {
            let store = store_at(&dest, &other_key);
            store
                .add_pending(token("zed", 1009, Kind::Totp, &[8; 20]), 1)
                .unwrap();
            drop(store);
            let theirs = Dump::read(&dest, &other_key).unwrap();
            let err = copy(&a, &dest, &key).unwrap_err();
            assert!(
                matches!(&err, StoreError::CopyRefused(m) if m.contains("another key")),
                "{err}"
            );
            assert_eq!(Dump::read(&dest, &other_key).unwrap(), theirs);
        }
    }

    /// A URL is shown in messages and logs only when it parses and holds no password.
    #[test]
    fn a_database_url_is_never_shown_with_its_password() {
        for url in [
            "postgresql://u:s3cretpw@db.example/db",
            "postgresql://u:s3cretpw@db.example/db?bogus=1",
            "postgresql://u@db.example/db?password=s3cretpw&bogus=1",
            "postgres://u:s3cretpw@[::1/db",
        ] {
            let shown = Target::Postgres(settings(url)).to_string();
            assert!(!shown.contains("s3cretpw"), "{shown}");
        }
        let url = "postgresql://guardd@db.example/guardd?sslmode=require";
        assert_eq!(Target::Postgres(settings(url)).to_string(), url);
    }

    #[test]
    fn a_row_missing_after_the_copy_is_a_mismatch() {
        let mut source = Dump::default();
        source.bindings.insert(("ann".into(), "h1".into()), 1001);
        source.lockouts.insert(
            "ann".into(),
            LockoutRow {
                failures: 2,
                until: 9,
                uid: None,
            },
        );
        let mut after = source.clone();
        assert!(verify(&source, &after).is_ok());
        after.lockouts.get_mut("ann").unwrap().failures = 1;
        after.bindings.clear();
        let err = verify(&source, &after).unwrap_err().to_string();
        assert!(
            err.contains("2 rows") && err.contains("lockouts \"ann\""),
            "{err}"
        );
    }
}
