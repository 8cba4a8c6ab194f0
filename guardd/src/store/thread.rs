//! The store's own thread, and the one short cut past it. Calls that queue up while a batch runs
//! form the next batch: one transaction and one commit (one fsync) for all of them, each call
//! undone alone if it fails, and no caller hears back before its writes are on disk
//! (docs/architecture.md#durability). A check and the write it leads to (a lockout and the
//! failure it counts, a code and its replay guard) are never interleaved with another login's:
//! one batch or one call holds the store at a time.
//!
//! While nothing is queued and the store is free, a call runs at once on the caller's own
//! thread instead, in a transaction of its own. That saves the two thread hand-offs a queued
//! call costs (wake the store thread, wake the caller), which on a quiet server are most of a
//! login's time in guardd. It is taken only when it cannot wait: the write lock is taken
//! without waiting before the call starts, and a lock held elsewhere (another process), a
//! batch running, or any call queued sends the call to the queue as before. So under load the
//! calls group into batches again, and the store thread is never kept from its turn for longer
//! than the calls already running take.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, TryLockError};

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
pub trait Batched: Store + Send + Sync {
    /// Opens the transaction that holds the calls of one batch, so their writes reach the disk
    /// together. Until `end_batch`, only the calling thread may use the store.
    fn begin_batch(&self) -> Result<(), StoreError>;
    /// Opens a transaction for one call with the write lock already held, without waiting for
    /// it: false, and nothing begun, when another connection holds it. Ended by `end_batch`.
    fn try_begin_alone(&self) -> Result<bool, StoreError>;
    /// Commits the batch (`keep`) or undoes all of it.
    fn end_batch(&self, keep: bool) -> Result<(), StoreError>;
    /// Marks where one call inside a batch starts, so that its writes can be undone alone.
    fn begin_call(&self) -> Result<(), StoreError>;
    /// Keeps (`keep`) or undoes the writes made since `begin_call`.
    fn end_call(&self, keep: bool) -> Result<(), StoreError>;
    /// What the store is, for logs.
    fn describe(&self) -> String;
    /// Leaves checkpoints (copying the log back into the database, several milliseconds) to
    /// `checkpoint`, instead of running them inside the commit that fills the log.
    fn defer_checkpoints(&self) -> Result<(), StoreError>;
    /// Whether the log is full enough for `checkpoint`.
    fn checkpoint_due(&self) -> bool;
    /// Copies the log back into the database as far as readers allow; failures are logged.
    fn checkpoint(&self);
}

/// What the store thread and the callers that run at once share.
struct Shared {
    store: Box<dyn Batched>,
    /// Held by whoever uses the store: the store thread for a batch, or one caller's call.
    turn: Mutex<()>,
    /// Calls queued and not yet taken up by the store thread under its turn. While any are, no
    /// call runs at once, so that the store thread is next.
    queued: AtomicUsize,
    /// Set when the store thread has ended (a bug outside a call): then no call runs at once
    /// either, and every call fails as the queue's do, instead of the store going on without
    /// its checkpoints.
    stopped: AtomicBool,
}

impl Shared {
    /// Waits for the store's turn (the store thread's, for a batch or a checkpoint).
    fn take_turn(&self) -> std::sync::MutexGuard<'_, ()> {
        self.turn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Marks the store thread's end, however it ends.
struct Stopping<'a>(&'a AtomicBool);

impl Drop for Stopping<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The handle of the store's thread: queue calls with [`Runner::run`](super::Runner::run).
pub struct StoreThread {
    queue: Queue,
    describe: String,
    shared: Arc<Shared>,
    /// Whether calls may run on the caller's thread: only on a runtime with two or more worker
    /// threads, so that one blocked in a commit leaves another serving.
    at_once: bool,
}

impl StoreThread {
    /// Moves `store` onto a new thread that serves calls until the handle is dropped. `workers`
    /// is how many threads the callers' runtime has: with two or more, calls made while the store
    /// is idle run at once on the caller's thread; with fewer, every call is queued.
    pub fn start(store: impl Batched + 'static, workers: usize) -> std::io::Result<StoreThread> {
        Self::with_queue(store, MAX_QUEUE, workers >= 2)
    }

    fn with_queue(
        store: impl Batched + 'static,
        max_queue: usize,
        at_once: bool,
    ) -> std::io::Result<StoreThread> {
        let (mut queue, calls) = Queue::new(max_queue);
        let describe = store.describe();
        store.defer_checkpoints().map_err(std::io::Error::other)?;
        let shared = Arc::new(Shared {
            store: Box::new(store),
            turn: Mutex::new(()),
            queued: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
        });
        let serving = shared.clone();
        queue.serve_with("guardd-store".into(), move || serve(&serving, &calls))?;
        Ok(StoreThread {
            queue,
            describe,
            shared,
            at_once,
        })
    }

    /// Runs `call` at once when the store is idle (see the module's note), else queues it for
    /// the next batch; with the queue full it does not run and the error is
    /// [`StoreError::Overloaded`]. Its result arrives once committed; if it fails (or panics)
    /// its writes are undone and the rest of its batch stands; if the commit fails, every call
    /// in the batch gets that error.
    pub(super) fn submit(&self, call: Box<dyn Call>) -> Result<(), StoreError> {
        match self.try_at_once(call) {
            Ok(()) => Ok(()),
            Err(call) => self.enqueue(call),
        }
    }

    /// Queues `call` for the store thread, counted in `queued` until the thread takes it up.
    fn enqueue(&self, call: Box<dyn Call>) -> Result<(), StoreError> {
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        self.queue.submit(call).inspect_err(|_| {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        })
    }

    /// Runs `call` on this thread if nothing is queued, nobody holds the store and no other
    /// connection holds its write lock; else hands it back unrun.
    fn try_at_once(&self, mut call: Box<dyn Call>) -> Result<(), Box<dyn Call>> {
        let shared = &*self.shared;
        if !self.at_once
            || shared.queued.load(Ordering::Acquire) > 0
            || shared.stopped.load(Ordering::Acquire)
        {
            return Err(call);
        }
        let turn = match shared.turn.try_lock() {
            Ok(turn) => turn,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Err(call),
        };
        let store = &*shared.store;
        match store.try_begin_alone() {
            Ok(true) => {}
            Ok(false) => return Err(call),
            Err(e) => {
                tracing::warn!("store call queued, cannot begin it at once: {e}");
                return Err(call);
            }
        }
        let ok = run_guarded(call.as_mut(), store);
        let failed = store.end_batch(ok).err().map(|e| {
            tracing::error!("store call not committed: {e}");
            Failure::of(e)
        });
        drop(turn);
        call.reply(failed.as_ref());
        if store.checkpoint_due() {
            // The store thread checkpoints; this only wakes it. A full queue is already awake.
            let _ = self.enqueue(Box::new(Wake));
        }
        Ok(())
    }

    pub(super) fn describe(&self) -> String {
        self.describe.clone()
    }
}

/// A call that carries no work: it wakes the store thread, which checkpoints when due.
struct Wake;

impl Call for Wake {
    fn run(&mut self, _: &dyn Store) -> bool {
        true
    }
    fn reply(self: Box<Self>, _: Option<&Failure>) {}
    fn abandoned(&self) -> bool {
        // Dropped unrun: nothing to run.
        true
    }
}

fn serve(shared: &Shared, queue: &mpsc::Receiver<Box<dyn Call>>) {
    let _stopping = Stopping(&shared.stopped);
    let store = &*shared.store;
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        batch.extend(queue.try_iter().take(MAX_BATCH - 1));
        let turn = shared.take_turn();
        // Counted off only now: until the store thread has its turn, no call runs at once.
        shared.queued.fetch_sub(batch.len(), Ordering::AcqRel);
        // Calls nobody waits for any more are dropped unrun.
        batch.retain(|call| !call.abandoned());
        let failed = if batch.is_empty() {
            None
        } else {
            run_batch(store, &mut batch).err().map(|e| {
                tracing::error!(calls = batch.len(), "store batch not committed: {e}");
                Failure::of(e)
            })
        };
        drop(turn);
        for call in batch {
            call.reply(failed.as_ref());
        }
        if store.checkpoint_due() {
            // After the replies: nobody waits for it.
            let _turn = shared.take_turn();
            store.checkpoint();
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

    /// The last counter accepted for `user`'s token, read through a connection of its own:
    /// what reached the disk.
    fn last_counter(dir: &tempfile::TempDir, user: &str) -> Option<u64> {
        open(dir).secrets(user, TokenState::Active).unwrap()[0]
            .counter
            .last
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
        let last = |user: &str| last_counter(&dir, user);
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
        let thread = Runner::Sqlite(StoreThread::start(store, 0).unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        // A full queue refuses at once, and the thread serves again once it drains.
        let small = Runner::Sqlite(StoreThread::with_queue(open(&dir), 2, false).unwrap());
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

    /// The name of the thread a call ran on, and whether it saw `user`'s token.
    fn where_it_ran(thread: &Runner, user: &'static str) -> (String, bool) {
        let runtime = crate::store::tests::current_thread();
        runtime
            .block_on(thread.run(move |s| {
                let name = std::thread::current().name().unwrap_or("").to_owned();
                Ok::<_, StoreError>((name, s.has_active(user)?))
            }))
            .unwrap()
    }

    #[test]
    fn an_idle_store_runs_a_call_on_the_callers_thread_and_a_locked_one_queues_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let id = token(&store, "ann");
        let thread = Runner::Sqlite(StoreThread::with_queue(store, MAX_QUEUE, true).unwrap());
        std::thread::Builder::new()
            .name("caller".into())
            .spawn(move || {
                assert_eq!(where_it_ran(&thread, "ann"), ("caller".into(), true));
                // A write made at once is committed before the answer: a second connection
                // sees it.
                let runtime = crate::store::tests::current_thread();
                let accept = id.clone();
                assert!(runtime
                    .block_on(thread.run(move |s| s.accept(&accept, TokenState::Active, 7, 0, 3)))
                    .unwrap());
                assert_eq!(last_counter(&dir, "ann"), Some(7));
                // Another process holds the write lock (an admin's sqlite3, a backup): the call
                // does not wait on the caller's thread; it is queued, and a read goes through
                // on the store thread while the lock is held.
                let conn = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
                conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                let started = std::time::Instant::now();
                assert_eq!(where_it_ran(&thread, "ann"), ("guardd-store".into(), true));
                assert!(started.elapsed() < BUSY_WAIT_SEEN);
                conn.execute_batch("ROLLBACK").unwrap();
                assert_eq!(where_it_ran(&thread, "ann"), ("caller".into(), true));
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// Well under SQLite's busy timeout (2 s): a call that waited for the lock would take that.
    const BUSY_WAIT_SEEN: std::time::Duration = std::time::Duration::from_millis(1500);

    #[test]
    fn while_a_batch_runs_or_calls_are_queued_no_call_runs_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        token(&store, "ann");
        let thread = Runner::Sqlite(StoreThread::with_queue(store, MAX_QUEUE, true).unwrap());
        let Runner::Sqlite(inner) = &thread else {
            unreachable!()
        };
        // A queued call holds the store thread (and its turn) until told.
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let (started, has_started) = std::sync::mpsc::channel::<()>();
        let (call, answer) = call(move |_| {
            let _ = started.send(());
            let _ = held.recv();
            Ok::<_, StoreError>(())
        });
        inner.enqueue(call).unwrap();
        has_started.recv().unwrap();
        // The store's turn is taken: the next call is queued behind the batch, not run here.
        let runtime = crate::store::tests::current_thread();
        let mut second = Box::pin(thread.run(|s| {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            Ok::<_, StoreError>((name, s.has_active("ann")?))
        }));
        runtime.block_on(poll_once(second.as_mut()));
        assert_eq!(inner.shared.queued.load(Ordering::Acquire), 1);
        hold.send(()).unwrap();
        answer.blocking_recv().unwrap().unwrap();
        assert_eq!(
            runtime.block_on(second).unwrap(),
            ("guardd-store".into(), true)
        );
        assert_eq!(inner.shared.queued.load(Ordering::Acquire), 0);
    }

    #[test]
    fn checkpoints_run_on_the_store_thread_and_keep_the_laid_out_log_from_growing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let id = token(&store, "ann");
        store.lay_out_wal();
        let wal = dir.path().join("t.db-wal");
        let laid_out = std::fs::metadata(&wal).unwrap().len();
        let thread = Runner::Sqlite(StoreThread::with_queue(store, MAX_QUEUE, true).unwrap());
        let runtime = crate::store::tests::current_thread();
        // Well past one log's worth of frames, every commit made at once.
        for n in 0..1500u64 {
            let id = id.clone();
            let at_once = runtime
                .block_on(thread.run(move |s| {
                    s.accept(&id, TokenState::Active, n + 1, 0, 3)?;
                    Ok::<_, StoreError>(std::thread::current().name() != Some("guardd-store"))
                }))
                .unwrap();
            assert!(at_once || n > 0, "the first call runs at once");
        }
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), laid_out);
        drop(thread);
        assert_eq!(last_counter(&dir, "ann"), Some(1500));
    }

    #[test]
    fn once_the_store_thread_has_ended_no_call_runs_at_once() {
        /// A call whose reply panics: a bug outside the call, which ends the store thread.
        struct BadReply;
        impl Call for BadReply {
            fn run(&mut self, _: &dyn Store) -> bool {
                true
            }
            fn reply(self: Box<Self>, _: Option<&Failure>) {
                panic!("a bug after the batch");
            }
            fn abandoned(&self) -> bool {
                false
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        token(&store, "ann");
        let thread = Runner::Sqlite(StoreThread::with_queue(store, MAX_QUEUE, true).unwrap());
        let Runner::Sqlite(inner) = &thread else {
            unreachable!()
        };
        inner.enqueue(Box::new(BadReply)).unwrap();
        while !inner.shared.stopped.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let runtime = crate::store::tests::current_thread();
        let result = runtime.block_on(thread.run(|s| s.has_active("ann")));
        assert!(matches!(result, Err(StoreError::Stopped)), "{result:?}");
    }

    #[test]
    fn a_batch_waits_for_a_lock_held_elsewhere_once_not_once_per_write() {
        // Root's sqlite3 holds the write lock; three writes (any user can queue failed
        // attempts) are ahead of root's login, which only reads.
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let ids: Vec<String> = ["ann", "bob", "cy"]
            .iter()
            .map(|u| token(&store, u))
            .collect();
        let admin = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
        admin.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut batch = Vec::new();
        let mut writes = Vec::new();
        for id in ids {
            let (c, answer) = call(move |s: &dyn Store| s.accept(&id, TokenState::Active, 9, 0, 2));
            batch.push(c);
            writes.push(answer);
        }
        let (root, mut root_answer) = call(|s: &dyn Store| s.has_active("ann"));
        batch.push(root);
        let started = std::time::Instant::now();
        run_batch(&store, &mut batch).unwrap();
        let took = started.elapsed();
        for c in batch {
            c.reply(None);
        }
        // One busy timeout (2 s) in all, not three.
        assert!(took < std::time::Duration::from_millis(2800), "{took:?}");
        assert!(root_answer.try_recv().unwrap().unwrap());
        for mut w in writes {
            assert!(matches!(w.try_recv().unwrap(), Err(StoreError::Busy)));
        }
        // The next batch waits again: a lock held for a moment is waited for.
        admin.execute_batch("ROLLBACK").unwrap();
        admin.execute_batch("BEGIN IMMEDIATE").unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            admin.execute_batch("ROLLBACK").unwrap();
        });
        let (again, mut answer) = call(|s: &dyn Store| {
            s.record_failure("ann", None, &crate::lockout::Backoff::default(), 5)?;
            Ok::<_, StoreError>(())
        });
        let mut batch = vec![again];
        run_batch(&store, &mut batch).unwrap();
        batch.pop().unwrap().reply(None);
        answer.try_recv().unwrap().unwrap();
        release.join().unwrap();
    }
}
