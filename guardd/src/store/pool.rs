//! A small pool of connections to the shared PostgreSQL store. Each worker thread owns one
//! connection and runs one call at a time as one transaction; the calls of many guardds
//! interleave on the server, which the store's conditional statements and per-user locks make
//! safe. While the database is unreachable, calls fail at once with "unavailable" and the
//! workers reconnect by themselves.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::call::{run_guarded, Call, Failure, Queue};
use super::postgres::Connector;
use super::{load_key, PgSettings, PgStore, StoreError};
use crate::seal::Sealer;

/// A caller waits at most this for its call, queueing included: under the PAM module's default
/// 5 s timeout, so a login hears "unavailable" from guardd rather than timing out.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// After a failed connection, calls fail at once for this long before the next try.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// Calls waiting at most; more are refused at once with "overloaded".
const MAX_QUEUE: usize = 1024;

/// The handle the service keeps; see [`Runner`](super::Runner).
pub struct PgPool {
    queue: Queue,
    describe: String,
}

/// What the workers share.
struct Shared {
    calls: Mutex<mpsc::Receiver<Box<dyn Call>>>,
    /// Until when calls fail at once, and why.
    down: Mutex<Option<(Instant, String)>>,
    /// Whether the schema and the key were checked against the database (at start, or on the
    /// first connection if the database was unreachable then).
    prepared: AtomicBool,
    sealer: Arc<Sealer>,
}

impl PgPool {
    /// Checks the settings, migrates the database and checks the key file against it (creating
    /// the key only for a database without sealed secrets), then starts `connections` workers.
    /// An unreachable database does not stop guardd from starting when the key file exists:
    /// rules that need no stored fact keep working, and the check runs once it is reachable.
    pub fn open(
        settings: &PgSettings,
        key_file: &Path,
        connections: usize,
    ) -> Result<PgPool, StoreError> {
        let connector = Arc::new(Connector::new(settings)?);
        let describe = connector.describe().to_owned();
        let (sealer, prepared) = match super::postgres::prepare(connector.clone(), key_file) {
            Ok(sealer) => (sealer, true),
            Err(StoreError::Unavailable(reason)) => {
                let sealer = load_key(key_file, true, &describe).map_err(|e| match e {
                    StoreError::KeyMissing { .. } => StoreError::Settings(format!(
                        "the database is unreachable ({reason}) and the key file {} is missing: copy the fleet's key file to this host, or start guardd when the database is reachable",
                        key_file.display()
                    )),
                    e => e,
                })?;
                tracing::error!(
                    database = describe,
                    "the token database is unreachable ({reason}); guardd starts and retries"
                );
                (sealer, false)
            }
            Err(e) => return Err(e),
        };
        let (mut queue, calls) = Queue::new(MAX_QUEUE);
        let shared = Arc::new(Shared {
            calls: Mutex::new(calls),
            down: Mutex::new(None),
            prepared: AtomicBool::new(prepared),
            sealer: Arc::new(sealer),
        });
        for n in 0..connections.max(1) {
            let store =
                PgStore::new(connector.clone(), shared.sealer.clone()).map_err(io_unavailable)?;
            let shared = shared.clone();
            queue
                .serve_with(format!("guardd-pg-{n}"), move || work(&shared, &store))
                .map_err(io_unavailable)?;
        }
        Ok(PgPool { queue, describe })
    }

    pub(super) fn submit(&self, call: Box<dyn Call>) -> Result<(), StoreError> {
        self.queue.submit(call)
    }

    pub(super) fn describe(&self) -> String {
        self.describe.clone()
    }
}

fn io_unavailable(e: std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("cannot start a database worker: {e}"))
}

fn work(shared: &Shared, store: &PgStore) {
    loop {
        let next = shared
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recv();
        let Ok(mut call) = next else {
            return;
        };
        if call.abandoned() {
            continue;
        }
        // While the database is known to be away, fail at once; past the pause, try again.
        let refused = match &*shared.down.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((until, reason)) if Instant::now() < *until => {
                Some(StoreError::Unavailable(reason.clone()))
            }
            _ => None,
        };
        if let Some(e) = refused {
            call.reply(Some(&Failure::of(e)));
            continue;
        }
        let failed = serve(shared, store, call.as_mut()).err().map(|e| {
            if let StoreError::Unavailable(reason) = &e {
                let mut down = shared.down.lock().unwrap_or_else(|p| p.into_inner());
                if down.is_none() {
                    tracing::error!("the token database is unreachable: {reason}");
                }
                *down = Some((Instant::now() + RETRY_AFTER, reason.clone()));
            } else {
                tracing::error!("store call not committed: {e}");
            }
            Failure::of(e)
        });
        if failed.is_none() {
            let mut down = shared.down.lock().unwrap_or_else(|p| p.into_inner());
            if down.take().is_some() {
                tracing::info!("the token database is reachable again");
            }
        }
        call.reply(failed.as_ref());
    }
}

/// Runs `call` in a transaction of its own and commits it if it succeeded.
fn serve(shared: &Shared, store: &PgStore, call: &mut dyn Call) -> Result<(), StoreError> {
    if !shared.prepared.load(Ordering::Acquire) {
        store.check()?;
        shared.prepared.store(true, Ordering::Release);
        tracing::info!("the token database's schema and key check are in order");
    }
    store.begin()?;
    let ok = run_guarded(call, store);
    store.end(ok)
}
