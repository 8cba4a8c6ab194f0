//! The shared store: a PostgreSQL database that every guardd of a fleet points at. Secrets stay
//! sealed with the key file of each host, so the database (its administrator, a dump, a replica)
//! holds nothing that opens a token. Every statement that uses up a code or counts a failure is
//! one atomic, conditional statement, so hosts racing with one code cannot both win.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};
use zeroize::Zeroizing;

use super::copy::{BackupCodeRow, Dump, InvitationRow, LockoutRow, Rows, TokenRow};
use super::{
    check_key, load_key, row_params, Binding, LoginRecord, NewToken, Store, StoreError, TokenInfo,
    TokenSecret, TokenState, SCHEMA_VERSION,
};
use crate::lockout::{Backoff, Lockout};
use crate::otp::{Counter, Kind};
use crate::seal::{SealError, Sealer};

/// Connecting (TCP, TLS, authentication) must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Each round trip must finish within this. Both stay well under the PAM module's default 5 s
/// timeout.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The server cancels a statement or a lock wait after this: before the round trip's own limit,
/// so a lock held elsewhere ends one call as busy, on a connection that stays, rather than as
/// an unreachable database (connection dropped, the pool paused for every user).
const SERVER_TIMEOUT: Duration = Duration::from_millis(1500);
/// Advisory lock classes: schema migrations, and one lock per user for checks of codes.
const MIGRATION_LOCK: i32 = 0x534f;
const ATTEMPT_LOCK: i32 = 0x534e;

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
];

/// Where the shared store is and how to reach it, from guardd.toml.
#[derive(Debug, Clone)]
pub struct PgSettings {
    /// A libpq-style URL (`postgresql://role@host/db?...`), without a password.
    pub url: String,
    /// The file holding the role's password: owned by root (or guardd's user), mode 0600.
    pub password_file: Option<PathBuf>,
    /// The CA that signed the server's certificate; with it, TLS is required and the server's
    /// certificate and host name are verified (libpq's verify-full).
    pub ca_file: Option<PathBuf>,
    /// This guardd's name, shown in the server's `pg_stat_activity`.
    pub host: String,
}

impl PgSettings {
    /// Checks the URL, the password file and the CA file without connecting.
    pub fn check(&self) -> Result<(), StoreError> {
        Connector::new(self).map(drop)
    }
}

/// How to reach the database: checked once at start, used for every (re)connection.
#[derive(Clone)]
pub(crate) struct Connector {
    config: tokio_postgres::Config,
    tls: Option<postgres_openssl::MakeTlsConnector>,
    describe: String,
}

impl Connector {
    pub(crate) fn new(settings: &PgSettings) -> Result<Connector, StoreError> {
        let bad = |m: String| StoreError::Settings(m);
        let mut config: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|e| bad(format!("the database URL does not parse: {e}")))?;
        if config.get_password().is_some() {
            return Err(bad(
                "the database URL holds a password: remove it and name a file holding it (mode 0600) in database_password_file".into(),
            ));
        }
        if config.get_hosts().is_empty() {
            return Err(bad(
                "the database URL names no host (for a Unix socket, add ?host=/path/to/dir)".into(),
            ));
        }
        let describe = settings.url.clone();
        // Where each connection goes: `hostaddr` when given (then `host` only names the server
        // for the certificate), else `host`.
        let (hosts, addrs) = (config.get_hosts(), config.get_hostaddrs());
        let mut remote = Vec::new();
        for i in 0..hosts.len().max(addrs.len()) {
            match (hosts.get(i), addrs.get(i)) {
                (host, Some(addr)) if !addr.is_loopback() => {
                    if settings.ca_file.is_some() && !matches!(host, Some(Host::Tcp(_))) {
                        return Err(bad(format!(
                            "hostaddr={addr} needs a host name in host= to verify the server's certificate against"
                        )));
                    }
                    remote.push(addr.to_string());
                }
                (Some(Host::Tcp(name)), None) if !is_loopback(name) => remote.push(name.clone()),
                _ => {}
            }
        }
        let tls = match &settings.ca_file {
            Some(ca) => {
                if config.get_ssl_mode() == SslMode::Disable {
                    return Err(bad(
                        "sslmode=disable in the database URL contradicts database_ca_file".into(),
                    ));
                }
                config.ssl_mode(SslMode::Require);
                Some(tls_connector(ca)?)
            }
            None if !remote.is_empty() => {
                return Err(bad(format!(
                    "{} is reached over the network: set database_ca_file to the CA of the server's certificate (guardd verifies the certificate and the host name)",
                    remote.join(", ")
                )))
            }
            None => None,
        };
        if let Some(file) = &settings.password_file {
            let password = read_password(file)?;
            config.password(password.as_bytes());
        }
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(15))
            .tcp_user_timeout(STATEMENT_TIMEOUT * 3)
            .application_name(format!("guardd@{}", settings.host))
            .options(format!(
                "-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={idle}",
                ms = SERVER_TIMEOUT.as_millis(),
                idle = STATEMENT_TIMEOUT.as_millis() * 5
            ));
        Ok(Connector {
            config,
            tls,
            describe,
        })
    }

    pub(crate) fn describe(&self) -> &str {
        &self.describe
    }

    /// A new connection, its I/O driven by `rt` whenever a statement runs on it, and the task
    /// that drives it (aborted to close the connection).
    fn connect(
        &self,
        rt: &tokio::runtime::Runtime,
    ) -> Result<(Client, tokio::task::JoinHandle<()>), StoreError> {
        let timed = |e: tokio::time::error::Elapsed| {
            StoreError::Unavailable(format!(
                "no connection within {} ms ({e})",
                CONNECT_TIMEOUT.as_millis()
            ))
        };
        let unreachable = |e: tokio_postgres::Error| match e.as_db_error() {
            // Refused by the server itself (role, password, database): say so plainly.
            Some(db) => StoreError::Unavailable(format!("refused: {}", db.message())),
            None => StoreError::Unavailable(e.to_string()),
        };
        let connected = match &self.tls {
            Some(tls) => {
                let connect = self.config.connect(tls.clone());
                let (client, connection) = rt
                    .block_on(async { tokio::time::timeout(CONNECT_TIMEOUT, connect).await })
                    .map_err(timed)?
                    .map_err(unreachable)?;
                (client, rt.spawn(drive(connection)))
            }
            None => {
                let connect = self.config.connect(NoTls);
                let (client, connection) = rt
                    .block_on(async { tokio::time::timeout(CONNECT_TIMEOUT, connect).await })
                    .map_err(timed)?
                    .map_err(unreachable)?;
                (client, rt.spawn(drive(connection)))
            }
        };
        Ok(connected)
    }
}

async fn drive<C: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: C) {
    if let Err(e) = connection.await {
        tracing::warn!("database connection ended: {e}");
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn tls_connector(ca: &Path) -> Result<postgres_openssl::MakeTlsConnector, StoreError> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
    let fail = |e: openssl::error::ErrorStack| {
        StoreError::Settings(format!("database_ca_file {}: {e}", ca.display()))
    };
    let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(fail)?;
    builder.set_ca_file(ca).map_err(fail)?;
    builder.set_verify(SslVerifyMode::PEER);
    builder
        .set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(fail)?;
    // The connector checks the host name (or IP address) of the URL against the certificate.
    Ok(postgres_openssl::MakeTlsConnector::new(builder.build()))
}

/// The password in `file`, which only its owner (root, or the user guardd runs as) may read.
fn read_password(file: &Path) -> Result<Zeroizing<String>, StoreError> {
    let bad =
        |m: String| StoreError::Settings(format!("database_password_file {}: {m}", file.display()));
    let meta = std::fs::metadata(file).map_err(|e| bad(e.to_string()))?;
    let euid = nix::unistd::geteuid().as_raw();
    if meta.mode() & 0o077 != 0 || (meta.uid() != 0 && meta.uid() != euid) {
        return Err(bad(format!(
            "must be owned by root and readable by its owner only (chown root: {f}; chmod 600 {f})",
            f = file.display()
        )));
    }
    let text = Zeroizing::new(std::fs::read_to_string(file).map_err(|e| bad(e.to_string()))?);
    let password = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_owned());
    if password.is_empty() {
        return Err(bad("is empty".into()));
    }
    Ok(password)
}

/// One connection to the shared store, used by one pool worker at a time; it reconnects by
/// itself after the server went away.
pub struct PgStore {
    conn: Mutex<Conn>,
    sealer: Arc<Sealer>,
}

struct Conn {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    /// The task driving the client's connection.
    driver: Option<tokio::task::JoinHandle<()>>,
    statements: HashMap<&'static str, Statement>,
    connector: Arc<Connector>,
    /// A call's BEGIN not sent yet: it goes with the call's first statement, in one round trip.
    begin_pending: bool,
    /// A transaction was begun on the connection and not ended yet. If the connection goes
    /// meanwhile, the server undoes the transaction: the rest of the call must not run on a new
    /// connection (outside any transaction), and its COMMIT must not be reported as done.
    in_transaction: bool,
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

/// Brings the schema to this guardd's version and checks that the key in `key_file` opens the
/// secrets, recording its check value in a database without one (only then may the key file be
/// created). Safe when many guardds start at once: it runs under an advisory lock, in one
/// transaction. Returns the key.
pub(crate) fn prepare(connector: Arc<Connector>, key_file: &Path) -> Result<Sealer, StoreError> {
    let mut conn = Conn::new(connector).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let loaded = prepare_with(&mut conn, KeySource::File(key_file))?;
    loaded.ok_or(StoreError::Internal)
}

fn prepare_with(c: &mut Conn, key: KeySource<'_>) -> Result<Option<Sealer>, StoreError> {
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
pub(crate) enum KeySource<'a> {
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

/// Runs one round trip on `$conn`'s connection (made first if there is none), bounded in time;
/// a connection that fails or does not answer in time is dropped (see `Conn::settle`).
macro_rules! round_trip {
    ($conn:expr, |$c:ident| $call:expr) => {{
        let conn: &mut Conn = $conn;
        match conn.connect() {
            Err(e) => Err(e),
            Ok(()) => {
                let outcome = match &conn.client {
                    Some($c) => conn
                        .rt
                        .block_on(async { tokio::time::timeout(STATEMENT_TIMEOUT, $call).await }),
                    None => return Err(StoreError::Unavailable("not connected".into())),
                };
                conn.settle(outcome)
            }
        }
    }};
}

/// Runs one prepared statement on `$conn`. The first statement of a call goes pipelined behind
/// the call's BEGIN, in one round trip; a connection found dead then (the server restarted since
/// its last use) is replaced once: nothing of the call ran, or it ran in a transaction the
/// server undid when the connection went.
macro_rules! statement_trip {
    ($conn:expr, $sql:expr, |$c:ident, $s:ident| $call:expr) => {{
        let conn: &mut Conn = $conn;
        if std::mem::take(&mut conn.begin_pending) {
            let mut retried = false;
            loop {
                let was_connected = conn.client.is_some();
                let result = conn.statement($sql).and_then(|statement| {
                    let $s = &statement;
                    conn.in_transaction = true;
                    round_trip!(&mut *conn, |$c| async {
                        let (begun, done) = tokio::join!($c.batch_execute("BEGIN"), $call);
                        begun.and(done)
                    })
                });
                match result {
                    // The connection (and the transaction begun on it) is gone: start afresh.
                    Err(StoreError::Unavailable(_)) if was_connected && !retried => {
                        conn.in_transaction = false;
                        retried = true
                    }
                    other => break other,
                }
            }
        } else {
            conn.statement($sql).and_then(|statement| {
                let $s = &statement;
                round_trip!(&mut *conn, |$c| $call)
            })
        }
    }};
}

impl Conn {
    fn new(connector: Arc<Connector>) -> std::io::Result<Conn> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Conn {
            rt,
            client: None,
            driver: None,
            statements: HashMap::new(),
            connector,
            begin_pending: false,
            in_transaction: false,
        })
    }

    /// Makes a connection if there is none (or the last one closed), unless a transaction was
    /// begun on the one that went.
    fn connect(&mut self) -> Result<(), StoreError> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.forget();
        }
        if self.client.is_none() && self.in_transaction {
            return Err(lost());
        }
        if self.client.is_none() {
            let (client, driver) = self.connector.connect(&self.rt)?;
            self.client = Some(client);
            self.driver = Some(driver);
        }
        Ok(())
    }

    /// Drops the connection and closes it at once: a statement may still be waiting for its
    /// answer, and the connection would otherwise stay open, its transaction holding its locks on
    /// the server, until the server answered and this worker ran again.
    fn forget(&mut self) {
        self.client = None;
        self.statements.clear();
        if let Some(driver) = self.driver.take() {
            driver.abort();
            let _ = self.rt.block_on(driver);
        }
    }

    fn statement(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let statement = round_trip!(self, |c| c.prepare(sql))?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        statement_trip!(self, sql, |c, s| c.query(s, params))
    }

    fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        statement_trip!(self, sql, |c, s| c.execute(s, params))
    }

    /// A plain SELECT. Before the call's first write or lock it runs outside the transaction,
    /// whose BEGIN is still pending: under READ COMMITTED every statement sees what was
    /// committed when it starts, inside a transaction or not, and a plain read holds no lock,
    /// so the call means the same and a call that only reads needs no BEGIN and no COMMIT. A
    /// connection found dead then is replaced once (a read can be repeated).
    fn read(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let mut retried = !self.begin_pending;
        loop {
            let was_connected = self.client.is_some();
            let rows = self
                .statement(sql)
                .and_then(|statement| round_trip!(&mut *self, |c| c.query(&statement, params)));
            match rows {
                Err(StoreError::Unavailable(_)) if was_connected && !retried => retried = true,
                other => return other,
            }
        }
    }

    /// Runs statements without parameters (transaction control, migrations).
    fn simple(&mut self, sql: &str) -> Result<(), StoreError> {
        round_trip!(self, |c| c.batch_execute(sql))
    }

    /// Begins a transaction with `sql` (a BEGIN, perhaps with more statements).
    fn start(&mut self, sql: &str) -> Result<(), StoreError> {
        // A connection that went before this call is replaced first: nothing of it ran yet.
        self.connect()?;
        self.in_transaction = true;
        self.simple(sql)
    }

    /// Commits (`keep`) or undoes the transaction begun on this connection. If the connection
    /// went meanwhile, the server undid it: a commit then fails, an undo is done.
    fn finish(&mut self, keep: bool) -> Result<(), StoreError> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.forget();
        }
        let alive = self.client.is_some();
        let done = match (alive, keep) {
            (true, true) => self.simple("COMMIT"),
            (true, false) => self.simple("ROLLBACK"),
            (false, true) => Err(lost()),
            (false, false) => Ok(()),
        };
        self.in_transaction = false;
        done
    }

    /// A round trip's outcome; a connection that failed or did not answer in time is dropped,
    /// so the next call starts on a fresh one.
    fn settle<T>(
        &mut self,
        outcome: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                let error = classify(e);
                if matches!(error, StoreError::Unavailable(_)) {
                    self.forget();
                }
                Err(error)
            }
            Err(_) => {
                self.forget();
                Err(StoreError::Unavailable(format!(
                    "no answer within {} ms",
                    STATEMENT_TIMEOUT.as_millis()
                )))
            }
        }
    }
}

/// The connection went in the middle of a call: its transaction was undone by the server.
fn lost() -> StoreError {
    StoreError::Unavailable(
        "the connection to the database was lost during the call; its writes were undone".into(),
    )
}

/// Sorts a database error: gone or going away (try again later), contention (busy), or a fault.
fn classify(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return match code {
            // serialization_failure, deadlock_detected, lock_not_available, query_canceled
            // (statement_timeout or lock_timeout)
            "40001" | "40P01" | "55P03" | "57014" => StoreError::Busy,
            // admin_shutdown, crash_shutdown, cannot_connect_now, connection exceptions,
            // read_only_sql_transaction (a standby after a fail-over)
            c if c.starts_with("57P") || c.starts_with("08") || c == "25006" => {
                StoreError::Unavailable(db.message().to_owned())
            }
            _ => StoreError::Postgres(Box::new(e)),
        };
    }
    if e.is_closed() || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>()) {
        return StoreError::Unavailable(e.to_string());
    }
    StoreError::Postgres(Box::new(e))
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
        let mut retried = !begin;
        let rows = loop {
            let was_connected = conn.client.is_some();
            let statements = conn
                .statement("SELECT pg_advisory_xact_lock($1, hashtext($2))")
                .and_then(|lock| {
                    conn.statement(r#"SELECT failures, until FROM lockouts WHERE "user" = $1"#)
                        .map(|read| (lock, read))
                });
            let rows = statements.and_then(|(lock, read)| {
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
            });
            match rows {
                // As for a call's first statement: its connection went before anything ran.
                Err(StoreError::Unavailable(_)) if was_connected && !retried => {
                    conn.in_transaction = false;
                    retried = true;
                }
                other => break other,
            }
        }?;
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
}

/// Column `i` of `row`; a type the schema does not have is an error, not a panic.
fn col<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, i: usize) -> Result<T, StoreError> {
    row.try_get(i)
        .map_err(|e| StoreError::Postgres(Box::new(e)))
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

#[cfg(test)]
mod tests {
    #[test]
    fn both_backends_know_the_same_schema_versions() {
        assert_eq!(super::MIGRATIONS.len() as i64, super::SCHEMA_VERSION);
        assert_eq!(
            super::super::sqlite::MIGRATIONS.len() as i64,
            super::SCHEMA_VERSION
        );
    }
}
