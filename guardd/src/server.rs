use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};

use crate::audit;
use crate::budget::{Budget, Holding, Limits};
use crate::caller::Caller;
use crate::config::Config;
use crate::config::Database;
use crate::service::{Clock, GuardService};
use crate::store::{PgPool, Runner, SqliteStore, StoreError, StoreThread};

mod calls;
mod opening;
use opening::Opening;

/// Open connections per unprivileged uid at most.
const CONNECTIONS_PER_UID: usize = 16;
/// After accept(2) fails for lack of descriptors or memory, wait this long before the next try,
/// instead of spinning on a listen queue that cannot be served.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// After a shutdown signal, how long open connections may finish before guardd exits anyway
/// (a wedged client must not keep the daemon alive).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Why guardd could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another guardd is already listening on {0}; stop it first")]
    AlreadyRunning(PathBuf),
    #[error("{path} exists and is not a socket; remove it or choose another `socket`")]
    NotASocket { path: PathBuf },
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no valid rules: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("cannot watch SIGHUP (rules reload): {0}")]
    Signal(std::io::Error),
    #[error("the gRPC server stopped unexpectedly: {0}")]
    Panicked(#[from] tokio::task::JoinError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        path: path.into(),
        source,
    }
}

/// Creates `dir` (and parents) with `mode`, whatever the umask, if it does not exist yet; an
/// existing one is kept as the administrator made it.
fn ensure_dir(dir: &Path, mode: u32) -> Result<(), ServerError> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)))
        .map_err(io_err(dir))
}

/// Binds the socket: world-connectable (0666), because access is decided per call by the peer's
/// credentials, so screen lockers running as the user can reach it. A stale socket left by a
/// crash is replaced; a live one means another daemon runs, and is left alone.
async fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if let Some(dir) = path.parent() {
        ensure_dir(dir, 0o755)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(ServerError::AlreadyRunning(path.into()));
            }
            std::fs::remove_file(path).map_err(io_err(path))?;
        }
        Ok(_) => return Err(ServerError::NotASocket { path: path.into() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(io_err(path))?;
    Ok(listener)
}

/// Creates the state directories, the key file and the database (migrated) if missing, never
/// overwriting: what the package's postinst runs.
pub fn init(config: &Config) -> Result<(), ServerError> {
    open_store(config, 0).map(drop)
}

/// The store the configuration names: the SQLite file (its private directory made if missing)
/// on its own thread, or a pool of connections to the shared PostgreSQL. `workers`: the threads of
/// the runtime that serves the calls (see [`StoreThread::start`]).
fn open_store(config: &Config, workers: usize) -> Result<Runner, ServerError> {
    if let Some(dir) = config.key_file.parent() {
        ensure_dir(dir, 0o700)?;
    }
    match &config.database {
        Database::Sqlite(path) => {
            if let Some(dir) = path.parent() {
                ensure_dir(dir, 0o700)?;
            }
            let store = SqliteStore::open(path, &config.key_file)?;
            // The daemon's commits overwrite the log in place (docs/architecture.md#durability).
            store.lay_out_wal();
            let thread = StoreThread::start(store, workers)
                .map_err(io_err(Path::new("the store thread")))?;
            Ok(Runner::Sqlite(thread))
        }
        Database::Postgres(_) => {
            let settings = config.pg_settings().ok_or(StoreError::Stopped)?;
            let pool = PgPool::open(
                &settings,
                &config.key_file,
                usize::from(config.database_connections),
            )?;
            Ok(Runner::Postgres(pool))
        }
    }
}

/// The runtime guardd serves on (the daemon and the benchmarks that run it in-process): tokio's
/// worker threads for the protocol work, beside the store's own thread and a blocking pool for
/// NSS look-ups and password checks.
///
/// One worker thread instead (`new_current_thread`) was measured against this in the same
/// session: a fresh connection and a Begin in a loop took 13% less, but whole PAM logins were no
/// faster (within the noise of 300 interleaved runs) and `guardd-load` was slower (32 clients:
/// 5,232 against 5,613 logins/s, medians of two interleaved runs each; cheap Begins 19,000
/// against 23,500/s), so the workers stay.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Opens the store, serves the `Guard` service on the configured socket until `shutdown`
/// resolves, then removes the socket.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    run_with_clock(config, Clock::system(), shutdown).await
}

/// `run` with the time read from `clock` (benchmarks); the guardd binary always uses `run`.
pub async fn run_with_clock(
    config: Config,
    clock: Clock,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    audit::set_host(&config.host());
    // Everything that can refuse to start comes before the socket exists.
    let policy = config.load_policy()?;
    for w in policy.warnings() {
        tracing::warn!("{w}");
    }
    tracing::info!(
        policy = policy.digest(),
        file = policy.file(),
        "rules loaded"
    );
    crate::metrics::policy_loaded(true, Ok(()));
    // Opening may block on the database (connect, migrate); off the async workers.
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let store = std::thread::scope(|s| {
        s.spawn(|| open_store(&config, workers))
            .join()
            .unwrap_or_else(|_| Err(StoreError::Stopped.into()))
    })?;
    // SIGHUP re-reads the rules, as `guardctl reload` does.
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(ServerError::Signal)?;
    let hasher = crate::backup::Hasher::start().map_err(io_err(Path::new("the hasher thread")))?;
    let store_name = store.describe();
    let service = Arc::new(GuardService::new(store, hasher, &config, policy, clock));
    if let Some(dir) = config.metrics_file.as_deref().and_then(Path::parent) {
        // Readable by node_exporter's user, as the file itself (docs/operating.md#metrics).
        ensure_dir(dir, 0o755)?;
    }
    let listener = bind(&config.socket).await?;
    crate::metrics::started();
    let metrics = match &config.metrics_file {
        Some(path) => Some(tokio::spawn(write_metrics(
            service.clone(),
            path.clone(),
            Duration::from_secs(config.metrics_interval),
        ))),
        None => None,
    };
    // systemd (Type=notify): the socket accepts connections from now on.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let reloader = service.clone();
    let hup = tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let _ = reloader.reload();
        }
    });
    tracing::info!(
        socket = %config.socket.display(),
        database = %store_name,
        "guardd listening"
    );
    // Stops the server's accepting when `shutdown` resolves (below).
    let (stop, stopped) = oneshot::channel::<()>();
    let incoming = Incoming {
        listener,
        budget: Budget::new("connections", connection_limits()),
        pause: None,
    };
    let flusher = tokio::spawn(async {
        let mut tick = tokio::time::interval(audit::REFUSAL_INTERVAL);
        loop {
            tick.tick().await;
            audit::flush_refusals();
        }
    });
    // A task of its own, on the worker threads: polled here instead, on the thread that runs
    // this future (the daemon's main thread, outside the workers), every accepted connection
    // would cross to that thread and back before its first call.
    let mut serve = tokio::spawn(accept(incoming, service, stopped));
    let joined = |served: Result<(), tokio::task::JoinError>| served.map_err(ServerError::from);
    tokio::pin!(shutdown);
    let served = tokio::select! {
        served = &mut serve => joined(served),
        () = &mut shutdown => {
            // New connections stop at once; calls in flight get a moment to finish.
            let _ = stop.send(());
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut serve).await {
                Ok(served) => joined(served),
                Err(_) => {
                    tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
                    serve.abort();
                    Ok(())
                }
            }
        }
    };
    hup.abort();
    flusher.abort();
    if let (Some(writer), Some(path)) = (metrics, &config.metrics_file) {
        // A stopped guardd leaves no figures that look current (docs/operating.md#metrics).
        writer.abort();
        let _ = std::fs::remove_file(path);
    }
    audit::flush_refusals();
    let _ = std::fs::remove_file(&config.socket);
    tracing::info!("guardd stopped");
    served
}

/// Serves each admitted connection on a task of its own until `stopped`; then accepts no more,
/// tells the open ones to finish (GOAWAY: calls in flight complete) and waits for them.
async fn accept(
    mut incoming: Incoming,
    service: Arc<GuardService>,
    mut stopped: oneshot::Receiver<()>,
) {
    let (closing, closed) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            admitted = incoming.next() => {
                let Admitted { stream, caller, holding } = admitted;
                let (service, closed) = (service.clone(), closed.clone());
                // The connection's place in the budget is held until its task ends, after the
                // call being served even if the connection closed first.
                connections.spawn(async move {
                    let _holding = holding;
                    calls::serve(stream, caller, service, closed).await;
                });
            }
            // Ended connections are reaped as they go, so the set holds only open ones.
            Some(ended) = connections.join_next() => reaped(ended),
            _ = &mut stopped => break,
        }
    }
    drop(incoming);
    let _ = closing.send(true);
    while let Some(ended) = connections.join_next().await {
        reaped(ended);
    }
}

/// A connection's task has ended; one that panicked (a bug: its calls are lost, the rest of
/// guardd serves on) is logged.
fn reaped(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended {
        if e.is_panic() {
            tracing::error!("a connection's task panicked; its calls were lost: {e}");
        }
    }
}

/// Rewrites the metrics file every `interval` until aborted; a write that fails is logged (at
/// most once per interval of the audit's rate limit) and tried again at the next tick.
async fn write_metrics(service: Arc<GuardService>, path: PathBuf, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let text = service.metrics().await;
        let file = path.clone();
        let written = tokio::task::spawn_blocking(move || crate::metrics::write_file(&file, &text))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = written {
            audit::warn_limited(
                "metrics-file",
                &format!("cannot write the metrics file {}: {e}", path.display()),
            );
        }
    }
}

/// The connection budget: per unprivileged uid, and overall within the descriptors guardd may
/// open (raised to the hard limit first), keeping half of them for root.
fn connection_limits() -> Limits {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let mut open_files = 1024;
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        open_files = soft;
        if hard > soft && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            open_files = hard;
        }
    }
    // Room for the store, the logs, NSS and the child processes' pipes; then two descriptors
    // per connection: its socket and, for a caller with root's rights, its process's pidfd
    // (`caller::Process::Pinned`).
    let total = ((open_files.saturating_sub(64) / 2) as usize).clamp(16, 4096);
    Limits {
        per_key: CONNECTIONS_PER_UID,
        shared: total / 2,
        total,
    }
}

/// The server's incoming connections, accepted as the server asks for the next one (no task of
/// their own: a hand-off less per connection). Each is admitted only within the caller's
/// connection budget (a refusal closes it at once and is audited, rate-limited), and carries its
/// caller for every request on it. When descriptors or memory run out, accepting pauses briefly
/// instead of spinning.
struct Incoming {
    listener: UnixListener,
    budget: Arc<Budget>,
    /// Until when accepting pauses; kept here, so a `next` dropped by the server's `select!`
    /// during the pause does not cut it short.
    pause: Option<tokio::time::Instant>,
}

impl Incoming {
    /// The next connection admitted. Cancel-safe: its only waits are `accept` and the pause.
    async fn next(&mut self) -> Admitted {
        loop {
            if let Some(until) = self.pause {
                tokio::time::sleep_until(until).await;
                self.pause = None;
            }
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if matches!(
                        e.raw_os_error(),
                        Some(
                            libc_errno::EMFILE
                                | libc_errno::ENFILE
                                | libc_errno::ENOBUFS
                                | libc_errno::ENOMEM
                        )
                    ) {
                        audit::warn_limited(
                            "accept",
                            &format!("cannot accept connections: {e}; pausing"),
                        );
                        self.pause = Some(tokio::time::Instant::now() + ACCEPT_BACKOFF);
                    }
                    continue;
                }
            };
            let Ok(cred) = stream.peer_cred() else {
                continue;
            };
            let caller = Caller::accepted(cred.uid(), cred.gid(), cred.pid(), || {
                crate::pidfd::of_peer(&stream)
            });
            // The process that connected has exited; whoever still holds its socket (a child
            // it passed it to) is not the caller the kernel named, so it gets nothing.
            if caller.is_gone() {
                continue;
            }
            let holding = match self
                .budget
                .acquire(caller.budget_keys(None), caller.is_root())
            {
                Ok(holding) => holding,
                Err(e) => {
                    audit::refused(&caller, "connect", "*", &e.to_string());
                    continue;
                }
            };
            return Admitted {
                stream: Opening::new(stream),
                caller,
                holding,
            };
        }
    }
}

/// The errno values the accept loop backs off on.
mod libc_errno {
    pub const EMFILE: i32 = nix::errno::Errno::EMFILE as i32;
    pub const ENFILE: i32 = nix::errno::Errno::ENFILE as i32;
    pub const ENOBUFS: i32 = nix::errno::Errno::ENOBUFS as i32;
    pub const ENOMEM: i32 = nix::errno::Errno::ENOMEM as i32;
}

/// An admitted connection: the stream, who is on the other end, and its place in the budget,
/// given back when the connection's task ends.
struct Admitted {
    stream: Opening<UnixStream>,
    caller: Caller,
    holding: Holding,
}
