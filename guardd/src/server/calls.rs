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

/// The gRPC service's path prefix: `/package.Service/`.
const SERVICE_PATH: &str = "/soffid.otp.v1.Guard/";
/// A gRPC message's prefix: a compression flag and the length (big-endian u32).
const PREFIX: usize = 5;

/// How calls on a connection are bounded (`server.rs` holds the values and why).
#[derive(Clone, Copy)]
pub(super) struct Limits {
    pub request_timeout: Duration,
    pub max_request: usize,
    pub max_streams: u32,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_header_list: u32,
    pub max_age: Duration,
    pub age_grace: Duration,
}

/// Serves the calls of one admitted connection until the client closes it, its age is up (then
/// GOAWAY; calls in flight get `age_grace`), or guardd stops (`closing` turns true: GOAWAY).
pub(super) async fn serve<T>(
    io: T,
    caller: Caller,
    service: Arc<GuardService>,
    limits: Limits,
    mut closing: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let age = tokio::time::sleep(limits.max_age);
    tokio::pin!(age);
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(limits.max_streams)
        .initial_window_size(limits.stream_window)
        .initial_connection_window_size(limits.connection_window)
        .max_header_list_size(limits.max_header_list)
        .max_frame_size(16 * 1024)
        .handshake::<T, Bytes>(io);
    let mut connection = tokio::select! {
        handshaken = handshake => match handshaken {
            Ok(connection) => connection,
            Err(_) => return,
        },
        () = &mut age => return,
        _ = closing.wait_for(|closing| *closing) => return,
    };
    let mut going_away = false;
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            () = &mut age => {
                if going_away {
                    return;
                }
                connection.graceful_shutdown();
                going_away = true;
                age.as_mut().reset(tokio::time::Instant::now() + limits.age_grace);
                continue;
            }
            _ = closing.wait_for(|closing| *closing), if !going_away => {
                connection.graceful_shutdown();
                going_away = true;
                continue;
            }
        };
        // None: the client closed the connection; an error: it broke the protocol, which h2
        // has answered (GOAWAY) already.
        let Some(Ok((request, respond))) = next else {
            return;
        };
        let call = call(&service, caller, &limits, request, respond);
        if !drive(&mut connection, call).await {
            return;
        }
    }
}

/// Runs `call` while driving the connection (the request's body arrives and the reply leaves
/// through it); false if the connection ended meanwhile.
async fn drive<T>(
    connection: &mut Connection<T, Bytes>,
    call: impl std::future::Future<Output = ()>,
) -> bool
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    tokio::pin!(call);
    tokio::select! {
        biased;
        () = &mut call => true,
        _ = std::future::poll_fn(|cx| connection.poll_closed(cx)) => false,
    }
}

/// One call: the method from the path, the request message from the body, the service's answer
/// (or its status) back on the stream.
async fn call(
    service: &GuardService,
    caller: Caller,
    limits: &Limits,
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (head, mut body) = request.into_parts();
    let method = (head.method == http::Method::POST)
        .then(|| head.uri.path().strip_prefix(SERVICE_PATH))
        .flatten()
        .map(str::to_owned);
    let answered = match method {
        None => Err(Status::unimplemented(format!(
            "no such method: {}",
            head.uri.path()
        ))),
        Some(method) => match tokio::time::timeout(limits.request_timeout, async {
            let message = read_message(&mut body, limits.max_request).await?;
            dispatch(service, &method, &message, caller).await
        })
        .await
        {
            Ok(answered) => answered,
            Err(_) => Err(Status::cancelled("the call took too long inside guardd")),
        },
    };
    // What the client may still send is not read: h2 resets the stream once the answer is out.
    drop(body);
    let _ = match answered {
        Ok(reply) => send_reply(&mut respond, reply),
        Err(status) => send_status(&mut respond, &status),
    };
}

/// The one message of a unary request: refused before it is buffered when its prefix declares
/// more than `max` bytes (OUT_OF_RANGE, as tonic), or compressed (which this protocol never
/// negotiates). Zeroized when dropped: an Answer's message holds a code.
async fn read_message(body: &mut RecvStream, max: usize) -> Result<Zeroizing<Vec<u8>>, Status> {
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
            if len > max {
                return Err(Status::out_of_range(format!(
                    "the request is {len} bytes, more than the {max} guardd reads"
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
    fn reply<M: Message>(response: tonic::Response<M>) -> Vec<u8> {
        response.into_inner().encode_to_vec()
    }
    macro_rules! methods {
        ($($name:literal => $call:ident,)*) => {
            match method {
                $($name => Ok(reply(Guard::$call(service, request(message, caller)?).await?)),)*
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

/// The reply: headers, the message with its prefix, and `grpc-status: 0` in the trailers.
fn send_reply(respond: &mut SendResponse<Bytes>, reply: Vec<u8>) -> Result<(), h2::Error> {
    let Ok(len) = u32::try_from(reply.len()) else {
        return send_status(respond, &Status::internal("a reply too large to send"));
    };
    let mut framed = Vec::with_capacity(PREFIX + reply.len());
    framed.push(0);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(&reply);
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
