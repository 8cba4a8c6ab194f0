//! How guardctl (and any tonic client) reaches guardd: an HTTP/2 channel over its Unix socket
//! that tells an absent guardd from a failing one and reconnects once its connection is old.

use std::io::IoSlice;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::RECONNECT_AFTER;

/// Why no channel to guardd could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No guardd is running: the socket does not exist (ENOENT) or nobody listens on it
    /// (ECONNREFUSED), as connect(2) reported. The only outcome a caller may take for "guardd is
    /// not there" rather than "guardd is failing".
    #[error("no guardd at {}: {source}", path.display())]
    Absent {
        path: PathBuf,
        source: std::io::Error,
    },
    /// connect(2) and the HTTP/2 handshake together took longer than the timeout.
    #[error("no answer from {} within {timeout:?}", path.display())]
    TimedOut { path: PathBuf, timeout: Duration },
    /// Anything else: connect(2) failed otherwise (EACCES, ...; a full listen backlog, EAGAIN,
    /// is tried again until the timeout), the HTTP/2 handshake failed, or a reconnect found
    /// guardd gone in the middle of a conversation.
    #[error("cannot connect to {}: {reason}", path.display())]
    Failed { path: PathBuf, reason: String },
}

/// Opens an HTTP/2 channel to guardd on the Unix socket at `path`.
///
/// `timeout` bounds the connection (socket connect and HTTP/2 handshake together) and every later
/// call on the channel, so a stopped or wedged daemon cannot hang the caller. The socket is
/// connected here first, so that connect(2)'s errno tells an absent guardd
/// ([`ConnectError::Absent`]) from a failing one; the channel dials again by itself if that
/// connection breaks later.
pub async fn connect(path: impl Into<PathBuf>, timeout: Duration) -> Result<Channel, ConnectError> {
    let path = path.into();
    match tokio::time::timeout(timeout, open(path.clone(), timeout)).await {
        Ok(opened) => opened,
        Err(_) => Err(ConnectError::TimedOut { path, timeout }),
    }
}

/// The longest pause between two connect(2) attempts while guardd's listen backlog is full.
const BACKLOG_RETRY_MAX: Duration = Duration::from_millis(5);

/// connect(2) to guardd's socket, tried again while its listen backlog is full (EAGAIN). Any
/// local user can keep the backlog full by connecting in a loop (guardd accepts, counts and
/// closes each connection, but the kernel queue refills faster than that), so a single EAGAIN
/// says nothing about guardd and must not refuse a login; guardd takes a queued connection every
/// few microseconds, and a retry a few milliseconds later gets in. The caller's timeout bounds
/// the retries: a backlog that stays full to the end is a timeout, never an absent guardd.
async fn connect_socket(path: &std::path::Path) -> std::io::Result<UnixStream> {
    let mut pause = Duration::from_millis(1);
    loop {
        match UnixStream::connect(path).await {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(BACKLOG_RETRY_MAX);
            }
            done => return done,
        }
    }
}

async fn open(path: PathBuf, timeout: Duration) -> Result<Channel, ConnectError> {
    let stream = match connect_socket(&path).await {
        Ok(stream) => stream,
        Err(source) if is_absent(&source) => return Err(ConnectError::Absent { path, source }),
        Err(e) => {
            return Err(ConnectError::Failed {
                path,
                reason: format!("connect: {e}"),
            })
        }
    };
    // The channel's connector hands out this stream first, and dials anew only if the channel
    // later has to reconnect on its own.
    let first = Arc::new(Mutex::new(Some(stream)));
    let dial = path.clone();
    // The URI is required by the API but unused: the connector below always dials the socket.
    Endpoint::from_static("http://[::1]:50051")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_| {
            let first = first.lock().ok().and_then(|mut first| first.take());
            let path = dial.clone();
            async move {
                let stream = match first {
                    Some(stream) => stream,
                    None => connect_socket(&path).await?,
                };
                Ok::<_, std::io::Error>(TokioIo::new(NoSigPipe(stream)))
            }
        }))
        .await
        .map_err(|e| ConnectError::Failed {
            path,
            reason: with_causes(&e),
        })
}

/// Whether connect(2) failed because no guardd is running: no socket file (ENOENT), or a socket
/// file nobody listens on, left behind by a guardd that died (ECONNREFUSED). Decided on the
/// errno: every other failure means a guardd is there and failing (EAGAIN, a full listen
/// backlog, is not even a failure: see `connect_socket`).
fn is_absent(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED))
}

/// An error and its causes on one line (tonic's transport error alone says "transport error").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// A channel to guardd that is opened anew once it gets old. guardd closes each connection
/// [`MAX_CONNECTION_AGE`](crate::MAX_CONNECTION_AGE) after it was opened, while a conversation may wait minutes for a person
/// to type a code; so before each call, [`Connection::channel`] reconnects when the connection is
/// older than [`RECONNECT_AFTER`]. The one way the PAM module and guardctl reach guardd. It starts
/// no thread: the channel's tasks run on the caller's runtime and end with it.
pub struct Connection {
    path: PathBuf,
    timeout: Duration,
    reconnect_after: Duration,
    opened: Instant,
    channel: Channel,
}

impl Connection {
    /// Connects to guardd at `path`; `timeout` as for [`connect`], also for every reconnect.
    pub async fn open(
        path: impl Into<PathBuf>,
        timeout: Duration,
    ) -> Result<Connection, ConnectError> {
        let path = path.into();
        let channel = connect(path.clone(), timeout).await?;
        Ok(Connection {
            path,
            timeout,
            reconnect_after: RECONNECT_AFTER,
            opened: Instant::now(),
            channel,
        })
    }

    /// Reconnects once the connection is older than `age` instead of [`RECONNECT_AFTER`]: for
    /// tests, which cannot wait that long.
    pub fn reconnect_after(mut self, age: Duration) -> Connection {
        self.reconnect_after = age;
        self
    }

    /// Whether the next call goes over a new connection.
    pub fn is_stale(&self) -> bool {
        self.opened.elapsed() >= self.reconnect_after
    }

    /// The channel for the next call: this connection's, or a new connection's when this one is
    /// older than the threshold. guardd was there when the conversation began, so a reconnect
    /// that finds no guardd is [`ConnectError::Failed`], never `Absent`.
    pub async fn channel(&mut self) -> Result<Channel, ConnectError> {
        if self.is_stale() {
            self.channel = match connect(self.path.clone(), self.timeout).await {
                Ok(channel) => channel,
                Err(ConnectError::Absent { path, source }) => {
                    return Err(ConnectError::Failed {
                        path,
                        reason: format!("reconnecting: guardd went away: {source}"),
                    })
                }
                Err(e) => return Err(e),
            };
            self.opened = Instant::now();
        }
        Ok(self.channel.clone())
    }
}

/// A socket that never raises SIGPIPE. The PAM module runs inside sshd, sudo or any other host,
/// some of which keep SIGPIPE's default action (terminate): a write to a daemon that has hung
/// up must be an error, not the host's death. Plain writes go out with `send(MSG_NOSIGNAL)`;
/// vectored writes would use `writev(2)`, which has no such flag, so this stream offers none.
struct NoSigPipe(UnixStream);

impl AsyncRead for NoSigPipe {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for NoSigPipe {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let buf = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &**b);
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const TIMEOUT: Duration = Duration::from_secs(2);

    /// A socket that accepts connections and holds them, counting them, and never says a word.
    fn counting_listener(path: &std::path::Path) -> Arc<AtomicUsize> {
        let listener = UnixListener::bind(path).unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let counted = count.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                counted.fetch_add(1, Ordering::SeqCst);
                held.push(conn);
            }
        });
        count
    }

    /// Waits until `count` reaches `n` (the listener's thread counts after the kernel queued the
    /// connection) and checks it goes no further.
    fn expect_count(count: &AtomicUsize, n: usize) {
        let deadline = Instant::now() + TIMEOUT;
        while count.load(Ordering::SeqCst) < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(count.load(Ordering::SeqCst), n);
    }

    #[tokio::test]
    async fn no_socket_or_nobody_listening_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.sock");
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        for path in [missing, stale] {
            match connect(&path, TIMEOUT).await {
                Err(ConnectError::Absent { source, .. }) => assert!(is_absent(&source)),
                other => panic!("{}: {other:?}", path.display()),
            }
        }
    }

    /// A full listen backlog (connect(2) says EAGAIN) means guardd is there: connecting goes on
    /// trying, and a backlog full to the end is a timeout, never an absence.
    #[tokio::test]
    async fn a_full_backlog_is_a_timeout_not_an_absence() {
        use nix::sys::socket::{listen, Backlog};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listen(&listener, Backlog::new(0).unwrap()).unwrap();
        let mut queued = Vec::new();
        let error = loop {
            match UnixStream::connect(&path).await {
                Ok(stream) => queued.push(stream),
                Err(e) => break e,
            }
            assert!(queued.len() < 16, "the backlog never filled");
        };
        assert_eq!(error.raw_os_error(), Some(libc::EAGAIN));
        assert!(!is_absent(&error));
        let short = Duration::from_millis(300);
        match connect(&path, short).await {
            Err(ConnectError::TimedOut { timeout, .. }) => assert_eq!(timeout, short),
            other => panic!("{other:?}"),
        }
    }

    /// Any local user can fill guardd's listen backlog for a moment by connecting in a loop: a
    /// connection that finds it full gets in as soon as guardd takes one from the queue, instead
    /// of failing at once (which refused root logins while a user flooded the socket).
    #[tokio::test]
    async fn a_backlog_full_for_a_moment_delays_the_connection_but_does_not_fail_it() {
        use nix::sys::socket::{listen, Backlog};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listen(&listener, Backlog::new(0).unwrap()).unwrap();
        let mut queued = Vec::new();
        loop {
            match UnixStream::connect(&path).await {
                Ok(stream) => queued.push(stream),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EAGAIN));
                    break;
                }
            }
        }
        // guardd gets to its queue 200 ms later, and from then on accepts and holds.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let mut held = Vec::new();
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                held.push(conn);
            }
        });
        let started = Instant::now();
        let stream = connect_socket(&path)
            .await
            .expect("connected once there was room");
        drop(stream);
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert!(started.elapsed() < TIMEOUT);
    }

    #[test]
    fn other_errnos_are_not_absence() {
        for errno in [libc::EAGAIN, libc::EACCES, libc::ENOTDIR, libc::ETIMEDOUT] {
            assert!(!is_absent(&std::io::Error::from_raw_os_error(errno)));
        }
        let made_up = std::io::Error::new(std::io::ErrorKind::NotFound, "not from connect(2)");
        assert!(!is_absent(&made_up), "decided on the errno, not the kind");
    }

    /// A call on a connection older than the threshold goes over a new connection.
    #[tokio::test]
    async fn an_old_connection_is_replaced_before_the_next_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("count.sock");
        let accepted = counting_listener(&path);
        let mut fresh = Connection::open(&path, TIMEOUT).await.unwrap();
        assert!(!fresh.is_stale());
        fresh.channel().await.unwrap();
        fresh.channel().await.unwrap();
        expect_count(&accepted, 1);
        let mut old = Connection::open(&path, TIMEOUT)
            .await
            .unwrap()
            .reconnect_after(Duration::ZERO);
        expect_count(&accepted, 2);
        assert!(old.is_stale());
        old.channel().await.unwrap();
        expect_count(&accepted, 3);
        old.channel().await.unwrap();
        expect_count(&accepted, 4);
    }

    /// guardd was there when the conversation began: a reconnect that finds it gone is a failure.
    #[tokio::test]
    async fn a_reconnect_that_finds_guardd_gone_is_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.sock");
        let _accepted = counting_listener(&path);
        let mut connection = Connection::open(&path, TIMEOUT)
            .await
            .unwrap()
            .reconnect_after(Duration::ZERO);
        std::fs::remove_file(&path).unwrap();
        match connection.channel().await {
            Err(ConnectError::Failed { reason, .. }) => assert!(reason.contains("went away")),
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("reconnected to a removed socket"),
        }
    }
}
