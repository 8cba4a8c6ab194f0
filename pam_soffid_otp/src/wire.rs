//! gRPC over HTTP/2 for one PAM transaction, on a blocking Unix socket in the caller's thread.
//!
//! The module speaks the same protocol as guardctl (`proto/guard.proto`, served by tonic), but
//! runs inside every sshd and sudo process, which loads it afresh: a general HTTP/2 stack and an
//! async runtime cost more to load and start than the whole login. One call at a time needs
//! little of HTTP/2 (RFC 9113): the preface and SETTINGS, then per call a stream with HEADERS
//! and DATA, answered by HEADERS, DATA and trailers. Header blocks are (de)compressed by
//! loona-hpack, messages by prost. No thread, no runtime: nothing outlives the call.
//!
//! Every read and write is bounded by the call's deadline (socket timeouts set to what is
//! left of it), and writes never raise SIGPIPE (`send(MSG_NOSIGNAL)`).

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
use zeroize::Zeroizing;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types (RFC 9113 §6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

// Flags.
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// The largest frame this client accepts (the protocol's default, which it never raises).
const MAX_FRAME: usize = 16_384;
/// The largest reply message accepted: guardd's replies are a few hundred bytes.
const MAX_MESSAGE: usize = 64 * 1024;
/// The largest header block accepted (HEADERS plus CONTINUATION).
const MAX_HEADER_BLOCK: usize = 16 * 1024;
/// SETTINGS_HEADER_TABLE_SIZE: the protocol's default, which this client never changes.
const HEADER_TABLE_SIZE: usize = 4096;
/// The longest pause between connect(2) attempts while guardd's listen backlog is full.
const BACKLOG_RETRY_MAX: Duration = Duration::from_millis(5);
/// Received DATA bytes after which the flow-control window is given back: half the protocol's
/// initial window (65,535), which this client never changes. guardd's replies are far smaller,
/// so a PAM transaction normally never sends a WINDOW_UPDATE; a large reply still cannot stall.
const WINDOW_REFILL: u32 = 32 * 1024;
/// How much one read(2) asks for: a whole frame of the largest size and its header.
const READ_CHUNK: usize = MAX_FRAME + 9;
/// Acknowledgements held for the next request at most (bytes): a server that sends SETTINGS
/// without end gets them at once beyond this, instead of growing the host's memory.
const MAX_PENDING: usize = 16 * 9;

/// Why a call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// No guardd: no socket file (ENOENT), or nobody listening on it (ECONNREFUSED).
    #[error("no guardd at {path}: {errno}")]
    Absent { path: PathBuf, errno: Errno },
    /// The deadline passed: connecting (a listen backlog full to the end), writing or reading.
    #[error("guardd did not answer within {0:?}")]
    TimedOut(Duration),
    /// guardd answered with a gRPC status other than OK.
    #[error("{message} (gRPC status {code})")]
    Status { code: u32, message: String },
    /// Anything else: the socket failed, guardd hung up, or sent what this client cannot read.
    #[error("{0}")]
    Failed(String),
}

/// gRPC status codes that are guardd refusing the request itself rather than failing.
pub const INVALID_ARGUMENT: u32 = 3;
pub const PERMISSION_DENIED: u32 = 7;
pub const UNAUTHENTICATED: u32 = 16;

/// One HTTP/2 connection to guardd, used for one call at a time.
pub struct Connection {
    stream: UnixStream,
    path: PathBuf,
    next_stream: u32,
    encoder: loona_hpack::Encoder<'static>,
    decoder: loona_hpack::Decoder<'static>,
    opened: Instant,
    /// Set once guardd said GOAWAY, or stopped reading: no new stream may start on this
    /// connection.
    going_away: bool,
    /// Frames that go out with the next call's request, in the same write: the preface and
    /// SETTINGS of a new connection, the acknowledgement of guardd's SETTINGS. Each write wakes
    /// guardd; a login pays for one per call, not one per frame.
    pending: Vec<u8>,
    /// Bytes read from the socket and not yet taken as frames (from `taken` on): guardd's
    /// answer usually arrives in one read.
    input: Vec<u8>,
    taken: usize,
    /// DATA bytes received on the connection since its window was last given back.
    unacked: u32,
}

impl Connection {
    /// Connects to `path`. The preface and this client's SETTINGS go out with the first call
    /// (guardd's SETTINGS are read with its first answer: no round trip waits for them).
    pub fn open(path: &Path, timeout: Duration) -> Result<Connection, WireError> {
        let deadline = Instant::now() + timeout;
        let stream = connect(path, deadline, timeout)?;
        // guardd's dynamic table may not outgrow SETTINGS_HEADER_TABLE_SIZE, which this client
        // leaves at its default (RFC 9113 §6.5.2): a larger size update is a COMPRESSION_ERROR.
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        let mut conn = Connection {
            stream,
            path: path.to_owned(),
            next_stream: 1,
            encoder: loona_hpack::Encoder::new(),
            decoder,
            opened: Instant::now(),
            going_away: false,
            pending: PREFACE.to_vec(),
            input: Vec::with_capacity(2 * READ_CHUNK),
            taken: 0,
            unacked: 0,
        };
        // SETTINGS_ENABLE_PUSH = 0: guardd never pushes, and this client could not take it.
        frame(&mut conn.pending, SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 0]);
        Ok(conn)
    }

    /// When this connection was opened (guardd closes it after `proto::MAX_CONNECTION_AGE`).
    pub fn age(&self) -> Duration {
        self.opened.elapsed()
    }

    /// Whether a new call must use a new connection.
    pub fn is_closing(&self) -> bool {
        self.going_away
    }

    /// The socket path this connection was opened to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One unary call: `request` (a prost-encoded message) to `method` (e.g.
    /// `/soffid.otp.v1.Guard/Begin`); returns the reply message's bytes. Bounded by `timeout`.
    pub fn call(
        &mut self,
        method: &str,
        request: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, WireError> {
        let deadline = Instant::now() + timeout;
        if self.going_away {
            return Err(WireError::Failed("guardd is closing the connection".into()));
        }
        let id = self.next_stream;
        self.next_stream += 2;
        let deadline_header = grpc_timeout(timeout);
        let headers: [(&[u8], &[u8]); 7] = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", method.as_bytes()),
            (b":authority", b"guardd"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-timeout", deadline_header.as_bytes()),
        ];
        if request.len() + 5 > MAX_FRAME {
            return Err(WireError::Failed("request too large".into()));
        }
        let block = self.encoder.encode(headers);
        if block.len() > MAX_FRAME {
            return Err(WireError::Failed("request too large".into()));
        }
        // The request may hold a code (Answer): every buffer it is copied into is zeroized, on
        // every path. Sized up front, so that no reallocation leaves a copy behind.
        let mut out = Zeroizing::new(Vec::with_capacity(
            self.pending.len() + block.len() + request.len() + 32,
        ));
        out.append(&mut self.pending);
        frame(&mut out, HEADERS, END_HEADERS, id, &block);
        let mut message = Zeroizing::new(Vec::with_capacity(request.len() + 5));
        message.push(0);
        message.extend_from_slice(&(request.len() as u32).to_be_bytes());
        message.extend_from_slice(request);
        frame(&mut out, DATA, END_STREAM, id, &message);
        self.send(&out, deadline, timeout)?;
        self.read_reply(id, deadline, timeout)
    }

    /// Reads frames until stream `id` ends; answers SETTINGS and PING on the way.
    fn read_reply(
        &mut self,
        id: u32,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Vec<u8>, WireError> {
        let mut body = Vec::new();
        // DATA bytes of this stream not yet given back to its window.
        let mut stream_unacked = 0u32;
        let mut status: Option<(u32, String)> = None;
        let mut block: Option<Vec<u8>> = None;
        // Whether the header block being read ends the stream (set on its HEADERS frame).
        let mut ends_stream = false;
        loop {
            let (kind, flags, stream, payload) = self.read_frame(deadline, timeout)?;
            if kind == DATA {
                // The connection's window counts DATA on every stream, this call's or not.
                self.unacked += payload.len() as u32;
                if self.unacked >= WINDOW_REFILL {
                    let mut update = Vec::with_capacity(13);
                    frame(
                        &mut update,
                        WINDOW_UPDATE,
                        0,
                        0,
                        &self.unacked.to_be_bytes(),
                    );
                    self.unacked = 0;
                    self.send_control(&update, deadline, timeout);
                }
            }
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    if payload.len() % 6 != 0 || stream != 0 {
                        return Err(WireError::Failed("malformed SETTINGS".into()));
                    }
                    // Acknowledged with the next request: sent now, it would wake guardd in the
                    // middle of its answer for nothing this client needs. A connection that
                    // makes one call (a permit, the account or session stage) never sends it:
                    // guardd (h2) sets no deadline for it and keeps its defaults until then,
                    // and a server that did would close the connection, a failure (closed).
                    frame(&mut self.pending, SETTINGS, ACK, 0, &[]);
                    if self.pending.len() >= MAX_PENDING {
                        let acks = std::mem::take(&mut self.pending);
                        self.send_control(&acks, deadline, timeout);
                    }
                }
                PING if flags & ACK == 0 => {
                    let mut pong = Vec::with_capacity(17);
                    frame(&mut pong, PING, ACK, 0, &payload);
                    self.send_control(&pong, deadline, timeout);
                }
                GOAWAY => {
                    self.going_away = true;
                    let last = payload
                        .get(..4)
                        .map(|b| u32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]]))
                        .unwrap_or(0);
                    if last < id {
                        return Err(WireError::Failed(
                            "guardd closed the connection before the call".into(),
                        ));
                    }
                }
                RST_STREAM if stream == id => {
                    return Err(WireError::Failed("guardd reset the call".into()));
                }
                DATA if stream == id => {
                    let data = unpad(flags, &payload)?;
                    if body.len() + data.len() > MAX_MESSAGE + 5 {
                        return Err(WireError::Failed("reply too large".into()));
                    }
                    body.extend_from_slice(data);
                    // Flow control counts whole DATA payloads, padding included.
                    stream_unacked += payload.len() as u32;
                    if stream_unacked >= WINDOW_REFILL && flags & END_STREAM == 0 {
                        let mut update = Vec::with_capacity(13);
                        frame(
                            &mut update,
                            WINDOW_UPDATE,
                            0,
                            id,
                            &stream_unacked.to_be_bytes(),
                        );
                        stream_unacked = 0;
                        self.send_control(&update, deadline, timeout);
                    }
                    if flags & END_STREAM != 0 {
                        return Err(WireError::Failed("the reply ended without a status".into()));
                    }
                }
                HEADERS | CONTINUATION if stream == id => {
                    let fragment = if kind == HEADERS {
                        if block.is_some() {
                            return Err(WireError::Failed("unexpected HEADERS".into()));
                        }
                        ends_stream = flags & END_STREAM != 0;
                        headers_fragment(flags, &payload)?
                    } else if block.is_none() {
                        return Err(WireError::Failed("CONTINUATION without HEADERS".into()));
                    } else {
                        &payload[..]
                    };
                    let acc = block.get_or_insert_with(Vec::new);
                    acc.extend_from_slice(fragment);
                    if acc.len() > MAX_HEADER_BLOCK {
                        return Err(WireError::Failed("header block too large".into()));
                    }
                    if flags & END_HEADERS == 0 {
                        continue;
                    }
                    let done = block.take().unwrap_or_default();
                    // Only the fields this client reads are kept, each in one buffer: a block of
                    // references to a large table entry must not become a copy per reference.
                    let mut http_status: Option<Vec<u8>> = None;
                    let mut code: Option<u32> = None;
                    let mut message: Option<Vec<u8>> = None;
                    self.decoder
                        .decode_with_cb(&done, |name, value| match &name[..] {
                            b":status" if http_status.is_none() && value[..] != b"200"[..] => {
                                http_status = Some(value.into_owned());
                            }
                            b"grpc-status" => {
                                code = Some(
                                    std::str::from_utf8(&value)
                                        .ok()
                                        .and_then(|v| v.parse().ok())
                                        .unwrap_or(2),
                                );
                            }
                            b"grpc-message" => {
                                let m = message.get_or_insert_with(Vec::new);
                                m.clear();
                                m.extend_from_slice(&value);
                            }
                            _ => {}
                        })
                        .map_err(|e| WireError::Failed(format!("bad header block: {e:?}")))?;
                    if let Some(value) = http_status {
                        return Err(WireError::Failed(format!(
                            "HTTP status {}",
                            String::from_utf8_lossy(&value)
                        )));
                    }
                    if code.is_some() || message.is_some() {
                        let s = status.get_or_insert((2, String::new()));
                        if let Some(code) = code {
                            s.0 = code;
                        }
                        if let Some(message) = message {
                            s.1 = percent_decode(&message);
                        }
                    }
                    // The call ends with the trailers (or a trailers-only answer).
                    if ends_stream || status.is_some() {
                        return finish(status, body);
                    }
                }
                // WINDOW_UPDATE, SETTINGS acknowledgements, PING answers, frames of other
                // streams and unknown types are ignored (RFC 9113 §4.1).
                _ => {}
            }
        }
    }

    fn read_frame(
        &mut self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(u8, u8, u32, Vec<u8>), WireError> {
        let head: [u8; 9] = self
            .take(9, deadline, timeout)?
            .try_into()
            .unwrap_or([0; 9]);
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        if len > MAX_FRAME {
            return Err(WireError::Failed("frame larger than allowed".into()));
        }
        let stream = u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]);
        let payload = self.take(len, deadline, timeout)?.to_vec();
        Ok((head[3], head[4], stream, payload))
    }

    /// The next `n` bytes guardd sent, reading more (a chunk at a time) when fewer are buffered.
    fn take(&mut self, n: usize, deadline: Instant, timeout: Duration) -> Result<&[u8], WireError> {
        if self.input.len() - self.taken < n {
            // Keep what is left at the front; the buffer never grows past one chunk and a frame.
            self.input.drain(..self.taken);
            self.taken = 0;
            while self.input.len() < n {
                self.read_more(deadline, timeout)?;
            }
        }
        let at = self.taken;
        self.taken += n;
        Ok(&self.input[at..at + n])
    }

    /// One read(2) of up to `READ_CHUNK` bytes onto the end of `input`, straight into its spare
    /// room (reserved at open: what is left before a read is less than a frame, so the buffer
    /// never reallocates).
    fn read_more(&mut self, deadline: Instant, timeout: Duration) -> Result<(), WireError> {
        let filled = self.input.len();
        self.input.resize(filled + READ_CHUNK, 0);
        let got = loop {
            let left = match remaining(deadline, timeout) {
                Ok(left) => left,
                Err(e) => break Err(e),
            };
            if let Err(e) = self.stream.set_read_timeout(Some(left)) {
                break Err(WireError::Failed(format!("socket: {e}")));
            }
            match self.stream.read(&mut self.input[filled..]) {
                Ok(0) => break Err(WireError::Failed("guardd closed the connection".into())),
                Ok(n) => break Ok(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break Err(WireError::TimedOut(timeout))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(WireError::Failed(format!("read: {e}"))),
            }
        };
        self.input.truncate(filled + *got.as_ref().unwrap_or(&0));
        got.map(|_| ())
    }

    /// Sends a frame the answer being read does not depend on (an acknowledgement, a window
    /// update). guardd may stop reading once it has written a complete answer (it closes the
    /// connection: shutdown, end of its age): the answer is then still read to its end, and
    /// the connection is not used for another call.
    fn send_control(&mut self, bytes: &[u8], deadline: Instant, timeout: Duration) {
        if self.send(bytes, deadline, timeout).is_err() {
            self.going_away = true;
        }
    }

    /// Writes all of `bytes` with `send(MSG_NOSIGNAL)`: a hung-up guardd is an error, never a
    /// SIGPIPE that would end a host that keeps its default action.
    fn send(
        &mut self,
        mut bytes: &[u8],
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), WireError> {
        while !bytes.is_empty() {
            let left = remaining(deadline, timeout)?;
            self.stream
                .set_write_timeout(Some(left))
                .map_err(|e| WireError::Failed(format!("socket: {e}")))?;
            match socket::send(
                std::os::fd::AsRawFd::as_raw_fd(&self.stream),
                bytes,
                MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => bytes = &bytes[n..],
                Err(Errno::EAGAIN) => return Err(WireError::TimedOut(timeout)),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(WireError::Failed(format!("write: {e}"))),
            }
        }
        Ok(())
    }
}

/// connect(2), tried again while guardd's listen backlog is full (EAGAIN): any local user can
/// keep it full for a moment, which says nothing about guardd; the deadline bounds the tries.
fn connect(path: &Path, deadline: Instant, timeout: Duration) -> Result<UnixStream, WireError> {
    let addr = UnixAddr::new(path).map_err(|e| WireError::Failed(format!("socket path: {e}")))?;
    let mut pause = Duration::from_millis(1);
    loop {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| WireError::Failed(format!("socket: {e}")))?;
        match socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd()), &addr) {
            Ok(()) => {
                let stream = UnixStream::from(fd);
                stream
                    .set_nonblocking(false)
                    .map_err(|e| WireError::Failed(format!("socket: {e}")))?;
                return Ok(stream);
            }
            Err(errno @ (Errno::ENOENT | Errno::ECONNREFUSED)) => {
                return Err(WireError::Absent {
                    path: path.to_owned(),
                    errno,
                })
            }
            Err(Errno::EAGAIN) => {
                let left = remaining(deadline, timeout)?;
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(BACKLOG_RETRY_MAX);
            }
            Err(e) => return Err(WireError::Failed(format!("connect: {e}"))),
        }
    }
}

/// What is left of the deadline, or TimedOut.
fn remaining(deadline: Instant, timeout: Duration) -> Result<Duration, WireError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(WireError::TimedOut(timeout))
    } else {
        Ok(left)
    }
}

/// Appends one frame to `out`.
fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = (payload.len() as u32).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// A DATA payload without its padding.
fn unpad(flags: u8, payload: &[u8]) -> Result<&[u8], WireError> {
    if flags & PADDED == 0 {
        return Ok(payload);
    }
    let pad = *payload
        .first()
        .ok_or_else(|| WireError::Failed("bad padding".into()))? as usize;
    payload
        .get(1..payload.len().saturating_sub(pad))
        .filter(|_| pad < payload.len())
        .ok_or_else(|| WireError::Failed("bad padding".into()))
}

/// A HEADERS payload's header block fragment, without padding and priority.
fn headers_fragment(flags: u8, payload: &[u8]) -> Result<&[u8], WireError> {
    let body = unpad(flags, payload)?;
    if flags & PRIORITY == 0 {
        return Ok(body);
    }
    body.get(5..)
        .ok_or_else(|| WireError::Failed("bad HEADERS priority".into()))
}

/// The reply message out of the gRPC length-prefixed body, or the call's error status.
fn finish(status: Option<(u32, String)>, body: Vec<u8>) -> Result<Vec<u8>, WireError> {
    match status {
        Some((0, _)) => {}
        Some((code, message)) => return Err(WireError::Status { code, message }),
        None => return Err(WireError::Failed("the reply has no gRPC status".into())),
    }
    let Some(prefix) = body.get(..5) else {
        return Err(WireError::Failed("the reply has no message".into()));
    };
    if prefix[0] != 0 {
        return Err(WireError::Failed("a compressed reply".into()));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if body.len() != 5 + len {
        return Err(WireError::Failed("the reply's length is wrong".into()));
    }
    Ok(body[5..].to_vec())
}

/// The `grpc-timeout` header for `timeout` (whole milliseconds, at most 8 digits).
fn grpc_timeout(timeout: Duration) -> String {
    format!("{}m", timeout.as_millis().clamp(1, 99_999_999))
}

/// A `grpc-message` value, percent-decoded (invalid sequences kept as they are).
fn percent_decode(value: &[u8]) -> String {
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if value[i] == b'%' {
            if let Some(byte) = value
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(value[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn frames_padding_and_status() {
        let mut out = Vec::new();
        frame(&mut out, DATA, END_STREAM, 3, b"abc");
        assert_eq!(out, [0, 0, 3, 0, 1, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(unpad(PADDED, &[2, b'x', 0, 0]).unwrap(), b"x");
        assert!(unpad(PADDED, &[9, b'x']).is_err());
        assert!(unpad(PADDED, &[]).is_err());
        assert_eq!(
            headers_fragment(PRIORITY, &[0, 0, 0, 1, 16, 7]).unwrap(),
            [7]
        );
        assert!(headers_fragment(PRIORITY, &[0, 0]).is_err());
        assert_eq!(percent_decode(b"a%20b%zz%"), "a b%zz%");
        assert_eq!(grpc_timeout(Duration::from_secs(5)), "5000m");
        assert_eq!(
            finish(Some((0, String::new())), vec![0, 0, 0, 0, 2, 8, 1]).unwrap(),
            [8, 1]
        );
        assert!(matches!(
            finish(Some((7, "no".into())), Vec::new()),
            Err(WireError::Status { code: 7, .. })
        ));
        assert!(finish(None, vec![0, 0, 0, 0, 0]).is_err());
        assert!(finish(Some((0, String::new())), vec![0, 0, 0, 0, 5, 1]).is_err());
    }

    /// A "guardd" that reads the request and answers with `reply` (raw bytes), then holds the
    /// connection open until the test ends.
    fn fake(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut conn, &mut buf);
            let _ = std::io::Write::write_all(&mut conn, reply);
            std::thread::sleep(Duration::from_secs(5));
        });
        (dir, path)
    }

    fn call(path: &Path, timeout: Duration) -> Result<Vec<u8>, WireError> {
        Connection::open(path, timeout)?.call("/soffid.otp.v1.Guard/Begin", b"", timeout)
    }

    #[test]
    fn a_silent_daemon_is_a_timeout_within_the_deadline() {
        let (_dir, path) = fake(b"");
        let started = Instant::now();
        let err = call(&path, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, WireError::TimedOut(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn what_no_http2_server_sends_is_a_failure_not_a_panic() {
        // A frame longer than allowed; a GOAWAY before the call; a RST_STREAM; a DATA frame that
        // ends the stream without a status; a header block that does not decode.
        let replies: [&'static [u8]; 5] = [
            b"\xff\xff\xff\x00\x00\x00\x00\x00\x01",
            b"\x00\x00\x08\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            b"\x00\x00\x04\x03\x00\x00\x00\x00\x01\x00\x00\x00\x02",
            b"\x00\x00\x05\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00",
            b"\x00\x00\x02\x01\x05\x00\x00\x00\x01\xff\xff",
        ];
        for reply in replies {
            let (_dir, path) = fake(reply);
            let err = call(&path, Duration::from_secs(2)).unwrap_err();
            assert!(matches!(err, WireError::Failed(_)), "{reply:?}: {err:?}");
        }
    }

    #[test]
    fn a_trailers_only_status_is_the_call_s_error() {
        // HEADERS, END_STREAM | END_HEADERS, on stream 1: ":status: 200" (static index 8),
        // then "grpc-status: 7" and "grpc-message: no%20way" as literals without indexing.
        let (_dir, path) = fake(
            b"\x00\x00\x27\x01\x05\x00\x00\x00\x01\x88\x00\x0bgrpc-status\x017\x00\x0cgrpc-message\x08no%20way",
        );
        match call(&path, Duration::from_secs(2)) {
            Err(WireError::Status { code, message }) => {
                assert_eq!((code, message.as_str()), (7, "no way"))
            }
            other => panic!("{other:?}"),
        }
    }

    /// A complete OK answer on stream `id`: response headers, `message`, trailers.
    pub(crate) fn ok_reply(id: u32, message: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame(&mut out, HEADERS, END_HEADERS, id, &[0x88]);
        let mut body = vec![0];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message);
        frame(&mut out, DATA, 0, id, &body);
        // grpc-status: 0, a literal without indexing.
        frame(
            &mut out,
            HEADERS,
            END_HEADERS | END_STREAM,
            id,
            b"\x00\x0bgrpc-status\x010",
        );
        out
    }

    /// Like `fake`, with a reply built at run time.
    pub(crate) fn fake_owned(reply: Vec<u8>) -> (tempfile::TempDir, PathBuf) {
        fake(Box::leak(reply.into_boxed_slice()))
    }

    #[test]
    fn a_continuation_without_headers_is_not_a_header_block() {
        // The trailers sent as a CONTINUATION that follows no HEADERS (RFC 9113 §6.10).
        let mut reply = ok_reply(1, b"\x08\x01");
        let at = reply.len() - 15 - 9 + 3;
        assert_eq!(reply[at], HEADERS);
        reply[at] = CONTINUATION;
        let (_dir, path) = fake_owned(reply);
        let err = call(&path, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, WireError::Failed(_)), "{err:?}");
    }

    #[test]
    fn a_dynamic_table_larger_than_the_settings_allow_is_refused() {
        // RFC 7541 §4.2, RFC 9113 §4.3: a size update above SETTINGS_HEADER_TABLE_SIZE (4096,
        // this client never raises it) is a COMPRESSION_ERROR. Here, 1 MiB before ":status 200".
        let mut reply = ok_reply(1, b"");
        reply[2] += 4;
        reply.splice(9..9, [0x3f, 0xe1, 0xff, 0x3f]);
        let (_dir, path) = fake_owned(reply);
        let err = call(&path, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, WireError::Failed(_)), "{err:?}");
    }

    /// A "guardd" that, for each of `replies`, reads once (one write of the client arrives whole
    /// in one read) and answers with it; then reads what else comes within a second. Returns
    /// what each read got.
    fn recording(
        replies: Vec<Vec<u8>>,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        std::sync::mpsc::Receiver<Vec<Vec<u8>>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut reads = Vec::new();
            let mut buf = vec![0u8; 65536];
            for reply in replies {
                let n = std::io::Read::read(&mut conn, &mut buf).unwrap();
                reads.push(buf[..n].to_vec());
                std::io::Write::write_all(&mut conn, &reply).unwrap();
            }
            conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut rest = Vec::new();
            while let Ok(n @ 1..) = std::io::Read::read(&mut conn, &mut buf) {
                rest.extend_from_slice(&buf[..n]);
            }
            reads.push(rest);
            let _ = tx.send(reads);
        });
        (dir, path, rx)
    }

    /// The (type, flags, stream) of each frame in `bytes`, after the preface if it starts so.
    fn frames_in(bytes: &[u8]) -> Vec<(u8, u8, u32)> {
        let mut at = if bytes.starts_with(PREFACE) {
            PREFACE.len()
        } else {
            0
        };
        let mut out = Vec::new();
        while at + 9 <= bytes.len() {
            let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
            let stream =
                u32::from_be_bytes([bytes[at + 5], bytes[at + 6], bytes[at + 7], bytes[at + 8]]);
            out.push((bytes[at + 3], bytes[at + 4], stream));
            at += 9 + len;
        }
        assert_eq!(at, bytes.len(), "whole frames");
        out
    }

    #[test]
    fn each_call_is_one_write_and_guardds_settings_are_acknowledged_with_the_next() {
        // Each write wakes guardd: the preface and SETTINGS go with the first request, the
        // acknowledgement of guardd's SETTINGS with the second, and nothing is sent in between.
        let mut first = Vec::new();
        frame(&mut first, SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 8]);
        first.extend_from_slice(&ok_reply(1, b"\x08\x01"));
        let (_dir, path, reads) = recording(vec![first, ok_reply(3, b"\x08\x02")]);
        let timeout = Duration::from_secs(2);
        let mut conn = Connection::open(&path, timeout).unwrap();
        assert_eq!(conn.call("/a/B", b"x", timeout).unwrap(), b"\x08\x01");
        assert_eq!(conn.call("/a/B", b"y", timeout).unwrap(), b"\x08\x02");
        drop(conn);
        let reads = reads.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(reads[0].starts_with(PREFACE));
        assert_eq!(
            frames_in(&reads[0]),
            [
                (SETTINGS, 0, 0),
                (HEADERS, END_HEADERS, 1),
                (DATA, END_STREAM, 1)
            ]
        );
        assert_eq!(
            frames_in(&reads[1]),
            [
                (SETTINGS, ACK, 0),
                (HEADERS, END_HEADERS, 3),
                (DATA, END_STREAM, 3)
            ]
        );
        assert!(reads[2].is_empty(), "{:?}", frames_in(&reads[2]));
    }

    #[test]
    fn a_reply_larger_than_half_the_window_gives_the_window_back_as_it_arrives() {
        // 45,000 bytes of message in three DATA frames: past 32 KiB the connection's and the
        // stream's windows are given back, so a reply up to the 64 KiB limit never stalls.
        let message = vec![7u8; 45_000 - 5];
        let mut body = vec![0];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(&message);
        let mut reply = Vec::new();
        frame(&mut reply, HEADERS, END_HEADERS, 1, &[0x88]);
        for chunk in body.chunks(15_000) {
            frame(&mut reply, DATA, 0, 1, chunk);
        }
        frame(
            &mut reply,
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            b"\x00\x0bgrpc-status\x010",
        );
        let (_dir, path, reads) = recording(vec![reply]);
        let timeout = Duration::from_secs(2);
        let mut conn = Connection::open(&path, timeout).unwrap();
        let reserved = conn.input.capacity();
        assert_eq!(conn.call("/a/B", b"x", timeout).unwrap(), message);
        // Read a chunk at a time into the room reserved at open: never reallocated.
        assert_eq!(conn.input.capacity(), reserved);
        drop(conn);
        let reads = reads.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(
            frames_in(&reads[1]),
            [(WINDOW_UPDATE, 0, 0), (WINDOW_UPDATE, 0, 1)]
        );
    }

    #[test]
    fn data_on_another_stream_still_counts_against_the_connection_window() {
        // Ignored, but it used up the connection's window: given back, or the server stalls.
        let mut reply = Vec::new();
        for _ in 0..3 {
            frame(&mut reply, DATA, 0, 3, &[0u8; 15_000]);
        }
        reply.extend_from_slice(&ok_reply(1, b"\x08\x01"));
        let (_dir, path, reads) = recording(vec![reply]);
        let timeout = Duration::from_secs(2);
        let mut conn = Connection::open(&path, timeout).unwrap();
        assert_eq!(conn.call("/a/B", b"x", timeout).unwrap(), b"\x08\x01");
        drop(conn);
        let reads = reads.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(frames_in(&reads[1]), [(WINDOW_UPDATE, 0, 0)]);
    }

    #[test]
    fn settings_without_end_are_acknowledged_in_bounded_batches() {
        let mut reply = Vec::new();
        for _ in 0..1000 {
            frame(&mut reply, SETTINGS, 0, 0, &[]);
        }
        reply.extend_from_slice(&ok_reply(1, b"\x08\x01"));
        let (_dir, path, reads) = recording(vec![reply]);
        let timeout = Duration::from_secs(2);
        let mut conn = Connection::open(&path, timeout).unwrap();
        assert_eq!(conn.call("/a/B", b"x", timeout).unwrap(), b"\x08\x01");
        assert!(conn.pending.len() < MAX_PENDING);
        let held = conn.pending.len() / 9;
        drop(conn);
        let reads = reads.recv_timeout(Duration::from_secs(5)).unwrap();
        let acks = frames_in(&reads[1]);
        assert!(acks.iter().all(|f| *f == (SETTINGS, ACK, 0)));
        assert_eq!(acks.len() + held, 1000);
    }

    #[test]
    fn no_socket_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let err = call(&dir.path().join("none.sock"), Duration::from_secs(1)).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::Absent {
                    errno: Errno::ENOENT,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
