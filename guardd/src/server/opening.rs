//! Holds back the frames HTTP/2 opens a connection with until the first answer, so that they
//! leave in one write with it. The server sends its SETTINGS as soon as it accepts, and its
//! acknowledgement of the client's SETTINGS as soon as it reads them: two writes before the
//! answer, each of which wakes a client already waiting to read (the PAM module inside sshd or
//! sudo), only for it to find no answer yet and wait again. Held, the client wakes once.
//!
//! HTTP/2 lets a client send its requests without waiting for the server's SETTINGS, and every
//! client of guardd does. One that waits anyway gets them after `HOLD_FOR` at most. The server
//! enforces its own limits (stream window, frame and header sizes) from the start, whatever the
//! client has seen of them, so holding them back weakens none. Nothing else
//! is held: the first frame of a stream, or any other kind of frame, sends everything at once
//! and ends the holding for good; so does `HOLD_MAX` bytes held, so a client that makes the
//! server answer many PINGs before its first call cannot grow guardd's memory.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest the opening frames wait for the first answer: well above a login's call (under
/// a millisecond on a quiet server), and a wait only for a client that waits for them.
const HOLD_FOR: Duration = Duration::from_millis(20);
/// The most bytes held; more are sent at once.
const HOLD_MAX: usize = 4096;

/// Frame types the server may open with on stream 0 and that are held: SETTINGS (and its
/// acknowledgement), PING, WINDOW_UPDATE.
const HELD_TYPES: [u8; 3] = [0x4, 0x6, 0x8];

/// A connection's stream, with the server's opening frames held back (see the module's note).
pub(super) struct Opening<S> {
    inner: S,
    /// Written by the server, not yet sent; `sent` of them already are.
    held: Vec<u8>,
    sent: usize,
    /// Whether writes are still held.
    holding: bool,
    /// Whether the server has written a frame that ends the holding: sent at the next flush.
    answered: bool,
    /// When the holding ends without an answer; armed at the first flush held.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The frame header being read from the written bytes, and how much of it is in.
    header: [u8; 9],
    header_len: usize,
    /// Payload bytes of the current frame still to pass over.
    skip: usize,
}

impl<S> Opening<S> {
    pub(super) fn new(inner: S) -> Opening<S> {
        Opening {
            inner,
            held: Vec::new(),
            sent: 0,
            holding: true,
            answered: false,
            deadline: None,
            header: [0; 9],
            header_len: 0,
            skip: 0,
        }
    }

    /// Follows the frames in `bytes` (the server's, which start at a frame boundary) and marks
    /// the first one that is not an opening frame.
    fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.answered {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == 9 {
                let h = self.header;
                let length = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                self.answered = stream != 0 || !HELD_TYPES.contains(&h[3]);
                self.skip = length;
                self.header_len = 0;
            }
        }
    }

    /// Ends the holding: what is held goes out before anything else.
    fn release(&mut self) {
        self.holding = false;
        self.deadline = None;
    }
}

impl<S: AsyncWrite + Unpin> Opening<S> {
    /// Sends what is held.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        // Not kept for the connection's life.
        self.held = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Holds `bufs` if still holding and they fit; false when they were not taken.
    fn hold(&mut self, bufs: &[io::IoSlice<'_>]) -> bool {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if !self.holding || self.held.len() + len > HOLD_MAX {
            self.release();
            return false;
        }
        for buf in bufs {
            self.scan(buf);
            self.held.extend_from_slice(buf);
        }
        true
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Opening<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Opening<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.hold(bufs) {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.holding {
            if this.answered {
                this.release();
            } else {
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(HOLD_FOR)));
                // Pending registers the connection's task to be polled, and so flushed, again
                // when the holding ends.
                if deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Ready(Ok(()));
                }
                this.release();
            }
        }
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.release();
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    }

    /// The server's end, held, and the client's, which reads without waiting.
    fn pair() -> (Opening<UnixStream>, std::os::unix::net::UnixStream) {
        let (server, client) = std::os::unix::net::UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        client.set_nonblocking(true).unwrap();
        (Opening::new(UnixStream::from_std(server).unwrap()), client)
    }

    /// What the client can read now, without waiting.
    fn readable_now(mut client: &std::os::unix::net::UnixStream) -> Vec<u8> {
        use std::io::Read;
        let mut buf = vec![0; 65536];
        match client.read(&mut buf) {
            Ok(n) => buf[..n].to_vec(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Vec::new(),
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn the_opening_frames_leave_with_the_first_answer_in_one_write() {
        let (mut server, client) = pair();
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let ack = frame(0x4, 0x1, 0, &[]);
        // Written and flushed as h2 does, split mid-header: nothing reaches the client.
        server.write_all(&settings[..5]).await.unwrap();
        server.write_all(&settings[5..]).await.unwrap();
        server.flush().await.unwrap();
        server.write_all(&ack).await.unwrap();
        server.flush().await.unwrap();
        tokio::task::yield_now().await;
        assert!(readable_now(&client).is_empty());
        // The answer: everything in one read.
        let headers = frame(0x1, 0x4, 1, &[0x88]);
        let data = frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]);
        server.write_all(&headers).await.unwrap();
        server.write_all(&data).await.unwrap();
        server.flush().await.unwrap();
        let all = [settings, ack, headers, data].concat();
        assert_eq!(readable_now(&client), all);
        // From then on, writes pass straight through.
        let ping = frame(0x6, 0x1, 0, &[0; 8]);
        server.write_all(&ping).await.unwrap();
        server.flush().await.unwrap();
        assert_eq!(readable_now(&client), ping);
    }

    #[tokio::test]
    async fn a_client_that_waits_for_the_settings_gets_them_after_the_hold() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let mut server = Opening::new(server);
        let settings = frame(0x4, 0, 0, &[]);
        server.write_all(&settings).await.unwrap();
        server.flush().await.unwrap();
        // The connection's task, as h2 runs it: flushes again whenever it is woken.
        let flusher = tokio::spawn(async move {
            for _ in 0..100 {
                std::future::poll_fn(|cx| {
                    let flushed = Pin::new(&mut server).poll_flush(cx);
                    match (flushed, server.holding) {
                        (Poll::Ready(Ok(())), true) => Poll::Pending,
                        (flushed, _) => flushed,
                    }
                })
                .await
                .unwrap();
                if !server.holding {
                    return server;
                }
            }
            panic!("never released");
        });
        let mut got = vec![0; settings.len()];
        tokio::time::timeout(Duration::from_secs(2), client.read_exact(&mut got))
            .await
            .expect("the settings arrive")
            .unwrap();
        assert_eq!(got, settings);
        flusher.await.unwrap();
    }

    #[tokio::test]
    async fn other_frames_and_too_much_held_are_sent_at_once() {
        // A GOAWAY on stream 0 is not an opening frame.
        let (mut server, client) = pair();
        let goaway = frame(0x7, 0, 0, &[0; 8]);
        server.write_all(&goaway).await.unwrap();
        server.flush().await.unwrap();
        assert_eq!(readable_now(&client), goaway);
        // PING answers beyond the cap: all sent, and the holding is over.
        let (mut server, client) = pair();
        let pong = frame(0x6, 0x1, 0, &[0; 8]);
        let mut written: Vec<u8> = Vec::new();
        while written.len() <= HOLD_MAX {
            server.write_all(&pong).await.unwrap();
            written.extend(&pong);
        }
        server.flush().await.unwrap();
        assert!(!server.holding);
        assert_eq!(readable_now(&client), written);
        assert_eq!(server.held.capacity(), 0);
    }
}
