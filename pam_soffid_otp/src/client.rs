use std::path::Path;
use std::time::Duration;

use prost::Message;
use proto::v1::{AnswerRequest, BeginRequest, LoginContext, OpenSessionReply, Step};
use zeroize::Zeroizing;

use crate::core::{Daemon, DaemonError};
use crate::wire::{Connection, WireError};

/// guardd's `Guard` service, by its gRPC path.
const SERVICE: &str = "/soffid.otp.v1.Guard/";

/// A connection to guardd for one PAM transaction: gRPC over the module's own small HTTP/2
/// client (`wire`), in the caller's thread, so nothing of it outlives the call that made it.
///
/// A person may take minutes to type a code while guardd closes every connection
/// `proto::MAX_CONNECTION_AGE` after it was opened: before each call, a connection older than
/// `proto::RECONNECT_AFTER` (or one guardd said GOAWAY on) is replaced by a new one (the
/// conversation lives in guardd, under its challenge id). A failed reconnect is a failure,
/// never an absent daemon.
pub struct GrpcDaemon {
    connection: Connection,
    timeout: Duration,
    reconnect_after: Duration,
}

impl GrpcDaemon {
    /// Connects to guardd at `socket`; fails within `timeout` when it is down or wedged. Only
    /// this step may report [`DaemonError::Absent`].
    pub fn connect(socket: &Path, timeout: Duration) -> Result<GrpcDaemon, DaemonError> {
        let connection = Connection::open(socket, timeout)?;
        Ok(GrpcDaemon {
            connection,
            timeout,
            reconnect_after: proto::RECONNECT_AFTER,
        })
    }

    /// Reconnects before a call once the connection is older than `age` instead of
    /// `proto::RECONNECT_AFTER`: for tests, which cannot wait that long.
    pub fn reconnect_after(mut self, age: Duration) -> GrpcDaemon {
        self.reconnect_after = age;
        self
    }

    /// One call: a new connection first if this one is old (bounded by the timeout), then the
    /// call (bounded by the timeout).
    fn call<R: Message + Default>(
        &mut self,
        method: &str,
        request: &impl Message,
    ) -> Result<R, DaemonError> {
        if self.connection.is_closing() || self.connection.age() >= self.reconnect_after {
            let path = self.connection.path().to_owned();
            self.connection = Connection::open(&path, self.timeout).map_err(|e| match e {
                WireError::Absent { .. } => {
                    DaemonError::Failed(format!("reconnecting: guardd went away: {e}"))
                }
                other => DaemonError::from(other),
            })?;
        }
        // The encoded request may hold a code: zeroized when the call ends.
        let bytes = Zeroizing::new(request.encode_to_vec());
        let path = format!("{SERVICE}{method}");
        let reply = self.connection.call(&path, &bytes, self.timeout)?;
        R::decode(&reply[..]).map_err(|e| DaemonError::Failed(format!("a reply guardd sent: {e}")))
    }
}

impl Daemon for GrpcDaemon {
    fn begin(&mut self, context: LoginContext) -> Result<Step, DaemonError> {
        self.call(
            "Begin",
            &BeginRequest {
                context: Some(context),
            },
        )
    }

    fn check(&mut self, context: LoginContext) -> Result<Step, DaemonError> {
        self.call(
            "Check",
            &BeginRequest {
                context: Some(context),
            },
        )
    }

    fn open_session(&mut self, context: LoginContext) -> Result<u32, DaemonError> {
        let reply: OpenSessionReply = self.call(
            "OpenSession",
            &BeginRequest {
                context: Some(context),
            },
        )?;
        Ok(reply.bound)
    }

    fn answer(
        &mut self,
        challenge: String,
        response: Zeroizing<Vec<u8>>,
    ) -> Result<Step, DaemonError> {
        let request = AnswerRequest {
            challenge,
            response: response.to_vec(),
        };
        let step = self.call("Answer", &request);
        // The request's copy of the code.
        let mut code = request.response;
        zeroize::Zeroize::zeroize(&mut code);
        step
    }
}
