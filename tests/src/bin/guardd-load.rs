//! guardd-load: drives real guardds (the binary beside this one) on scratch sockets with N
//! enrolled users (HOTP tokens, so every success has a fresh counter) from C concurrent clients
//! for T seconds, and reports throughput, latency percentiles and each guardd's peak RSS.
//!
//! ```text
//! cargo build --release -p guardd -p soffid-otp-tests && \
//! cargo run --release -p soffid-otp-tests --bin guardd-load -- --users 1000 --clients 32 --seconds 10
//! ```
//!
//! The store is a scratch SQLite file, a throw-away PostgreSQL cluster (`--postgres`) or an
//! existing, empty PostgreSQL database (`--database URL`). On PostgreSQL, `--guardds N` starts N
//! guardds on the one store, each with its own socket and host name, as a fleet would; client i
//! talks to guardd i % N.
//!
//! `--mode ok` (right codes), `wrong` (a wrong-code storm: the back-off must stay cheap) or
//! `mixed` (one client in ten sends wrong codes for its own users). Before the logins, the same
//! clients run `--baseline-seconds` of the cheapest call that still crosses the socket, gRPC, the
//! caller check, the store and the rules (a Begin for a user without a token, answered with a
//! deny), so the figures come with a baseline from the same run. On PostgreSQL,
//! `--pg-baseline-seconds` first measures the database's own cost of a committed write from the
//! same number of clients. The last line is machine-readable.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use guardd::config::Database;
use guardd::otp::{self, Kind, OtpParams};
use guardd::procfs;
use guardd::store::{
    NewToken, PgPool, PgSettings, Runner, SqliteStore, Store, StoreThread, TokenState,
};
use proto::v1::guard_client::GuardClient;
use proto::v1::{step, AnswerRequest, BeginRequest, LoginContext};

/// Users enrolled per store call (one transaction each): well within a call's time limit on
/// PostgreSQL, even over a network.
const SEED_CHUNK: usize = 250;
/// Seeding calls in flight at once.
const SEED_IN_FLIGHT: usize = 4;
/// The scratch table of the PostgreSQL baseline; dropped after it.
const COMMITS_TABLE: &str = "guardd_load_commits";

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Ok,
    Wrong,
    Mixed,
}

#[derive(Parser)]
#[command(about = "Load test real guardds")]
struct Args {
    /// Enrolled users (one HOTP token each)
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Concurrent clients, each on its own connection
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds of load
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, value_enum, default_value_t = Mode::Ok)]
    mode: Mode,
    /// Seconds of baseline calls before the logins (0: none)
    #[arg(long, default_value_t = 3)]
    baseline_seconds: u64,
    /// The guardd binary [default: the one beside guardd-load]
    #[arg(long)]
    guardd: Option<PathBuf>,
    /// An existing, empty PostgreSQL database instead of a scratch SQLite file: a postgresql://
    /// URL without a password, reachable without TLS (the run leaves its tokens in it)
    #[arg(long, value_name = "URL", conflicts_with = "postgres")]
    database: Option<String>,
    /// Start a throw-away PostgreSQL cluster (Debian's postgresql) for the run
    #[arg(long)]
    postgres: bool,
    /// guardd processes sharing the store (PostgreSQL only above 1), each with its own socket
    /// and host name
    #[arg(long, default_value_t = 1)]
    guardds: usize,
    /// A guardd.toml line for every guardd (repeatable), e.g. "database_connections = 2"
    #[arg(long = "config", value_name = "LINE")]
    config: Vec<String>,
    /// PostgreSQL only: seconds of bare committed writes (BEGIN, a one-row UPDATE, COMMIT) from
    /// as many connections as clients, before the logins
    #[arg(long, value_name = "SECONDS")]
    pg_baseline_seconds: Option<u64>,
}

/// Where the tokens are kept for the run.
enum Backend {
    Sqlite(PathBuf),
    /// A PostgreSQL database by URL.
    Postgres {
        url: String,
        /// The throw-away cluster holding it, if any: stopped when dropped.
        _cluster: Option<pgtemp::Cluster>,
    },
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres { .. } => "postgres",
        }
    }

    /// What guardd takes as `--database`.
    fn arg(&self) -> &std::ffi::OsStr {
        match self {
            Backend::Sqlite(path) => path.as_os_str(),
            Backend::Postgres { url, .. } => url.as_ref(),
        }
    }

    /// A runner on this store for the seeding, as guardd itself would open it.
    fn open(&self, key: &Path) -> anyhow::Result<Runner> {
        Ok(match self {
            Backend::Sqlite(path) => {
                Runner::Sqlite(StoreThread::start(SqliteStore::open(path, key)?, 0)?)
            }
            Backend::Postgres { url, .. } => {
                let settings = PgSettings {
                    url: url.clone(),
                    password_file: None,
                    ca_file: None,
                    host: "load-seed".into(),
                };
                Runner::Postgres(PgPool::open(&settings, key, SEED_IN_FLIGHT)?)
            }
        })
    }
}

/// The guardds under test; stopped (SIGTERM, then waited for) when dropped, also on an error.
struct Guardds(Vec<Child>);

impl Guardds {
    fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Child::id).collect()
    }

    /// Their CPU time so far, together, in microseconds.
    fn cpu_us(&self) -> u64 {
        self.pids().into_iter().map(procfs::cpu_us).sum()
    }
}

impl Drop for Guardds {
    fn drop(&mut self) {
        for child in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::SIGTERM,
            );
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.clients == 0 || args.users < args.clients {
        bail!("need at least one client and at least as many users as clients");
    }
    if args.guardds == 0 || args.guardds > args.clients {
        bail!("need at least one guardd and at least as many clients as guardds");
    }
    let guardd = match args.guardd.clone() {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("no parent directory")?
            .join("guardd"),
    };
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("guardd.key");
    let backend = match (&args.database, args.postgres) {
        (Some(url), _) => match Database::parse(url) {
            Database::Postgres(url) => Backend::Postgres {
                url,
                _cluster: None,
            },
            Database::Sqlite(_) => bail!("--database takes a postgresql:// URL"),
        },
        (None, true) => {
            let cluster = pgtemp::Cluster::start();
            Backend::Postgres {
                url: cluster.database(),
                _cluster: Some(cluster),
            }
        }
        (None, false) => Backend::Sqlite(dir.path().join("guardd.db")),
    };
    if let Backend::Sqlite(_) = backend {
        if args.pg_baseline_seconds.is_some() {
            bail!("--pg-baseline-seconds needs --postgres or --database");
        }
        // Two processes writing one SQLite file turn most calls into "busy" errors: a fleet
        // shares PostgreSQL.
        if args.guardds > 1 {
            bail!("--guardds above 1 needs --postgres or --database (a SQLite file serves one guardd)");
        }
    }
    std::fs::write(
        dir.path().join("rules.toml"),
        "version = 1\ndefault = \"deny\"\n[[rule]]\nid = \"all\"\neffect = \"otp\"\n",
    )?;

    let runtime = tokio::runtime::Runtime::new()?;
    let t = Instant::now();
    let secrets: Vec<Vec<u8>> = (0..args.users)
        .map(|_| otp::new_secret().map(|s| s.to_vec()))
        .collect::<Result<_, _>>()?;
    let names: Vec<String> = (0..args.users).map(|i| format!("load{i}")).collect();
    let seeding = Arc::new(backend.open(&key).context(
        "cannot open the store (a --database must be empty: each run seals with a new key file)",
    )?);
    runtime.block_on(seed(seeding.clone(), &names, &secrets))?;
    drop(seeding);
    eprintln!(
        "enrolled {} users ({}) in {:?}",
        args.users,
        backend.name(),
        t.elapsed()
    );

    let pg_baseline = match (&backend, args.pg_baseline_seconds) {
        (Backend::Postgres { url, .. }, Some(s)) if s > 0 => {
            Some(runtime.block_on(pg_commits(url, args.clients, s))?)
        }
        _ => None,
    };

    let started = Instant::now();
    let mut guardds = Guardds(Vec::with_capacity(args.guardds));
    let mut sockets = Vec::with_capacity(args.guardds);
    for i in 0..args.guardds {
        let config = dir.path().join(format!("guardd-{i}.toml"));
        let extra: String = args.config.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(
            &config,
            format!("max_tries = 1\nhost = \"load-{i}\"\n{extra}"),
        )?;
        let socket = dir.path().join(format!("guardd-{i}.sock"));
        let child = Command::new(&guardd)
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .arg("--database")
            .arg(backend.arg())
            .arg("--key-file")
            .arg(&key)
            .arg("--policy")
            .arg(dir.path().join("rules.toml"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (build it: cargo build --release -p guardd)",
                    guardd.display()
                )
            })?;
        guardds.0.push(child);
        sockets.push(socket);
    }
    for (i, socket) in sockets.iter().enumerate() {
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Some(status) = guardds.0[i].try_wait()? {
                bail!("guardd load-{i} exited: {status}");
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("guardd load-{i} did not start");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let startup = started.elapsed();

    let baseline = match args.baseline_seconds {
        0 => None,
        s => {
            let cpu = guardds.cpu_us();
            let (l, e, _) =
                runtime.block_on(drive(&args, &sockets, Work::Baseline, s, &secrets, &names))?;
            Some((l, e, guardds.cpu_us() - cpu))
        }
    };
    let cpu = guardds.cpu_us();
    let (latencies, errors, wrong_sent) = runtime.block_on(drive(
        &args,
        &sockets,
        Work::Logins(args.mode),
        args.seconds,
        &secrets,
        &names,
    ))?;
    let cpu = guardds.cpu_us() - cpu;
    let rss: Vec<u64> = guardds
        .pids()
        .into_iter()
        .map(procfs::peak_rss_kib)
        .collect();
    drop(guardds);

    let l = Latencies::of(latencies);
    let per_s = l.0.len() as f64 / args.seconds as f64;
    // guardd's own CPU time per call: what the server costs, whatever the clients beside it take.
    let cpu_per = |cpu: u64, calls: usize| cpu as f64 / calls.max(1) as f64;
    println!(
        "{} logins in {} s from {} clients over {} users on {} guardd(s), {} store (mode {}): {:.0}/s ({} with wrong codes)",
        l.0.len(),
        args.seconds,
        args.clients,
        args.users,
        args.guardds,
        backend.name(),
        match args.mode {
            Mode::Ok => "ok",
            Mode::Wrong => "wrong",
            Mode::Mixed => "mixed",
        },
        per_s,
        wrong_sent
    );
    let rss_each = rss
        .iter()
        .enumerate()
        .map(|(i, kib)| format!("load-{i} {kib} KiB"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "latency p50 {} µs, p90 {} µs, p99 {} µs, max {} µs; guardd CPU {:.0} µs per login; guardd start-up {} ms; peak RSS {rss_each}",
        l.us(0.5),
        l.us(0.9),
        l.us(0.99),
        l.us(1.0),
        cpu_per(cpu, l.0.len()),
        startup.as_millis(),
    );
    let mut extra = String::new();
    if let Some((b, b_errors, b_cpu)) = baseline {
        let b = Latencies::of(b);
        let b_per_s = b.0.len() as f64 / args.baseline_seconds as f64;
        println!(
            "baseline (Begin denied by the rules, same clients): {b_per_s:.0}/s, p50 {} µs, p99 {} µs, guardd CPU {:.0} µs per call ({b_errors} errors); logins/s {:.2}x of it, p50 {:.2}x",
            b.us(0.5),
            b.us(0.99),
            cpu_per(b_cpu, b.0.len()),
            per_s / b_per_s.max(1.0),
            l.us(0.5) as f64 / b.us(0.5).max(1) as f64,
        );
        extra += &format!(
            " baseline_per_s={b_per_s:.0} baseline_p50_us={} baseline_p99_us={}",
            b.us(0.5),
            b.us(0.99)
        );
    }
    if let (Some((c, c_errors)), Some(seconds)) = (pg_baseline, args.pg_baseline_seconds) {
        let c = Latencies::of(c);
        let c_per_s = c.0.len() as f64 / seconds as f64;
        println!(
            "PostgreSQL baseline (BEGIN, one-row UPDATE, COMMIT; {} connections of its own): {c_per_s:.0} commits/s, p50 {} µs, p99 {} µs ({c_errors} errors); logins/s {:.2}x of it, p50 {:.2}x",
            args.clients,
            c.us(0.5),
            c.us(0.99),
            per_s / c_per_s.max(1.0),
            l.us(0.5) as f64 / c.us(0.5).max(1) as f64,
        );
        extra += &format!(
            " pg_commits_per_s={c_per_s:.0} pg_commit_p50_us={} pg_commit_p99_us={}",
            c.us(0.5),
            c.us(0.99)
        );
    }
    let rss_list = rss.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    println!(
        "verifications_per_s={per_s:.0} p50_us={} p99_us={} max_us={} guardd_peak_rss_kib={} guardd_peak_rss_kib_each={rss_list} guardd_cpu_us_per_login={:.0} startup_ms={}{extra} errors={errors} guardds={} store={}",
        l.us(0.5),
        l.us(0.99),
        l.us(1.0),
        rss.iter().max().unwrap_or(&0),
        cpu_per(cpu, l.0.len()),
        startup.as_millis(),
        args.guardds,
        backend.name(),
    );
    Ok(())
}

/// Enrols one HOTP token per user through the store, the way enrolment and a first code do
/// (added pending, then counter 0 accepted, which activates it), on either backend: each call
/// enrols a chunk of users in one transaction.
async fn seed(runner: Arc<Runner>, names: &[String], secrets: &[Vec<u8>]) -> anyhow::Result<()> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let users: Vec<(String, Vec<u8>)> = names.iter().cloned().zip(secrets.to_vec()).collect();
    let mut calls = tokio::task::JoinSet::new();
    for chunk in users.chunks(SEED_CHUNK) {
        if calls.len() >= SEED_IN_FLIGHT {
            if let Some(done) = calls.join_next().await {
                done??;
            }
        }
        let (chunk, runner) = (chunk.to_vec(), runner.clone());
        calls.spawn(async move {
            runner
                .run(move |store: &dyn Store| -> anyhow::Result<()> {
                    for (user, secret) in &chunk {
                        let token = NewToken {
                            uid: None,
                            user,
                            label: "load",
                            kind: Kind::Hotp,
                            params: OtpParams::default(),
                            secret,
                        };
                        let id = store.add_pending(token, now)?.id;
                        if !store.accept(&id, TokenState::Pending, 0, 0, now)? {
                            bail!("the new token of {user} was not activated");
                        }
                    }
                    Ok(())
                })
                .await
        });
    }
    while let Some(done) = calls.join_next().await {
        done??;
    }
    Ok(())
}

/// PostgreSQL's own cost of a committed write, without guardd: `clients` connections of its own,
/// each updating its own row of a scratch table in a transaction of its own (BEGIN, one UPDATE,
/// COMMIT: the shape of a store call) for `seconds`. Every commit's latency, and the errors.
async fn pg_commits(
    url: &str,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<(Vec<Duration>, u64)> {
    let setup = pg_connect(url).await?;
    setup
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {COMMITS_TABLE} (client INTEGER PRIMARY KEY, n BIGINT NOT NULL);
             INSERT INTO {COMMITS_TABLE} SELECT generate_series(0, {}), 0 ON CONFLICT DO NOTHING",
            clients - 1
        ))
        .await?;
    let mut connections = Vec::with_capacity(clients);
    for c in 0..clients {
        let client = pg_connect(url).await?;
        let update = client
            .prepare(&format!(
                "UPDATE {COMMITS_TABLE} SET n = n + 1 WHERE client = $1"
            ))
            .await?;
        connections.push((i32::try_from(c)?, client, update));
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::with_capacity(clients);
    for (c, mut client, update) in connections {
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                let committed = async {
                    let tx = client.transaction().await?;
                    tx.execute(&update, &[&c]).await?;
                    tx.commit().await
                }
                .await;
                lat.push(t.elapsed());
                if committed.is_err() {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    setup
        .batch_execute(&format!("DROP TABLE {COMMITS_TABLE}"))
        .await?;
    Ok((all, errors))
}

/// A connection of its own to `url` (no TLS, as for a database on this machine or a test LAN).
async fn pg_connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to the PostgreSQL database")?;
    tokio::spawn(connection);
    Ok(client)
}

/// Sorted latencies, for percentiles.
struct Latencies(Vec<Duration>);

impl Latencies {
    fn of(mut v: Vec<Duration>) -> Self {
        v.sort_unstable();
        Latencies(v)
    }

    /// The `p` quantile in microseconds (`1.0`: the maximum); 0 without samples.
    fn us(&self, p: f64) -> u128 {
        let i = ((self.0.len() as f64 * p) as usize).min(self.0.len().saturating_sub(1));
        self.0.get(i).map_or(0, |d| d.as_micros())
    }
}

/// What the clients do.
#[derive(Clone, Copy)]
enum Work {
    /// A Begin for a user without a token: denied by the rules, nothing to verify or commit.
    Baseline,
    Logins(Mode),
}

/// Runs the clients for `seconds`, client c on guardd c % N; returns every call's latency, the
/// number of errors, and of wrong sends.
async fn drive(
    args: &Args,
    sockets: &[PathBuf],
    work: Work,
    seconds: u64,
    secrets: &[Vec<u8>],
    names: &[String],
) -> anyhow::Result<(Vec<Duration>, u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (secrets, names) = (Arc::new(secrets.to_vec()), Arc::new(names.to_vec()));
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let socket = &sockets[c % sockets.len()];
        let mut client = GuardClient::new(proto::connect(socket, Duration::from_secs(10)).await?);
        let (secrets, names) = (secrets.clone(), names.clone());
        let (users, clients) = (args.users, args.clients);
        let wrong = match work {
            Work::Baseline | Work::Logins(Mode::Ok) => false,
            Work::Logins(Mode::Wrong) => true,
            Work::Logins(Mode::Mixed) => c % 10 == 0,
        };
        tasks.push(tokio::spawn(async move {
            // This client's users: c, c + C, c + 2C, ...; their next HOTP counters.
            let mine: Vec<usize> = (c..users).step_by(clients).collect();
            let mut next = vec![1u64; mine.len()];
            let (mut lat, mut errors, mut sent_wrong) = (Vec::new(), 0u64, 0u64);
            let mut k = 0;
            while Instant::now() < deadline {
                let slot = k % mine.len();
                let user = mine[slot];
                k += 1;
                if let Work::Baseline = work {
                    let t = Instant::now();
                    let denied = begin(&mut client, &format!("absent{user}")).await;
                    lat.push(t.elapsed());
                    if !matches!(denied, Ok(None)) {
                        errors += 1;
                    }
                    continue;
                }
                let code = if wrong {
                    sent_wrong += 1;
                    "000000".to_owned()
                } else {
                    match otp::code_for(
                        &secrets[user],
                        Kind::Hotp,
                        OtpParams::default(),
                        next[slot],
                    ) {
                        Ok(code) => code,
                        Err(_) => {
                            errors += 1;
                            continue;
                        }
                    }
                };
                let t = Instant::now();
                let permitted = login(&mut client, &names[user], &code).await;
                lat.push(t.elapsed());
                match (permitted, wrong) {
                    (Ok(true), false) => next[slot] += 1,
                    (Ok(false), true) => {}
                    _ => errors += 1,
                }
            }
            (lat, errors, sent_wrong)
        }));
    }
    let (mut all, mut errors, mut wrong) = (Vec::new(), 0, 0);
    for t in tasks {
        let (l, e, w) = t.await?;
        all.extend(l);
        errors += e;
        wrong += w;
    }
    Ok((all, errors, wrong))
}

/// Begins a login; the challenge if guardd prompts, `None` if it decides at once.
async fn begin(
    client: &mut GuardClient<tonic::transport::Channel>,
    user: &str,
) -> Result<Option<String>, tonic::Status> {
    let step = client
        .begin(BeginRequest {
            context: Some(LoginContext {
                user: user.into(),
                service: "load".into(),
                ..LoginContext::default()
            }),
        })
        .await?
        .into_inner();
    Ok(match step.kind {
        Some(step::Kind::Prompt(p)) => Some(p.challenge),
        _ => None,
    })
}

async fn login(
    client: &mut GuardClient<tonic::transport::Channel>,
    user: &str,
    code: &str,
) -> Result<bool, tonic::Status> {
    let Some(challenge) = begin(client, user).await? else {
        return Ok(false);
    };
    let done = client
        .answer(AnswerRequest {
            challenge,
            response: code.as_bytes().to_vec(),
        })
        .await?
        .into_inner();
    Ok(matches!(done.kind, Some(step::Kind::Permit(_))))
}
