//! gRPC calls on one connection: HTTP/2 by the `h2` crate (the protocol engine hyper runs on),
//! the little gRPC adds to it here: a path naming the method, one length-prefixed protobuf
//! message each way, and the status in trailers (the gRPC over HTTP/2 specification).
//!
//! Every call of this protocol is unary and a connection's client makes one at a time (the PAM
//! module, guardctl), so a connection's calls run one after another on the connection's own
//! task: no task per call, and a call's answer leaves from the task that read its request.
//! HTTP/2 itself (frames, flow control, HPACK, the limits on streams, headers and resets) stays
//! with `h2`; a client that opens more streams at once has them wait, within the windows below.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::server::{Connection, SendResponse};
use h2::RecvStream;
use prost::Message;
use proto::v1::guard_server::Guard;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tonic::{Code, Status};
use zeroize::Zeroizing;

use crate::caller::Caller;
use crate::service::GuardService;

/// A gRPC message's prefix: a compression flag and the length (big-endian u32).
const PREFIX: usize = 5;

/// Longest time one RPC may take inside the daemon (reading its request, and running it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Every connection is closed (HTTP/2 GOAWAY, calls in flight finish) this long after it was
/// opened, so idle connections cost nothing for long; clients reconnect for their next call
/// (the conversation lives here, under its challenge id, not in the connection).
const MAX_CONNECTION_AGE: Duration = proto::MAX_CONNECTION_AGE;
/// How long calls in flight may finish once a connection is past its age.
const CONNECTION_AGE_GRACE: Duration = Duration::from_secs(15);
/// The largest request guardd reads. The protocol's biggest real request is a login context
/// (seven fields of at most 256 bytes and a 4 KiB sudo command): 16 KiB leaves room, and a
/// client that declares more is refused before anything is buffered.
const MAX_REQUEST: usize = 16 * 1024;
/// HTTP/2 limits sized to this protocol, so a half-sent request holds little memory: a few
/// streams per connection (a login uses one at a time, and a connection's calls are served one
/// after another: the windows of all three fit the connection's, so those waiting can never
/// starve the one being served of window), small flow-control windows and headers.
const MAX_STREAMS: u32 = 3;
const STREAM_WINDOW: u32 = 20 * 1024;
const CONNECTION_WINDOW: u32 = 64 * 1024;
// A request and its prefix fit one stream's window, and every stream's window fits the
// connection's: streams waiting to be served cannot take the window the one served needs.
const _: () = assert!(MAX_REQUEST + PREFIX <= STREAM_WINDOW as usize);
const _: () = assert!(MAX_STREAMS * STREAM_WINDOW <= CONNECTION_WINDOW);
const MAX_HEADER_LIST: u32 = 8 * 1024;

/// How long the replies already written may take to leave once a connection is closed by
/// guardd (its age and grace are up): a client that stopped reading cannot hold it longer.
const LAST_FLUSH: Duration = Duration::from_millis(100);

/// Serves the calls of one admitted connection until the client closes it, or guardd does:
/// at `max_age` (GOAWAY; calls already sent get `age_grace`, then the connection closes after
/// the call being served, which its own timeout bounds), or when guardd stops (`closing` turns
/// true: GOAWAY at once, even during a call).
pub(super) async fn serve<T>(
    io: T,
    caller: Caller,
    service: Arc<GuardService>,
    mut closing: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let age = tokio::time::sleep(MAX_CONNECTION_AGE);
    tokio::pin!(age);
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(MAX_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_frame_size(16 * 1024)
        .handshake::<T, Bytes>(io);
    let mut connection = tokio::select! {
        biased;
        () = &mut age => return,
        _ = stopping(&mut closing) => return,
        handshaken = handshake => match handshaken {
            Ok(connection) => connection,
            Err(_) => return,
        },
    };
    let mut ending = Ending::Open;
    loop {
        // Timers first: a client that always has a stream waiting cannot keep them from firing.
        let next = tokio::select! {
            biased;
            () = &mut age => {
                ending.age_up(&mut connection, age.as_mut(), CONNECTION_AGE_GRACE);
                if ending == Ending::Closing {
                    return last_flush(&mut connection).await;
                }
                continue;
            }
            _ = stopping(&mut closing), if ending == Ending::Open => {
                if connection.has_streams() {
                    ending.go_away(&mut connection);
                } else {
                    // Idle: closed now. A graceful GOAWAY would wait for the acknowledgement of
                    // a PING, which an idle PAM module, not reading, never sends.
                    connection.abrupt_shutdown(h2::Reason::NO_ERROR);
                    ending = Ending::Closing;
                }
                continue;
            }
            next = connection.accept() => next,
        };
        // None: the client closed the connection; an error: it broke the protocol, which h2
        // has answered (GOAWAY) already.
        let Some(Ok((request, respond))) = next else {
            return;
        };
        let call = call(&service, caller.clone(), request, respond);
        tokio::pin!(call);
        // The call runs here while the connection is driven (its request arrives and its reply
        // leaves through it). It runs to its end even if the connection closes meanwhile: its
        // timeout bounds it, and what it holds (its place in the budgets) stays held while its
        // work goes on.
        let mut driven = true;
        loop {
            tokio::select! {
                biased;
                () = &mut call => break,
                () = &mut age, if ending != Ending::Closing => {
                    ending.age_up(&mut connection, age.as_mut(), CONNECTION_AGE_GRACE);
                }
                _ = stopping(&mut closing), if ending == Ending::Open => {
                    ending.go_away(&mut connection);
                }
                _ = std::future::poll_fn(|cx| connection.poll_closed(cx)), if driven => {
                    driven = false;
                }
            }
        }
        if !driven {
            return;
        }
        if ending == Ending::Closing {
            return last_flush(&mut connection).await;
        }
    }
}

/// Drives a connection guardd is closing for `LAST_FLUSH` at most, so that the replies already
/// written go out before it is dropped.
async fn last_flush<T, B>(connection: &mut Connection<T, B>)
where
    T: AsyncRead + AsyncWrite + Unpin,
    B: bytes::Buf,
{
    let flush = std::future::poll_fn(|cx| connection.poll_closed(cx));
    let _ = tokio::time::timeout(LAST_FLUSH, flush).await;
}

/// Resolves once guardd stops (or its accept loop is gone).
async fn stopping(closing: &mut watch::Receiver<bool>) {
    // The value's guard is not kept: a connection's future must stay `Send`.
    let _ = closing.wait_for(|closing| *closing).await;
}

/// Where a connection is in being closed by guardd.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    Open,
    /// GOAWAY sent: the calls already sent are served, no new one is taken.
    GoingAway,
    /// The grace after the connection's age is up too: it closes after the call being served.
    Closing,
}

impl Ending {
    fn go_away<T, B>(&mut self, connection: &mut Connection<T, B>)
    where
        T: AsyncRead + AsyncWrite + Unpin,
        B: bytes::Buf,
    {
        connection.graceful_shutdown();
        *self = Ending::GoingAway;
    }

    /// The connection's age (then its grace) is up.
    fn age_up<T, B>(
        &mut self,
        connection: &mut Connection<T, B>,
        age: std::pin::Pin<&mut tokio::time::Sleep>,
        grace: Duration,
    ) where
        T: AsyncRead + AsyncWrite + Unpin,
        B: bytes::Buf,
    {
        match self {
            Ending::Open => {
                self.go_away(connection);
                age.reset(tokio::time::Instant::now() + grace);
            }
            Ending::GoingAway => {
                // A client that answers no PING never gets the final GOAWAY (the one naming its
                // last stream): the ending waits for none.
                *self = Ending::Closing;
            }
            Ending::Closing => {}
        }
    }
}

/// One call: the method from the path, the request message from the body, the service's answer
/// (or its status) back on the stream.
async fn call(
    service: &GuardService,
    caller: Caller,
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (head, mut body) = request.into_parts();
    // `/package.Service/Method`, the service's name as the .proto file gives it.
    let method = (head.method == http::Method::POST)
        .then(|| head.uri.path().strip_prefix('/'))
        .flatten()
        .and_then(|path| path.strip_prefix(proto::v1::guard_server::SERVICE_NAME))
        .and_then(|path| path.strip_prefix('/'))
        .map(str::to_owned);
    let answered = match method {
        None => Err(Status::unimplemented(format!(
            "no such method: {}",
            head.uri.path()
        ))),
        Some(method) => {
            let reading = read_message(&mut body);
            match tokio::time::timeout(read_timeout(&head.headers), reading).await {
                Err(_) => Err(Status::deadline_exceeded(
                    "the request did not arrive within its deadline",
                )),
                Ok(Err(status)) => Err(status),
                // Once read, a call runs within guardd's own limit, whatever the client's
                // deadline: a client must not choose where its call is cut. Work a call has
                // started goes on where it runs (a blocking thread, the hasher, the store);
                // cut short, the call would give back its places in the budgets and lose its
                // audit record while that work went on.
                Ok(Ok(message)) => match tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    dispatch(service, &method, &message, caller),
                )
                .await
                {
                    Ok(answered) => answered,
                    Err(_) => Err(Status::cancelled("the call took too long inside guardd")),
                },
            }
        }
    };
    // What the client may still send is not read: h2 resets the stream once the answer is out.
    drop(body);
    let _ = match answered {
        Ok(reply) => send_reply(&mut respond, reply),
        Err(status) => send_status(&mut respond, &status),
    };
}

/// How long reading a call's request may take: guardd's limit, or less if the client set a
/// deadline (`grpc-timeout`, which the PAM module sends with its `timeout=`), so that a stalled
/// upload holds nothing past it. A malformed deadline is ignored.
fn read_timeout(headers: &http::HeaderMap) -> Duration {
    let client = headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(grpc_timeout);
    client.map_or(REQUEST_TIMEOUT, |c| c.min(REQUEST_TIMEOUT))
}

/// A `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(value: &str) -> Option<Duration> {
    if !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The one message of a unary request: refused before it is buffered when its prefix declares
/// more than `MAX_REQUEST` bytes (OUT_OF_RANGE, as tonic), or compressed (which this protocol never
/// negotiates). Zeroized when dropped: an Answer's message holds a code.
async fn read_message(body: &mut RecvStream) -> Result<Zeroizing<Vec<u8>>, Status> {
    let mut message = Zeroizing::new(Vec::new());
    let mut prefix = [0u8; PREFIX];
    let mut have_prefix = 0;
    let mut declared = None;
    while let Some(chunk) = body.data().await {
        let mut chunk =
            chunk.map_err(|e| Status::cancelled(format!("the request broke off: {e}")))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if declared.is_none() {
            let take = (PREFIX - have_prefix).min(chunk.len());
            prefix[have_prefix..have_prefix + take].copy_from_slice(&chunk[..take]);
            have_prefix += take;
            chunk.advance(take);
            if have_prefix < PREFIX {
                continue;
            }
            if prefix[0] != 0 {
                return Err(Status::unimplemented(
                    "compressed messages are not accepted",
                ));
            }
            let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
            if len > MAX_REQUEST {
                return Err(Status::out_of_range(format!(
                    "the request is {len} bytes, more than the {MAX_REQUEST} guardd reads"
                )));
            }
            // All at once, so that no copy of the message is left behind by a reallocation.
            message.reserve_exact(len);
            declared = Some(len);
        }
        let len = declared.unwrap_or(0);
        if message.len() + chunk.len() > len {
            return Err(Status::invalid_argument("a unary call carries one message"));
        }
        message.extend_from_slice(&chunk);
    }
    match declared {
        Some(len) if message.len() == len => Ok(message),
        _ => Err(Status::invalid_argument(
            "the request ended inside its message",
        )),
    }
}

/// Decodes the request of `method`, runs it, encodes its reply.
async fn dispatch(
    service: &GuardService,
    method: &str,
    message: &[u8],
    caller: Caller,
) -> Result<Vec<u8>, Status> {
    /// The request as the service takes it: the message, and the caller the kernel named when
    /// the connection was accepted.
    fn request<M: Message + Default>(
        message: &[u8],
        caller: Caller,
    ) -> Result<tonic::Request<M>, Status> {
        let decoded = M::decode(message)
            .map_err(|e| Status::internal(format!("a request guardd cannot read: {e}")))?;
        let mut request = tonic::Request::new(decoded);
        request.extensions_mut().insert(caller);
        Ok(request)
    }
    /// The reply message with its prefix, encoded straight into one buffer (it may hold a
    /// secret: an enrolment's, backup codes), which goes to h2 as it is.
    fn reply<M: Message>(response: tonic::Response<M>) -> Result<Vec<u8>, Status> {
        let message = response.into_inner();
        let len = message.encoded_len();
        let prefix =
            u32::try_from(len).map_err(|_| Status::internal("a reply too large to send"))?;
        let mut framed = Vec::with_capacity(PREFIX + len);
        framed.push(0);
        framed.extend_from_slice(&prefix.to_be_bytes());
        message
            .encode(&mut framed)
            .map_err(|e| Status::internal(format!("a reply guardd cannot encode: {e}")))?;
        Ok(framed)
    }
    macro_rules! methods {
        ($($name:literal => $call:ident,)*) => {
            match method {
                $($name => reply(Guard::$call(service, request(message, caller)?).await?),)*
                _ => Err(Status::unimplemented(format!("no such method: {method}"))),
            }
        };
    }
    methods! {
        "Begin" => begin,
        "Answer" => answer,
        "Check" => check,
        "Recover" => recover,
        "Enroll" => enroll,
        "Confirm" => confirm,
        "List" => list,
        "Delete" => delete,
        "SetEnabled" => set_enabled,
        "Resync" => resync,
        "Unlock" => unlock,
        "IssueBackupCodes" => issue_backup_codes,
        "Explain" => explain,
        "Reload" => reload,
        "OpenSession" => open_session,
        "Forget" => forget,
        "Status" => status,
    }
}

/// The reply: headers, the message (already with its prefix), and `grpc-status: 0` in the
/// trailers.
fn send_reply(respond: &mut SendResponse<Bytes>, framed: Vec<u8>) -> Result<(), h2::Error> {
    let mut stream = respond.send_response(head(), false)?;
    stream.send_data(Bytes::from(framed), false)?;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    stream.send_trailers(trailers)
}

/// A refusal or failure: the status alone, in the response's headers (trailers-only).
fn send_status(respond: &mut SendResponse<Bytes>, status: &Status) -> Result<(), h2::Error> {
    let mut response = head();
    if status.add_header(response.headers_mut()).is_err() {
        let fallback = Status::new(Code::Internal, "a status guardd could not encode");
        let _ = fallback.add_header(response.headers_mut());
    }
    respond.send_response(response, true).map(drop)
}

/// `200` with gRPC's content type: every gRPC response starts so, whatever its status.
fn head() -> http::Response<()> {
    let mut response = http::Response::new(());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_with_their_unit_and_malformed_ones_ignored() {
        assert_eq!(grpc_timeout("5000m"), Some(Duration::from_secs(5)));
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789m", "5x", "-5m", "5 m", "５m", "5é"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
        let mut headers = http::HeaderMap::new();
        assert_eq!(read_timeout(&headers), Duration::from_secs(15));
        headers.insert("grpc-timeout", http::HeaderValue::from_static("200m"));
        assert_eq!(read_timeout(&headers), Duration::from_millis(200));
        headers.insert("grpc-timeout", http::HeaderValue::from_static("1M"));
        assert_eq!(read_timeout(&headers), Duration::from_secs(15));
    }
}
