//! guardd-attack: what a hostile local user can do to guardd with nothing but access to its
//! socket. tests/tests/hostile.rs runs it as an unprivileged uid (`setpriv`) while root logs in
//! through the PAM module, and checks that root is still served.
//!
//! Every subcommand runs until `--seconds` have passed or it gets SIGTERM/SIGINT, writes `ready`
//! on stderr once its first burst is out (so a test knows the attack is in place), and ends with
//! one `key=value` line on stdout: `attack=NAME seconds=… sent=… ok=… refused_<gRPC code>=…
//! errors=…` and what else that attack counts.
//!
//! ```text
//! guardd-attack sessions --socket S --user ME --count 5000   # logins begun and never answered
//! guardd-attack backup   --socket S --user ME --parallel 16  # wrong backup codes, concurrently
//! guardd-attack halfsent --socket S --count 200              # 4 MB messages never finished
//! guardd-attack idle     --socket S --count 3000 [--preface half] # connections saying nothing
//! guardd-attack refused  --socket S                          # calls guardd must refuse
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use proto::v1::guard_client::GuardClient;
use proto::v1::{step, AnswerRequest, BeginRequest, DenyReason, ListRequest, LoginContext, Step};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(about = "Replays a hostile local user's attacks on guardd's socket")]
struct Cli {
    #[command(subcommand)]
    attack: Attack,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// guardd's socket
    #[arg(long)]
    socket: PathBuf,
    /// How long the attack lasts (SIGTERM ends it earlier, with the same summary)
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

#[derive(Subcommand)]
enum Attack {
    /// Begin COUNT logins of USER (our own, with an active token) and never answer them
    Sessions {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 5000)]
        count: usize,
        /// Connections the logins are spread over
        #[arg(long, default_value_t = 4)]
        connections: usize,
    },
    /// PARALLEL workers answer USER's logins with wrong backup-code-shaped codes, over and over
    Backup {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 16)]
        parallel: usize,
    },
    /// Open COUNT Begin streams declaring a 4,000,000-byte message, send BYTES of it, hold them
    Halfsent {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 200)]
        count: usize,
        /// Body bytes sent per stream (fewer than declared: the message never completes)
        #[arg(long, default_value_t = 1_000_000)]
        bytes: usize,
        /// Streams per connection at most, also when guardd would allow more
        #[arg(long, default_value_t = 100)]
        per_connection: usize,
    },
    /// Open COUNT connections and say nothing on them (or only the HTTP/2 preface)
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 3000)]
        count: usize,
        /// Which connections first send the HTTP/2 client preface and an empty SETTINGS frame
        /// (then nothing more): a connection past the handshake may be closed by other rules
        /// than a silent one
        #[arg(long, value_enum, default_value_t = Preface::None)]
        preface: Preface,
    },
    /// Flood calls guardd must refuse: List of every user's tokens, Begin for root
    Refused {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 32)]
        parallel: usize,
        #[arg(long, default_value_t = 4)]
        connections: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Preface {
    None,
    Half,
    All,
}

/// The 5-byte gRPC frame header of an uncompressed message of 4,000,000 bytes.
const DECLARED: u32 = 4_000_000;
/// Letters of a backup code (guardd/src/backup.rs).
const BACKUP_ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    raise_nofile();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let summary = runtime.block_on(async move {
        let (name, common) = match &cli.attack {
            Attack::Sessions { common, .. } => ("sessions", common.clone()),
            Attack::Backup { common, .. } => ("backup", common.clone()),
            Attack::Halfsent { common, .. } => ("halfsent", common.clone()),
            Attack::Idle { common, .. } => ("idle", common.clone()),
            Attack::Refused { common, .. } => ("refused", common.clone()),
        };
        let stop = Stop::after(Duration::from_secs(common.seconds));
        let tally = Tally::default();
        let started = Instant::now();
        let socket = common.socket.as_path();
        match cli.attack {
            Attack::Sessions {
                user,
                count,
                connections,
                ..
            } => sessions(socket, &user, count, connections, &stop, &tally).await,
            Attack::Backup { user, parallel, .. } => {
                backup(socket, &user, parallel, &stop, &tally).await
            }
            Attack::Halfsent {
                count,
                bytes,
                per_connection,
                ..
            } => halfsent(socket, count, bytes, per_connection, &stop, &tally).await,
            Attack::Idle { count, preface, .. } => {
                idle(socket, count, preface, &stop, &tally).await
            }
            Attack::Refused {
                parallel,
                connections,
                ..
            } => refused(socket, parallel, connections, &stop, &tally).await,
        }
        tally.summary(name, started.elapsed())
    });
    println!("{summary}");
    std::process::ExitCode::SUCCESS
}

/// Thousands of connections need more than the usual 1024 descriptors: the soft limit goes up
/// to the hard one, which any process may do.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Tells every task when the attack is over: at the deadline or on SIGTERM/SIGINT.
#[derive(Clone)]
struct Stop(watch::Receiver<bool>);

impl Stop {
    fn after(duration: Duration) -> Stop {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::time::sleep(duration) => {}
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            let _ = tx.send(true);
        });
        Stop(rx)
    }

    fn is_over(&self) -> bool {
        *self.0.borrow()
    }

    async fn wait(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|over| *over).await;
    }
}

/// What the attack did: calls sent, answered, refused by gRPC code, failed otherwise, and what
/// else the attack counts.
#[derive(Clone, Default)]
struct Tally(Arc<Mutex<Counts>>);

#[derive(Default)]
struct Counts {
    sent: u64,
    ok: u64,
    errors: u64,
    refused: BTreeMap<String, u64>,
    extra: BTreeMap<String, u64>,
    /// Extra values that are not counts (e.g. durations), printed as they are.
    notes: BTreeMap<String, String>,
}

impl Tally {
    fn sent(&self) {
        self.0.lock().unwrap().sent += 1;
    }

    fn ok(&self) {
        self.0.lock().unwrap().ok += 1;
    }

    fn error(&self) {
        self.0.lock().unwrap().errors += 1;
    }

    fn refused(&self, code: tonic::Code) {
        *self
            .0
            .lock()
            .unwrap()
            .refused
            .entry(format!("{code:?}"))
            .or_default() += 1;
    }

    fn count(&self, key: &str) {
        *self.0.lock().unwrap().extra.entry(key.into()).or_default() += 1;
    }

    fn set(&self, key: &str, value: u64) {
        self.0.lock().unwrap().extra.insert(key.into(), value);
    }

    fn note(&self, key: &str, value: String) {
        self.0.lock().unwrap().notes.insert(key.into(), value);
    }

    /// Counts one RPC's outcome; the step when guardd answered. A call that did not reach
    /// guardd at all (no connection) pauses a millisecond, so a closed door is not a busy loop.
    async fn rpc<T>(&self, result: Result<tonic::Response<T>, tonic::Status>) -> Option<T> {
        self.sent();
        match result {
            Ok(r) => {
                self.ok();
                Some(r.into_inner())
            }
            Err(status) => {
                self.refused(status.code());
                if status.code() == tonic::Code::Unavailable {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                None
            }
        }
    }

    fn summary(&self, name: &str, took: Duration) -> String {
        let c = self.0.lock().unwrap();
        let mut line = format!(
            "attack={name} seconds={:.1} sent={} ok={}",
            took.as_secs_f64(),
            c.sent,
            c.ok
        );
        for (code, n) in &c.refused {
            line += &format!(" refused_{code}={n}");
        }
        line += &format!(" errors={}", c.errors);
        for (k, n) in &c.extra {
            line += &format!(" {k}={n}");
        }
        for (k, v) in &c.notes {
            line += &format!(" {k}={v}");
        }
        line
    }
}

fn ready() {
    eprintln!("ready");
}

async fn channel(socket: &Path, tally: &Tally) -> Option<Channel> {
    match proto::connect(socket, Duration::from_secs(10)).await {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("connect: {e}");
            tally.error();
            None
        }
    }
}

async fn channels(socket: &Path, n: usize, tally: &Tally) -> Vec<Channel> {
    let mut all = Vec::new();
    for _ in 0..n.max(1) {
        if let Some(c) = channel(socket, tally).await {
            all.push(c);
        }
    }
    all
}

fn begin_request(user: &str) -> BeginRequest {
    BeginRequest {
        context: Some(LoginContext {
            user: user.into(),
            service: "attack".into(),
            ..LoginContext::default()
        }),
    }
}

/// Counts what kind of step guardd answered with.
fn count_step(tally: &Tally, step: &Step) {
    tally.count(match &step.kind {
        Some(step::Kind::Prompt(_)) => "prompt",
        Some(step::Kind::Permit(_)) => "permit",
        Some(step::Kind::Deny(_)) => "deny",
        None => "empty",
    });
}

/// Logins of our own user, begun as fast as they go and never answered.
async fn sessions(
    socket: &Path,
    user: &str,
    count: usize,
    connections: usize,
    stop: &Stop,
    tally: &Tally,
) {
    let channels = channels(socket, connections, tally).await;
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    // Several calls in flight per connection: HTTP/2 multiplexes them.
    for i in 0..channels.len() * 16 {
        let mut client = GuardClient::new(channels[i % channels.len()].clone());
        let (next, stop, tally, user) =
            (next.clone(), stop.clone(), tally.clone(), user.to_owned());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count && !stop.is_over() {
                if let Some(step) = tally.rpc(client.begin(begin_request(&user)).await).await {
                    count_step(&tally, &step);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    ready();
    // The prompts stay open on guardd's side; the connections stay open on ours.
    stop.wait().await;
    drop(channels);
}

/// A random string shaped like a backup code (`abcde-fghjk`), almost surely not one.
fn backup_shaped(state: &mut u64) -> String {
    let mut code = String::with_capacity(11);
    for i in 0..10 {
        // xorshift64
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        if i == 5 {
            code.push('-');
        }
        code.push(BACKUP_ALPHABET[(*state % BACKUP_ALPHABET.len() as u64) as usize] as char);
    }
    code
}

/// Logins of our own user answered with wrong backup codes, PARALLEL at a time, until the end.
async fn backup(socket: &Path, user: &str, parallel: usize, stop: &Stop, tally: &Tally) {
    let mut tasks = Vec::new();
    for i in 0..parallel.max(1) {
        let Some(channel) = channel(socket, tally).await else {
            continue;
        };
        let mut client = GuardClient::new(channel);
        let (stop, tally, user) = (stop.clone(), tally.clone(), user.to_owned());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let mut seed = ((std::process::id() as u64) << 32)
            ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ now
            | 1;
        tasks.push(tokio::spawn(async move {
            while !stop.is_over() {
                let Some(step) = tally.rpc(client.begin(begin_request(&user)).await).await else {
                    // Refused or failed: do not spin on an error faster than guardd answers.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                let Some(step::Kind::Prompt(prompt)) = step.kind else {
                    count_step(&tally, &step);
                    continue;
                };
                let answer = AnswerRequest {
                    challenge: prompt.challenge,
                    response: backup_shaped(&mut seed).into_bytes(),
                };
                let t = Instant::now();
                let Some(step) = tally.rpc(client.answer(answer).await).await else {
                    continue;
                };
                let took = t.elapsed();
                match step.kind {
                    Some(step::Kind::Deny(d)) if d.reason == DenyReason::Locked as i32 => {
                        tally.count("answer_locked");
                        // Refused as locked only after a slow check (hashing) was made anyway.
                        if took > Duration::from_millis(100) {
                            tally.count("answer_locked_slow");
                        }
                    }
                    Some(step::Kind::Deny(_)) | Some(step::Kind::Prompt(_)) => {
                        tally.count("answer_checked");
                        if took > Duration::from_millis(100) {
                            tally.count("answer_slow");
                        }
                    }
                    Some(step::Kind::Permit(_)) => tally.count("answer_permit"),
                    None => tally.count("answer_empty"),
                }
            }
        }));
    }
    ready();
    for t in tasks {
        let _ = t.await;
    }
}

/// Streams to Begin that declare a 4 MB message and send only part of it, held open until the
/// end, spread over as many connections as guardd accepts.
async fn halfsent(
    socket: &Path,
    count: usize,
    bytes: usize,
    per_connection: usize,
    stop: &Stop,
    tally: &Tally,
) {
    let mut body = Vec::with_capacity(5 + bytes);
    body.push(0u8);
    body.extend_from_slice(&DECLARED.to_be_bytes());
    body.resize(5 + bytes.min(DECLARED as usize - 1), 0x0a);
    let body = Bytes::from(body);
    let (mut opened, mut connections, mut failed_in_a_row) = (0usize, 0u64, 0);
    let held = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    // Every connection's handle is kept to the end, so none closes early on our side.
    let mut handles = Vec::new();
    while opened < count && !stop.is_over() && failed_in_a_row < 3 {
        let Some(mut send) = h2_connection(socket, tally).await else {
            failed_in_a_row += 1;
            continue;
        };
        connections += 1;
        // guardd's SETTINGS (its stream limit) come after the handshake; until then h2 assumes
        // no limit.
        let settled = Instant::now() + Duration::from_millis(200);
        while send.current_max_send_streams() == usize::MAX && Instant::now() < settled {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut on_this = 0;
        while on_this < per_connection && opened < count && !stop.is_over() {
            // (Streams guardd already ended count too: then the next connection takes more.)
            if on_this >= send.current_max_send_streams() {
                tally.count("stream_limit_reached");
                break;
            }
            // A connection at guardd's stream limit makes us wait for a free stream: take the
            // next connection instead.
            let free = std::future::poll_fn(|cx| send.poll_ready(cx));
            match tokio::time::timeout(Duration::from_millis(200), free).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tally.count(&format!("h2_{}", h2_kind(&e)));
                    break;
                }
                Err(_) => {
                    tally.count("stream_limit_waits");
                    break;
                }
            };
            let request = http::Request::builder()
                .method("POST")
                .uri("http://guardd/soffid.otp.v1.Guard/Begin")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .expect("request");
            tally.sent();
            let (response, mut stream) = match send.send_request(request, false) {
                Ok(r) => r,
                Err(e) => {
                    tally.count(&format!("h2_{}", h2_kind(&e)));
                    break;
                }
            };
            if let Err(e) = stream.send_data(body.clone(), false) {
                tally.count(&format!("h2_{}", h2_kind(&e)));
                break;
            }
            opened += 1;
            on_this += 1;
            held.fetch_add(1, Ordering::Relaxed);
            let (stop, tally, held) = (stop.clone(), tally.clone(), held.clone());
            tasks.push(tokio::spawn(async move {
                tokio::select! {
                    answered = response => {
                        held.fetch_sub(1, Ordering::Relaxed);
                        match answered {
                            Ok(r) => match grpc_status(r.headers()) {
                                Some(code) => tally.refused(code),
                                None => {
                                    tally.ok();
                                    let mut body = r.into_body();
                                    let trailers = tokio::select! {
                                        t = body.trailers() => t.ok().flatten(),
                                        () = stop.wait() => None,
                                    };
                                    if let Some(code) = trailers.as_ref().and_then(grpc_status) {
                                        tally.refused(code);
                                    }
                                }
                            },
                            Err(e) => tally.count(&format!("h2_{}", h2_kind(&e))),
                        }
                    }
                    () = stop.wait() => {}
                }
                // The stream stays open (half-sent) until here.
                drop(stream);
            }));
        }
        handles.push(send);
        // A connection guardd closes before it takes a stream counts as refused.
        if on_this == 0 {
            failed_in_a_row += 1;
        } else {
            failed_in_a_row = 0;
        }
    }
    tally.set("connections", connections);
    ready();
    stop.wait().await;
    tally.set("held", held.load(Ordering::Relaxed) as u64);
    for t in tasks {
        let _ = t.await;
    }
    drop(handles);
}

/// A raw HTTP/2 connection on guardd's socket; its driver runs in the background.
async fn h2_connection(socket: &Path, tally: &Tally) -> Option<h2::client::SendRequest<Bytes>> {
    let io = match UnixStream::connect(socket).await {
        Ok(io) => io,
        Err(e) => {
            eprintln!("connect: {e}");
            tally.error();
            return None;
        }
    };
    let handshake = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .handshake::<_, Bytes>(io);
    match tokio::time::timeout(Duration::from_secs(5), handshake).await {
        Ok(Ok((send, connection))) => {
            let tally = tally.clone();
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tally.count(&format!("connection_{}", h2_kind(&e)));
                }
            });
            Some(send)
        }
        Ok(Err(e)) => {
            eprintln!("handshake: {e}");
            tally.error();
            None
        }
        Err(_) => {
            eprintln!("handshake: timed out");
            tally.error();
            None
        }
    }
}

/// A short name for an HTTP/2 error: the reset or GOAWAY reason, or io.
fn h2_kind(e: &h2::Error) -> String {
    match e.reason() {
        Some(reason) => format!("{reason:?}").to_lowercase(),
        None if e.is_io() => "io".into(),
        None => "other".into(),
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

/// Connections that say nothing (or only the HTTP/2 preface), held until the end; reports how
/// many guardd closed and when.
async fn idle(socket: &Path, count: usize, preface: Preface, stop: &Stop, tally: &Tally) {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    let started = Instant::now();
    let lifetimes = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let mut tasks = Vec::new();
    for i in 0..count {
        if stop.is_over() {
            break;
        }
        tally.sent();
        let mut conn = match UnixStream::connect(socket).await {
            Ok(c) => c,
            Err(e) => {
                tally.error();
                tally.count(&format!("connect_{:?}", e.kind()));
                continue;
            }
        };
        tally.ok();
        let talk = match preface {
            Preface::None => false,
            Preface::Half => i % 2 == 1,
            Preface::All => true,
        };
        if talk {
            tally.count("preface_sent");
            if conn.write_all(PREFACE).await.is_err() {
                tally.count("preface_failed");
            }
        }
        let opened = Instant::now();
        let (stop, lifetimes) = (stop.clone(), lifetimes.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            loop {
                tokio::select! {
                    read = conn.read(&mut buf) => match read {
                        Ok(0) | Err(_) => {
                            lifetimes.lock().unwrap().push(opened.elapsed());
                            return;
                        }
                        Ok(_) => {}
                    },
                    () = stop.wait() => return,
                }
            }
        }));
    }
    tally.note(
        "connect_burst_ms",
        started.elapsed().as_millis().to_string(),
    );
    ready();
    stop.wait().await;
    for t in tasks {
        let _ = t.await;
    }
    let mut closed = lifetimes.lock().unwrap().clone();
    closed.sort();
    let opened = tally.0.lock().unwrap().ok;
    tally.set("closed_by_guardd", closed.len() as u64);
    tally.set("open_at_end", opened - closed.len() as u64);
    if !closed.is_empty() {
        tally.note(
            "closed_after_s_min",
            format!("{:.1}", closed[0].as_secs_f64()),
        );
        tally.note(
            "closed_after_s_median",
            format!("{:.1}", closed[closed.len() / 2].as_secs_f64()),
        );
    }
}

/// Calls that guardd refuses (List of everyone's tokens, Begin for root), as fast as they go.
async fn refused(socket: &Path, parallel: usize, connections: usize, stop: &Stop, tally: &Tally) {
    let channels = channels(socket, connections, tally).await;
    if channels.is_empty() {
        return;
    }
    let mut tasks = Vec::new();
    for i in 0..parallel.max(1) {
        let mut client = GuardClient::new(channels[i % channels.len()].clone());
        let (stop, tally) = (stop.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while !stop.is_over() {
                k += 1;
                let answered = if k.is_multiple_of(2) {
                    tally
                        .rpc(client.list(ListRequest::default()).await)
                        .await
                        .is_some()
                } else {
                    tally
                        .rpc(client.begin(begin_request("root")).await)
                        .await
                        .is_some()
                };
                if answered {
                    tally.count("not_refused");
                }
            }
        }));
    }
    ready();
    for t in tasks {
        let _ = t.await;
    }
}
