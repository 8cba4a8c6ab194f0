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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::ok_reply;
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::os::unix::net::UnixListener;

    /// Step{permit: Permit{}}.
    const PERMIT: &[u8] = b"\x12\x00";

    /// A guardd that reads the whole request, stops reading (as one that closes the connection
    /// right after its answer), then answers in full.
    fn answers_then_stops_reading(reply: Vec<u8>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // The preface, then frames until the request's DATA ends the stream.
            loop {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
                let mut at = 24;
                let mut done = false;
                while got.len() >= at + 9 {
                    let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
                    done |= got[at + 3] == 0 && got[at + 4] & 1 != 0;
                    at += 9 + len;
                }
                if done && got.len() >= at {
                    break;
                }
            }
            conn.shutdown(Shutdown::Read).unwrap();
            conn.write_all(&reply).unwrap();
            std::thread::sleep(Duration::from_secs(5));
        });
        (dir, path)
    }

    #[test]
    fn a_complete_answer_counts_even_if_guardd_stopped_reading() {
        // The answer is all there: returning the flow-control window (WINDOW_UPDATE) to a guardd
        // that no longer reads fails with EPIPE, which must not lose the verdict.
        let (_dir, path) = answers_then_stops_reading(ok_reply(1, PERMIT));
        let mut daemon = GrpcDaemon::connect(&path, Duration::from_secs(2)).unwrap();
        let step = daemon.answer("c".into(), Zeroizing::new(b"1".to_vec()));
        assert!(
            matches!(&step, Ok(Step { kind: Some(_) })),
            "{:?}",
            step.err()
        );
    }
}
