//! Successful verifications per second of one guardd, each a whole login (Begin + Answer over
//! the Unix socket) ending in the replay-protection commit (SQLite WAL, synchronous=FULL), with
//! 1, 8 and 32 concurrent clients. Baseline in the same run: Begin for a user without a token
//! (socket, gRPC, caller check and one read, no verification and no commit).
//!
//!     cargo bench -p soffid-otp-tests --bench verify_throughput   # BENCH_SECONDS=3, 3 rounds
//!
//! Each client has its own HOTP token (counters never run out, unlike TOTP steps), for a user
//! of its own, so no two clients contend for one token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guardd::config::Config;
use guardd::otp::{self, Kind, OtpParams};
use guardd::store::{NewToken, SqliteStore, Store, TokenState};
use proto::v1::guard_client::GuardClient;
use proto::v1::{step, AnswerRequest, BeginRequest, LoginContext};
use tonic::transport::Channel;

const LEVELS: [usize; 3] = [1, 8, 32];

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        socket: dir.path().join("guardd.sock"),
        database: dir.path().join("guardd.db"),
        key_file: dir.path().join("guardd.key"),
        policy: Some(harness::write_rules(dir.path(), harness::STRICT_RULES)),
        ..Config::default()
    };
    // Tokens go straight into the store: bench users need not exist on the system.
    let secrets: Vec<Vec<u8>> = {
        let store = SqliteStore::open(&config.database, &config.key_file).unwrap();
        (0..*LEVELS.iter().max().unwrap())
            .map(|i| {
                let secret = otp::new_secret().unwrap().to_vec();
                let user = format!("bench{i}");
                let t = store
                    .add_pending(
                        NewToken {
                            user: &user,
                            label: "bench",
                            kind: Kind::Hotp,
                            params: OtpParams::default(),
                            secret: &secret,
                        },
                        0,
                    )
                    .unwrap();
                assert!(store.accept(&t.id, TokenState::Pending, 0, 0, 0).unwrap());
                secret
            })
            .collect()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let socket = config.socket.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(guardd::server::run(config, async {
        let _ = stopped.await;
    }));
    runtime.block_on(async {
        while tokio::net::UnixStream::connect(&socket).await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let secrets = Arc::new(secrets);
        let counters: Vec<Arc<std::sync::atomic::AtomicU64>> = (0..secrets.len())
            .map(|_| Arc::new(std::sync::atomic::AtomicU64::new(1)))
            .collect();
        println!("one guardd, {seconds} s per round, median of 3 rounds:");
        println!(
            "{:>8} {:>22} {:>22} {:>7}",
            "clients", "verified logins/s", "baseline Begin/s", "ratio"
        );
        for clients in LEVELS {
            let (mut logins, mut begins) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                logins.push(round(&socket, clients, seconds, Some((&secrets, &counters))).await);
                begins.push(round(&socket, clients, seconds, None).await);
            }
            let (l, b) = (median(&mut logins), median(&mut begins));
            println!("{clients:>8} {l:>22.0} {b:>22.0} {:>7.2}", l / b);
        }
    });
    let _ = stop.send(());
    let _ = runtime.block_on(server);
}

type Tokens<'a> = (
    &'a Arc<Vec<Vec<u8>>>,
    &'a [Arc<std::sync::atomic::AtomicU64>],
);

/// Runs `clients` loops for `seconds`; returns completed operations per second. With tokens,
/// an operation is a login verified with the next HOTP code; without, a Begin for a user who
/// has no token.
async fn round(
    socket: &std::path::Path,
    clients: usize,
    seconds: u64,
    tokens: Option<Tokens<'_>>,
) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let mut client = GuardClient::new(
            proto::connect(socket, Duration::from_secs(5))
                .await
                .unwrap(),
        );
        let token = tokens.map(|(s, c)| (s.clone(), c[i].clone()));
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                match &token {
                    Some((secrets, counter)) => {
                        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let code = otp::code_for(&secrets[i], Kind::Hotp, OtpParams::default(), n)
                            .unwrap();
                        assert!(
                            login(&mut client, &format!("bench{i}"), &code).await,
                            "login {n} of bench{i} failed"
                        );
                    }
                    None => {
                        let step = begin(&mut client, &format!("nobody-bench{i}")).await;
                        assert!(matches!(step.kind, Some(step::Kind::Deny(_))));
                    }
                }
                done += 1;
            }
            done
        }));
    }
    let started = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

async fn begin(client: &mut GuardClient<Channel>, user: &str) -> proto::v1::Step {
    client
        .begin(BeginRequest {
            context: Some(LoginContext {
                user: user.into(),
                service: "bench".into(),
                ..LoginContext::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn login(client: &mut GuardClient<Channel>, user: &str, code: &str) -> bool {
    let Some(step::Kind::Prompt(prompt)) = begin(client, user).await.kind else {
        return false;
    };
    let step = client
        .answer(AnswerRequest {
            challenge: prompt.challenge,
            response: code.as_bytes().to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    matches!(step.kind, Some(step::Kind::Permit(_)))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
