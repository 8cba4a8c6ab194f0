//! One queued store call with its types erased, shared by both runners.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::{Store, StoreError};

/// A call waiting to run.
pub(super) trait Call: Send {
    /// Runs the call; true when it succeeded and its writes are to be kept.
    fn run(&mut self, store: &dyn Store) -> bool;
    /// Sends the caller its result, or `failed` when its writes were not committed.
    fn reply(self: Box<Self>, failed: Option<&Failure>);
    /// Whether nobody waits for the result any more (the client hung up, or the call timed
    /// out): such a call is dropped unrun, so calls given up cannot keep a runner busy.
    fn abandoned(&self) -> bool;
}

pub(super) struct Pending<F, T, E> {
    f: Option<F>,
    result: Option<Result<T, E>>,
    reply: oneshot::Sender<Result<T, E>>,
}

impl<F, T, E> Pending<F, T, E>
where
    F: FnOnce(&dyn Store) -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: From<StoreError> + Send + 'static,
{
    /// The call, and where its result will arrive.
    pub(super) fn queue(f: F) -> (Box<dyn Call>, oneshot::Receiver<Result<T, E>>) {
        let (reply, answer) = oneshot::channel();
        let call = Pending {
            f: Some(f),
            result: None,
            reply,
        };
        (Box::new(call), answer)
    }
}

impl<F, T, E> Call for Pending<F, T, E>
where
    F: FnOnce(&dyn Store) -> Result<T, E> + Send,
    T: Send,
    E: From<StoreError> + Send,
{
    fn run(&mut self, store: &dyn Store) -> bool {
        let Some(f) = self.f.take() else {
            return false;
        };
        let result = f(store);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn reply(self: Box<Self>, failed: Option<&Failure>) {
        let result = match (failed, self.result) {
            (Some(e), _) => Err(E::from(e.to_error())),
            (None, Some(result)) => result,
            (None, None) => Err(E::from(StoreError::Internal)),
        };
        // The caller may have gone (its client hung up); the writes stand all the same.
        let _ = self.reply.send(result);
    }

    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// Why a call's writes were not committed, given to every call it concerns.
pub(super) struct Failure {
    kind: FailureKind,
    message: String,
}

enum FailureKind {
    Busy,
    Unavailable,
    Other,
}

impl Failure {
    pub(super) fn of(e: StoreError) -> Self {
        crate::metrics::store_failed(&e.to_string());
        let kind = match e {
            StoreError::Busy => FailureKind::Busy,
            StoreError::Unavailable(_) => FailureKind::Unavailable,
            _ => FailureKind::Other,
        };
        let message = match e {
            StoreError::Unavailable(reason) => reason,
            e => e.to_string(),
        };
        Failure { kind, message }
    }

    fn to_error(&self) -> StoreError {
        match self.kind {
            FailureKind::Busy => StoreError::Busy,
            FailureKind::Unavailable => StoreError::Unavailable(self.message.clone()),
            FailureKind::Other => StoreError::NotCommitted(self.message.clone()),
        }
    }
}

/// A bounded queue of calls and the threads that serve it. A full queue refuses at once, so a
/// flood of calls cannot grow guardd's memory or every caller's wait without bound. Dropping
/// it lets the threads finish the calls already queued, then waits for them.
pub(super) struct Queue {
    calls: Option<mpsc::SyncSender<Box<dyn Call>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Queue {
    /// A queue of at most `bound` calls, and its receiving end for the threads to serve.
    pub(super) fn new(bound: usize) -> (Queue, mpsc::Receiver<Box<dyn Call>>) {
        let (calls, receiver) = mpsc::sync_channel(bound);
        let queue = Queue {
            calls: Some(calls),
            threads: Vec::new(),
        };
        (queue, receiver)
    }

    /// Starts a thread named `name` that serves this queue until it is dropped.
    pub(super) fn serve_with(
        &mut self,
        name: String,
        serve: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let thread = std::thread::Builder::new().name(name).spawn(serve)?;
        self.threads.push(thread);
        Ok(())
    }

    /// Queues `call`; with the queue full it does not run and the error is "overloaded".
    pub(super) fn submit(&self, call: Box<dyn Call>) -> Result<(), StoreError> {
        let Some(calls) = &self.calls else {
            return Err(StoreError::Stopped);
        };
        calls.try_send(call).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => StoreError::Overloaded,
            mpsc::TrySendError::Disconnected(_) => StoreError::Stopped,
        })
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        drop(self.calls.take());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Runs `call`, turning a panic into a failed call whose writes are undone.
pub(super) fn run_guarded(call: &mut dyn Call, store: &dyn Store) -> bool {
    catch_unwind(AssertUnwindSafe(|| call.run(store))).unwrap_or_else(|_| {
        tracing::error!("a store call panicked; its writes were undone");
        false
    })
}
