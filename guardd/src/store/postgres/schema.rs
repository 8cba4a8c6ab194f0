//! The shared store's schema: versioned migrations under an advisory lock, and the key check.

use std::path::Path;
use std::sync::Arc;

use super::connect::{col, Conn, Connector};
use crate::seal::Sealer;
use crate::store::{check_key, load_key, StoreError, SCHEMA_VERSION};

/// The advisory lock class of schema migrations.
const MIGRATION_LOCK: i32 = 0x534f;

/// Schema migrations in PostgreSQL's dialect, one per SQLite migration, so a schema version
/// means the same in both; `schema_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tokens (
    id        TEXT PRIMARY KEY,
    "user"    TEXT NOT NULL,
    label     TEXT NOT NULL,
    kind      TEXT NOT NULL,
    state     TEXT NOT NULL,
    secret    BYTEA NOT NULL,
    algorithm TEXT NOT NULL,
    digits    BIGINT NOT NULL,
    period    BIGINT NOT NULL,
    last      BIGINT,
    drift     BIGINT NOT NULL DEFAULT 0,
    created   BIGINT NOT NULL,
    last_used BIGINT
);
CREATE INDEX tokens_user ON tokens("user");
CREATE TABLE lockouts (
    "user"    TEXT PRIMARY KEY,
    failures  BIGINT NOT NULL,
    until     BIGINT NOT NULL
);
CREATE TABLE backup_codes (
    id        BIGSERIAL PRIMARY KEY,
    "user"    TEXT NOT NULL,
    hash      TEXT NOT NULL,
    created   BIGINT NOT NULL
);
CREATE INDEX backup_codes_user ON backup_codes("user");
CREATE TABLE meta (
    key       TEXT PRIMARY KEY,
    value     BYTEA NOT NULL
);
"#,
    r#"
ALTER TABLE tokens ADD COLUMN uid BIGINT;
ALTER TABLE lockouts ADD COLUMN uid BIGINT;
ALTER TABLE backup_codes ADD COLUMN uid BIGINT;
CREATE TABLE invitations (
    "user"    TEXT PRIMARY KEY,
    uid       BIGINT NOT NULL,
    hash      BYTEA NOT NULL,
    expires   BIGINT NOT NULL
);
"#,
    r#"
CREATE TABLE bindings (
    "user"    TEXT NOT NULL,
    host      TEXT NOT NULL,
    uid       BIGINT NOT NULL,
    PRIMARY KEY ("user", host)
);
INSERT INTO bindings ("user", host, uid)
    SELECT "user", '', uid FROM tokens WHERE uid IS NOT NULL
    UNION SELECT "user", '', uid FROM backup_codes WHERE uid IS NOT NULL
    UNION SELECT "user", '', uid FROM lockouts WHERE uid IS NOT NULL
    ON CONFLICT DO NOTHING;
"#,
    r#"
CREATE TABLE grants (
    id        TEXT PRIMARY KEY,
    "user"    TEXT NOT NULL,
    rule      TEXT NOT NULL,
    digest    TEXT NOT NULL,
    proof     TEXT NOT NULL,
    created   BIGINT NOT NULL,
    expires   BIGINT NOT NULL,
    host      TEXT,
    service   TEXT,
    rhost     TEXT,
    tty       TEXT,
    ssh_key   TEXT,
    session   TEXT,
    ssh_connection TEXT
);
CREATE INDEX grants_user ON grants("user");
CREATE INDEX grants_expires ON grants(expires);
"#,
];

/// Brings the schema to this guardd's version and checks that the key in `key_file` opens the
/// secrets, recording its check value in a database without one (only then may the key file be
/// created). Safe when many guardds start at once: it runs under an advisory lock, in one
/// transaction. Returns the key.
pub(crate) fn prepare(connector: Arc<Connector>, key_file: &Path) -> Result<Sealer, StoreError> {
    let mut conn = Conn::new(connector).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let loaded = prepare_with(&mut conn, KeySource::File(key_file))?;
    loaded.ok_or(StoreError::Internal)
}

pub(super) fn prepare_with(c: &mut Conn, key: KeySource<'_>) -> Result<Option<Sealer>, StoreError> {
    let display = c.connector.describe().to_owned();
    c.start("BEGIN")?;
    match prepare_in(c, &display, key) {
        Ok(loaded) => {
            c.finish(true)?;
            Ok(loaded)
        }
        Err(e) => {
            let _ = c.finish(false);
            Err(e)
        }
    }
}

/// Where [`prepare_in`] finds the key: a file it may create (for a database without
/// sealed secrets), or a key already loaded.
#[derive(Clone, Copy)]
pub(super) enum KeySource<'a> {
    File(&'a Path),
    Loaded(&'a Sealer),
}

fn prepare_in(
    c: &mut Conn,
    display: &str,
    key: KeySource<'_>,
) -> Result<Option<Sealer>, StoreError> {
    c.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&MIGRATION_LOCK])?;
    c.simple("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
    let found: i64 = c
        .query("SELECT coalesce(max(version), 0) FROM schema_version", &[])?
        .first()
        .map_or(Ok(0), |r| col(r, 0))?;
    if found < 0 {
        return Err(StoreError::Unversioned {
            path: display.into(),
        });
    }
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: display.into(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    if found == 0 {
        let tables: i64 = c
            .query(
                "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename <> 'schema_version'",
                &[],
            )?
            .first()
            .map_or(Ok(0), |r| col(r, 0))?;
        if tables > 0 {
            return Err(StoreError::Unversioned {
                path: display.into(),
            });
        }
    }
    for sql in MIGRATIONS.iter().skip(found as usize) {
        c.simple(sql)?;
    }
    if found < SCHEMA_VERSION {
        c.simple("DELETE FROM schema_version")?;
        c.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&SCHEMA_VERSION],
        )?;
    }
    let check: Option<Vec<u8>> = c
        .query("SELECT value FROM meta WHERE key = 'key_check'", &[])?
        .first()
        .map(|r| col(r, 0))
        .transpose()?;
    let mut loaded = None;
    let (sealer, key_name): (&Sealer, String) = match key {
        KeySource::File(path) => {
            let name = path.display().to_string();
            (
                loaded.insert(load_key(path, check.is_some(), display)?),
                name,
            )
        }
        KeySource::Loaded(sealer) => (sealer, "this host's key file".into()),
    };
    if let Some(sealed) = check_key(sealer, check.as_deref(), &key_name, display)? {
        c.execute(
            "INSERT INTO meta (key, value) VALUES ('key_check', $1)",
            &[&sealed],
        )?;
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_backends_know_the_same_schema_versions() {
        assert_eq!(super::MIGRATIONS.len() as i64, super::SCHEMA_VERSION);
        assert_eq!(
            crate::store::sqlite::MIGRATIONS.len() as i64,
            super::SCHEMA_VERSION
        );
    }
}
