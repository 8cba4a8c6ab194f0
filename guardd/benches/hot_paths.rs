//! The hot paths of one verification, each against a baseline in the same run:
//! TOTP/HOTP verification (baseline: one HMAC code computation), unsealing a secret (baseline:
//! copying it), one store transaction that accepts a step (baseline: the read that precedes it),
//! and a whole Begin+Answer over the Unix socket with a long-lived client (baseline: Begin of a
//! user the rules deny at once). For reuse grants: a Begin let in by a grant (baseline: a Begin
//! the rules permit without a code), and a Begin+Answer under a rule with `reuse` that finds no
//! grant and makes one (baseline: the Begin+Answer above).
//!
//!     cargo bench -p guardd --bench hot_paths

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use guardd::config::Config;
use guardd::otp::{self, Counter, HashAlg, Kind, OtpParams, Windows};
use guardd::seal::Sealer;
use guardd::store::{NewToken, SqliteStore, Store, TokenState};
use proto::v1::guard_client::GuardClient;
use proto::v1::{step, AnswerRequest, BeginRequest, LoginContext};

const WINDOWS: Windows = Windows {
    skew: 1,
    look_ahead: 10,
};

fn verification(c: &mut Criterion) {
    let secret = [7u8; 20];
    let params = OtpParams {
        algorithm: HashAlg::Sha1,
        digits: 6,
        period: 30,
    };
    let now = 1_800_000_000;
    let code = otp::code_for(&secret, Kind::Totp, params, now).unwrap();
    let totp = Counter {
        kind: Kind::Totp,
        params,
        last: None,
        drift: 0,
    };
    let hotp = Counter {
        kind: Kind::Hotp,
        params,
        last: Some(99),
        drift: 0,
    };
    let hcode = otp::code_for(&secret, Kind::Hotp, params, 100).unwrap();
    let mut g = c.benchmark_group("verify");
    g.bench_function("one code computation (baseline)", |b| {
        b.iter(|| otp::code_for(black_box(&secret), Kind::Totp, params, now))
    });
    g.bench_function("TOTP, right code", |b| {
        b.iter(|| otp::verify(black_box(&secret), totp, code.as_bytes(), now, WINDOWS))
    });
    g.bench_function("TOTP, wrong code (whole window)", |b| {
        b.iter(|| otp::verify(black_box(&secret), totp, b"000000", now, WINDOWS))
    });
    g.bench_function("HOTP, right code", |b| {
        b.iter(|| otp::verify(black_box(&secret), hotp, hcode.as_bytes(), now, WINDOWS))
    });
    g.finish();
}

fn unsealing(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let sealer = Sealer::load(&dir.path().join("k"), true).unwrap();
    let sealed = sealer.seal(b"token-id", &[9u8; 20]).unwrap();
    let mut g = c.benchmark_group("unseal");
    g.bench_function("copy the secret (baseline)", |b| {
        b.iter(|| black_box(&sealed).to_vec())
    });
    g.bench_function("XChaCha20-Poly1305 open", |b| {
        b.iter(|| sealer.open(b"token-id", black_box(&sealed)))
    });
    g.finish();
}

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db"), &dir.path().join("k")).unwrap();
    // As the daemon runs it.
    store.lay_out_wal();
    let t = store
        .add_pending(
            NewToken {
                uid: None,
                user: "ann",
                label: "",
                kind: Kind::Hotp,
                params: OtpParams::default(),
                secret: &[1u8; 20],
            },
            0,
        )
        .unwrap();
    assert!(store.accept(&t.id, TokenState::Pending, 0, 0, 0).unwrap());
    let step = AtomicU64::new(1);
    let mut g = c.benchmark_group("store");
    g.bench_function("read the user's secrets (baseline)", |b| {
        b.iter(|| store.secrets("ann", TokenState::Active).unwrap())
    });
    g.bench_function("accept a step (WAL, synchronous=FULL)", |b| {
        b.iter(|| {
            let n = step.fetch_add(1, Ordering::Relaxed);
            assert!(store.accept(&t.id, TokenState::Active, n, 0, 0).unwrap());
        })
    });
    g.finish();
}

fn round_trip(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        r#"version = 1
default = "deny"
[[rule]]
id = "bench"
effect = "otp"
match = { user = ["bench"] }
[[rule]]
id = "open"
effect = "permit"
match = { user = ["open"] }
[[rule]]
id = "reused"
effect = "otp"
reuse = "24h"
reuse_scope = ["service"]
match = { user = ["reuser"] }
[[rule]]
id = "never-reused"
effect = "otp"
reuse = "24h"
reuse_scope = ["tty"]
match = { user = ["prover"] }
"#,
    )
    .unwrap();
    let config = Config {
        socket: dir.path().join("s.sock"),
        database: dir.path().join("db").into(),
        key_file: dir.path().join("k"),
        policy: Some(rules),
        ..Config::default()
    };
    let secret = [3u8; 20];
    {
        let store = SqliteStore::open(&dir.path().join("db"), &config.key_file).unwrap();
        for user in ["bench", "reuser", "prover"] {
            let t = store
                .add_pending(
                    NewToken {
                        uid: None,
                        user,
                        label: "",
                        kind: Kind::Hotp,
                        params: OtpParams::default(),
                        secret: &secret,
                    },
                    0,
                )
                .unwrap();
            assert!(store.accept(&t.id, TokenState::Pending, 0, 0, 0).unwrap());
        }
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let socket = config.socket.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(guardd::server::run(config, async {
        let _ = stopped.await;
    }));
    // guardd closes a connection after proto::MAX_CONNECTION_AGE (20 s): each measurement
    // opens its own.
    let connect = || {
        rt.block_on(async {
            while tokio::net::UnixStream::connect(&socket).await.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            GuardClient::new(
                proto::connect(&socket, Duration::from_secs(5))
                    .await
                    .unwrap(),
            )
        })
    };
    let begin = |user: &str| BeginRequest {
        context: Some(LoginContext {
            user: user.into(),
            service: "bench".into(),
            ..LoginContext::default()
        }),
    };
    // One Begin+Answer of `user` with its next HOTP code; the step that ends it.
    let counters: [AtomicU64; 3] = [AtomicU64::new(1), AtomicU64::new(1), AtomicU64::new(1)];
    let prove = |client: &mut GuardClient<tonic::transport::Channel>, user: &str, i: usize| {
        rt.block_on(async {
            let step = client.begin(begin(user)).await.unwrap().into_inner();
            let Some(step::Kind::Prompt(p)) = step.kind else {
                panic!("expected a prompt")
            };
            let n = counters[i].fetch_add(1, Ordering::Relaxed);
            let code = otp::code_for(&secret, Kind::Hotp, OtpParams::default(), n).unwrap();
            let done = client
                .answer(AnswerRequest {
                    challenge: p.challenge,
                    response: code.into_bytes(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(matches!(done.kind, Some(step::Kind::Permit(_))));
        })
    };
    let permitted = |client: &mut GuardClient<tonic::transport::Channel>, user: &str| {
        let step = rt.block_on(client.begin(begin(user))).unwrap().into_inner();
        assert!(matches!(step.kind, Some(step::Kind::Permit(_))));
    };
    // reuser's grant, made once.
    prove(&mut connect(), "reuser", 1);
    let mut g = c.benchmark_group("grpc");
    g.bench_function("Begin denied by the rules (baseline)", |b| {
        let mut client = connect();
        b.iter(|| rt.block_on(client.begin(begin("other"))).unwrap())
    });
    g.bench_function("Begin + Answer, verified and committed", |b| {
        let mut client = connect();
        b.iter(|| prove(&mut client, "bench", 0))
    });
    g.bench_function(
        "Begin permitted by the rules without a code (baseline)",
        |b| {
            let mut client = connect();
            b.iter(|| permitted(&mut client, "open"))
        },
    );
    g.bench_function("Begin let in by a reuse grant", |b| {
        let mut client = connect();
        b.iter(|| permitted(&mut client, "reuser"))
    });
    g.bench_function(
        "Begin + Answer under reuse, no grant applies, one made",
        |b| {
            let mut client = connect();
            b.iter(|| prove(&mut client, "prover", 2))
        },
    );
    g.finish();
    let _ = stop.send(());
    let _ = rt.block_on(server);
}

criterion_group!(benches, verification, unsealing, store, round_trip);
criterion_main!(benches);
