use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::v1::guard_server::GuardServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::Config;
use crate::service::{Clock, GuardService};
use crate::store::StoreThread;
use crate::store::{SqliteStore, StoreError};

/// Longest time one RPC may take inside the daemon.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
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
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
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
    open_store(config).map(drop)
}

/// The store at the configured paths, with their private directories made if missing.
fn open_store(config: &Config) -> Result<SqliteStore, ServerError> {
    if let Some(dir) = config.database.parent() {
        ensure_dir(dir, 0o700)?;
    }
    if let Some(dir) = config.key_file.parent() {
        ensure_dir(dir, 0o700)?;
    }
    Ok(SqliteStore::open(&config.database, &config.key_file)?)
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
    let store = open_store(&config)?;
    // SIGHUP re-reads the rules, as `guardctl reload` does.
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(io_err(Path::new("SIGHUP")))?;
    let store = StoreThread::start(store).map_err(io_err(Path::new("the store thread")))?;
    let service = Arc::new(GuardService::new(store, &config, policy, clock));
    let listener = bind(&config.socket).await?;
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
        database = %config.database.display(),
        "guardd listening"
    );
    let (signalled, on_signal) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = signalled.send(());
    };
    let serve = tonic::transport::Server::builder()
        .timeout(REQUEST_TIMEOUT)
        .add_service(GuardServer::from_arc(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown);
    tokio::pin!(serve);
    let served = tokio::select! {
        served = &mut serve => served,
        Ok(()) = on_signal => {
            // New connections stop at once; calls in flight get a moment to finish.
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut serve).await {
                Ok(served) => served,
                Err(_) => {
                    tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
                    Ok(())
                }
            }
        }
    };
    hup.abort();
    let _ = std::fs::remove_file(&config.socket);
    tracing::info!("guardd stopped");
    Ok(served?)
}
