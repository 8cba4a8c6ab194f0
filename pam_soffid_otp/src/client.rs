use std::future::Future;
use std::path::Path;
use std::time::Duration;

use proto::v1::guard_client::GuardClient;
use proto::v1::{AnswerRequest, BeginRequest, LoginContext, Step};
use proto::Connection;
use tokio::runtime::Runtime;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::core::{Daemon, DaemonError};

/// A connection to guardd for one PAM transaction. It owns a single-threaded tokio runtime
/// that lives only as long as the transaction, so no thread is left behind in the host.
///
/// A person may take minutes to type a code while guardd closes every connection
/// `proto::MAX_CONNECTION_AGE` after it was opened: before each call, a connection older than
/// `proto::RECONNECT_AFTER` is replaced by a new one (the conversation lives in guardd, under its
/// challenge id). A failed reconnect is a failure, never an absent daemon.
pub struct GrpcDaemon {
    runtime: Runtime,
    connection: Connection,
    timeout: Duration,
}

impl GrpcDaemon {
    /// Connects to guardd at `socket`; fails within `timeout` when it is down or wedged. Only
    /// this step may report [`DaemonError::Absent`].
    pub fn connect(socket: &Path, timeout: Duration) -> Result<GrpcDaemon, DaemonError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DaemonError::Failed(format!("cannot start a runtime: {e}")))?;
        let connection = block_on(&runtime, timeout, Connection::open(socket, timeout))??;
        Ok(GrpcDaemon {
            runtime,
            connection,
            timeout,
        })
    }

    /// Reconnects before a call once the connection is older than `age` instead of
    /// `proto::RECONNECT_AFTER`: for tests, which cannot wait that long.
    pub fn reconnect_after(mut self, age: Duration) -> GrpcDaemon {
        self.connection = self.connection.reconnect_after(age);
        self
    }

    /// One call: a new connection first if this one is old (bounded by the timeout), then the
    /// call (bounded by the timeout).
    fn call<T, F, C>(&mut self, call: C) -> Result<T, DaemonError>
    where
        T: Send,
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send,
        C: FnOnce(GuardClient<Channel>) -> F,
    {
        // A reconnect that finds no guardd is ConnectError::Failed (proto), never Absent.
        let channel = block_on(&self.runtime, self.timeout, self.connection.channel())??;
        match block_on(&self.runtime, self.timeout, call(GuardClient::new(channel)))? {
            Ok(reply) => Ok(reply.into_inner()),
            Err(status) => Err(DaemonError::from(status)),
        }
    }
}

impl Daemon for GrpcDaemon {
    fn begin(&mut self, context: LoginContext) -> Result<Step, DaemonError> {
        self.call(|mut client| async move {
            client
                .begin(BeginRequest {
                    context: Some(context),
                })
                .await
        })
    }

    fn check(&mut self, context: LoginContext) -> Result<Step, DaemonError> {
        self.call(|mut client| async move {
            client
                .check(BeginRequest {
                    context: Some(context),
                })
                .await
        })
    }

    fn open_session(&mut self, context: LoginContext) -> Result<u32, DaemonError> {
        let reply = self.call(|mut client| async move {
            client
                .open_session(BeginRequest {
                    context: Some(context),
                })
                .await
        })?;
        Ok(reply.bound)
    }

    fn answer(
        &mut self,
        challenge: String,
        response: Zeroizing<Vec<u8>>,
    ) -> Result<Step, DaemonError> {
        self.call(|mut client| async move {
            // The request takes a copy; `response` is zeroized when this future ends.
            let request = AnswerRequest {
                challenge,
                response: response.to_vec(),
            };
            client.answer(request).await
        })
    }
}

/// Runs `f` to completion on `runtime`, giving up after `timeout`. When the host process is
/// itself inside a tokio runtime, `block_on` would panic there, so a short-lived thread runs it.
fn block_on<F>(runtime: &Runtime, timeout: Duration, f: F) -> Result<F::Output, DaemonError>
where
    F: Future + Send,
    F::Output: Send,
{
    let run = || {
        runtime
            .block_on(async { tokio::time::timeout(timeout, f).await })
            .map_err(|_| DaemonError::TimedOut(timeout))
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return run();
    }
    std::thread::scope(|s| {
        s.spawn(run)
            .join()
            .unwrap_or_else(|_| Err(DaemonError::Failed("the client thread failed".into())))
    })
}
