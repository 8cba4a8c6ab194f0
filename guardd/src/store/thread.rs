//! The store's own thread. Every call to the store runs on it, one after another, so a check and
//! the write it leads to (a lockout and the failure it counts, a code and its replay guard) are
//! never interleaved with another login's. The calls that queue up while one batch runs form the
//! next batch: one transaction and one commit (one fsync) for all of them, each call undone alone
//! if it fails, and no caller hears back before its writes are on disk
//! (docs/architecture.md#durability).
//!
//! Against a pool of blocking threads sharing one connection this saves the hand-offs: a login
//! storm wakes one thread per batch instead of one per call, and nobody queues on a mutex.

use std::sync::mpsc;

use super::call::{run_guarded, Call, Failure, Queue};
use super::{Store, StoreError};

/// Calls per batch at most: bounds what one commit adds to the first caller's wait.
const MAX_BATCH: usize = 256;
/// Calls waiting at most. A flood of calls (any local user may connect) is refused at once with
/// "overloaded" instead of growing guardd's memory and every caller's wait without bound; a
/// storm of real logins keeps a few dozen waiting.
const MAX_QUEUE: usize = 4096;

/// A store whose calls can be grouped into one transaction: what the store thread needs of the
/// embedded store beyond the domain steps.
pub trait Batched: Store {
    /// Opens the transaction that holds the calls of one batch, so their writes reach the disk
    /// together. Until `end_batch`, only the calling thread may use the store.
    fn begin_batch(&self) -> Result<(), StoreError>;
    /// Commits the batch (`keep`) or undoes all of it.
    fn end_batch(&self, keep: bool) -> Result<(), StoreError>;
    /// Marks where one call inside a batch starts, so that its writes can be undone alone.
    fn begin_call(&self) -> Result<(), StoreError>;
    /// Keeps (`keep`) or undoes the writes made since `begin_call`.
    fn end_call(&self, keep: bool) -> Result<(), StoreError>;
    /// What the store is, for logs.
    fn describe(&self) -> String;
}

/// The handle of the store's thread: queue calls with [`Runner::run`](super::Runner::run).
pub struct StoreThread {
    queue: Queue,
    describe: String,
}

impl StoreThread {
    /// Moves `store` onto a new thread that serves calls until the handle is dropped.
    pub fn start(store: impl Batched + 'static) -> std::io::Result<StoreThread> {
        Self::with_queue(store, MAX_QUEUE)
    }

    fn with_queue(store: impl Batched + 'static, max_queue: usize) -> std::io::Result<StoreThread> {
        let (mut queue, calls) = Queue::new(max_queue);
        let describe = store.describe();
        queue.serve_with("guardd-store".into(), move || serve(&store, &calls))?;
        Ok(StoreThread { queue, describe })
    }

    /// Queues `call` for the next batch; with the queue full it does not run and the error is
    /// [`StoreError::Overloaded`]. Its result arrives once the batch is committed; if it fails
    /// (or panics) its writes are undone and the rest of the batch stands; if the commit fails,
    /// every call in the batch gets that error.
    pub(super) fn submit(&self, call: Box<dyn Call>) -> Result<(), StoreError> {
        self.queue.submit(call)
    }

    pub(super) fn describe(&self) -> String {
        self.describe.clone()
    }
}

fn serve(store: &dyn Batched, queue: &mpsc::Receiver<Box<dyn Call>>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        batch.extend(queue.try_iter().take(MAX_BATCH - 1));
        // Calls nobody waits for any more are dropped unrun.
        batch.retain(|call| !call.abandoned());
        if batch.is_empty() {
            continue;
        }
        let failed = run_batch(store, &mut batch).err().map(|e| {
            tracing::error!(calls = batch.len(), "store batch not committed: {e}");
            Failure::of(e)
        });
        for call in batch {
            call.reply(failed.as_ref());
        }
    }
}

/// Runs `batch` in one transaction, each call under its own savepoint, and commits it.
fn run_batch(store: &dyn Batched, batch: &mut [Box<dyn Call>]) -> Result<(), StoreError> {
    store.begin_batch()?;
    for call in batch.iter_mut() {
        let ran = store.begin_call().and_then(|()| {
            let ok = run_guarded(call.as_mut(), store);
            store.end_call(ok)
        });
        if let Err(e) = ran {
            let _ = store.end_batch(false);
            return Err(e);
        }
    }
    store.end_batch(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otp::{Kind, OtpParams};
    use crate::store::{NewToken, Runner, SqliteStore, TokenState};
    use tokio::sync::oneshot;

    fn open(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(&dir.path().join("t.db"), &dir.path().join("k")).unwrap()
    }

    fn token(store: &SqliteStore, user: &str) -> String {
        let new = NewToken {
            uid: None,
            user,
            label: "phone",
            kind: Kind::Hotp,
            params: OtpParams::default(),
            secret: &[3; 20],
        };
        store.add_active_many(&[new], 1).unwrap().remove(0)
    }

    /// Polls `f` once, so that a `run` puts its call in the queue without waiting for it.
    async fn poll_once<F: std::future::Future + Unpin>(f: F) {
        let mut f = f;
        std::future::poll_fn(|cx| {
            let _ = std::pin::Pin::new(&mut f).poll(cx);
            std::task::Poll::Ready(())
        })
        .await
    }

    fn call<T: Send + 'static>(
        f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> (Box<dyn Call>, oneshot::Receiver<Result<T, StoreError>>) {
        crate::store::call::Pending::queue(f)
    }

    #[test]
    fn a_failed_or_panicking_call_is_undone_alone_and_the_batch_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let (ann, bob, cy) = (
            token(&store, "ann"),
            token(&store, "bob"),
            token(&store, "cy"),
        );
        let accept = |id: String| move |s: &dyn Store| s.accept(&id, TokenState::Active, 5, 0, 2);
        let (a, ra) = call(accept(ann));
        let b_id = bob.clone();
        let (b, mut rb) = call(move |s: &dyn Store| {
            s.accept(&b_id, TokenState::Active, 5, 0, 2)?;
            Err::<bool, _>(StoreError::Overloaded)
        });
        let c_id = cy.clone();
        let (c, mut rc) = call(move |s: &dyn Store| -> Result<bool, StoreError> {
            s.accept(&c_id, TokenState::Active, 5, 0, 2)?;
            panic!("a bug in a call");
        });
        let mut batch = vec![a, b, c];
        run_batch(&store, &mut batch).unwrap();
        for call in batch {
            call.reply(None);
        }
        assert!(ra.blocking_recv().unwrap().unwrap());
        assert!(matches!(
            rb.try_recv().unwrap(),
            Err(StoreError::Overloaded)
        ));
        assert!(rc.try_recv().unwrap().is_err());
        // Read back through a second connection: only ann's write reached the disk.
        drop(store);
        let store = open(&dir);
        let last = |user: &str| {
            store.secrets(user, TokenState::Active).unwrap()[0]
                .counter
                .last
        };
        assert_eq!(
            (last("ann"), last("bob"), last("cy")),
            (Some(5), None, None)
        );
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_a_panicking_call_leaves_the_thread_serving() {
        // Concurrent callers with one code: the store cases run that on both runners.
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        token(&store, "ann");
        let thread = Runner::Sqlite(StoreThread::start(store).unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        // A full queue refuses at once, and the thread serves again once it drains.
        let small = Runner::Sqlite(StoreThread::with_queue(open(&dir), 2).unwrap());
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let (started, has_started) = std::sync::mpsc::channel::<()>();
        let results = runtime.block_on(async {
            let first = small.run(move |_| {
                let _ = started.send(());
                let _ = held.recv();
                Ok::<_, StoreError>(())
            });
            let mut first = Box::pin(first);
            // Queue a call that holds the thread until told, and wait until it runs: the queue
            // is empty again and the thread busy.
            poll_once(first.as_mut()).await;
            has_started.recv().unwrap();
            let mut queued = Vec::new();
            for _ in 0..2 {
                let mut call = Box::pin(small.run(|s| s.has_active("ann")));
                poll_once(call.as_mut()).await;
                queued.push(call);
            }
            let refused = small.run(|s| s.has_active("ann")).await;
            hold.send(()).unwrap();
            first.await.unwrap();
            let mut served = Vec::new();
            for call in queued {
                served.push(call.await.unwrap());
            }
            (refused, served)
        });
        assert!(matches!(results.0, Err(StoreError::Overloaded)));
        assert_eq!(results.1, [true, true]);
        // The thread survives a panicking call and keeps serving.
        runtime.block_on(async {
            let r: Result<(), StoreError> = thread.run(|_| panic!("a bug")).await;
            assert!(r.is_err());
            assert!(thread.run(|s| s.has_active("ann")).await.unwrap());
        });
    }
}
