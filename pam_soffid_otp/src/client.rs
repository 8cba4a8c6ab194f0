use std::future::Future;
use std::path::Path;
use std::time::Duration;

use proto::v1::guard_client::GuardClient;
use proto::v1::{AnswerRequest, BeginRequest, LoginContext, Step};
use tokio::runtime::Runtime;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::core::{Daemon, DaemonError};

/// A connection to guardd for one PAM transaction. It owns a single-threaded tokio runtime
/// that lives only as long as the transaction, so no thread is left behind in the host.
pub struct GrpcDaemon {
    runtime: Runtime,
    client: GuardClient<Channel>,
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
        let channel = block_on(&runtime, timeout, proto::connect(socket, timeout))??;
        Ok(GrpcDaemon {
            runtime,
            client: GuardClient::new(channel),
            timeout,
        })
    }

    /// One call, bounded by the timeout.
    fn call<T, F, C>(&mut self, call: C) -> Result<T, DaemonError>
    where
        T: Send,
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send,
        C: FnOnce(GuardClient<Channel>) -> F,
    {
        match block_on(&self.runtime, self.timeout, call(self.client.clone()))? {
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
