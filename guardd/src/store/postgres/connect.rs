//! Reaching the shared store: the settings, checked once (URL, TLS that verifies the server,
//! the password file), and one connection driven by its worker's own runtime, every round trip
//! bounded in time.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};
use zeroize::Zeroizing;

use crate::store::StoreError;

/// Connecting (TCP, TLS, authentication) must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Each round trip must finish within this. Both stay well under the PAM module's default 5 s
/// timeout.
pub(super) const STATEMENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The server cancels a statement or a lock wait after this: before the round trip's own limit,
/// so a lock held elsewhere ends one call as busy, on a connection that stays, rather than as
/// an unreachable database (connection dropped, the pool paused for every user).
const SERVER_TIMEOUT: Duration = Duration::from_millis(1500);

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

pub(super) struct Conn {
    pub(super) rt: tokio::runtime::Runtime,
    pub(super) client: Option<Client>,
    /// The task driving the client's connection.
    pub(super) driver: Option<tokio::task::JoinHandle<()>>,
    pub(super) statements: HashMap<&'static str, Statement>,
    pub(super) connector: Arc<Connector>,
    /// A call's BEGIN not sent yet: it goes with the call's first statement, in one round trip.
    pub(super) begin_pending: bool,
    /// A transaction was begun on the connection and not ended yet. If the connection goes
    /// meanwhile, the server undoes the transaction: the rest of the call must not run on a new
    /// connection (outside any transaction), and its COMMIT must not be reported as done.
    pub(super) in_transaction: bool,
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
                    Some($c) => conn.rt.block_on(async {
                        tokio::time::timeout(
                            $crate::store::postgres::connect::STATEMENT_TIMEOUT,
                            $call,
                        )
                        .await
                    }),
                    None => return Err(StoreError::Unavailable("not connected".into())),
                };
                conn.settle(outcome)
            }
        }
    }};
}

pub(super) use round_trip;

/// Runs one prepared statement on `$conn`. The first statement of a call goes pipelined behind
/// the call's BEGIN, in one round trip; a connection found dead then (the server restarted since
/// its last use) is replaced once: nothing of the call ran, or it ran in a transaction the
/// server undid when the connection went.
macro_rules! statement_trip {
    ($conn:expr, $sql:expr, |$c:ident, $s:ident| $call:expr) => {{
        let conn: &mut Conn = $conn;
        if std::mem::take(&mut conn.begin_pending) {
            conn.afresh(true, |conn| {
                conn.statement($sql).and_then(|statement| {
                    let $s = &statement;
                    conn.in_transaction = true;
                    round_trip!(&mut *conn, |$c| async {
                        let (begun, done) = tokio::join!($c.batch_execute("BEGIN"), $call);
                        begun.and(done)
                    })
                })
            })
        } else {
            conn.statement($sql).and_then(|statement| {
                let $s = &statement;
                round_trip!(&mut *conn, |$c| $call)
            })
        }
    }};
}

impl Conn {
    pub(super) fn new(connector: Arc<Connector>) -> std::io::Result<Conn> {
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
    pub(super) fn connect(&mut self) -> Result<(), StoreError> {
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
    pub(super) fn forget(&mut self) {
        self.client = None;
        self.statements.clear();
        if let Some(driver) = self.driver.take() {
            driver.abort();
            let _ = self.rt.block_on(driver);
        }
    }

    pub(super) fn statement(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let statement = round_trip!(self, |c| c.prepare(sql))?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    pub(super) fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        statement_trip!(self, sql, |c, s| c.query(s, params))
    }

    pub(super) fn execute(
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
    pub(super) fn read(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let outside = self.begin_pending;
        self.afresh(outside, |conn| {
            conn.statement(sql)
                .and_then(|statement| round_trip!(&mut *conn, |c| c.query(&statement, params)))
        })
    }

    /// Runs `attempt`, and once more on a new connection if it found the connection it had dead
    /// and `first` says nothing of the call ran before it: the server restarted since the
    /// connection's last use, and the transaction begun on it (if any) is gone with it.
    pub(super) fn afresh<T>(
        &mut self,
        first: bool,
        mut attempt: impl FnMut(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let was_connected = self.client.is_some();
        match attempt(self) {
            Err(StoreError::Unavailable(_)) if first && was_connected => {
                self.in_transaction = false;
                attempt(self)
            }
            other => other,
        }
    }

    /// Runs statements without parameters (transaction control, migrations).
    pub(super) fn simple(&mut self, sql: &str) -> Result<(), StoreError> {
        round_trip!(self, |c| c.batch_execute(sql))
    }

    /// Begins a transaction with `sql` (a BEGIN, perhaps with more statements).
    pub(super) fn start(&mut self, sql: &str) -> Result<(), StoreError> {
        // A connection that went before this call is replaced first: nothing of it ran yet.
        self.connect()?;
        self.in_transaction = true;
        self.simple(sql)
    }

    /// Commits (`keep`) or undoes the transaction begun on this connection. If the connection
    /// went meanwhile, the server undid it: a commit then fails, an undo is done.
    pub(super) fn finish(&mut self, keep: bool) -> Result<(), StoreError> {
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
    pub(super) fn settle<T>(
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

/// Column `i` of `row`; a type the schema does not have is an error, not a panic.
pub(super) fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    i: usize,
) -> Result<T, StoreError> {
    row.try_get(i)
        .map_err(|e| StoreError::Postgres(Box::new(e)))
}
