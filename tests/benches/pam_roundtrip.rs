//! One whole `pam_authenticate` through pam_soffid_otp (pamtester → libpam → module → guardd →
//! SQLite → verify) against a baseline stack of `pam_permit.so` alone, both under pam_wrapper,
//! interleaved run by run. Reports medians and their ratio.
//!
//!     cargo build --release --workspace
//!     cargo bench -p soffid-otp-tests --bench pam_roundtrip          # BENCH_RUNS=200 by default
//!
//! Every login needs a fresh TOTP step (each is accepted once), so guardd runs in-process with a
//! clock that the benchmark moves forward 30 s before each login.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guardd::config::Config;
use guardd::service::Clock;
use harness::{PamServices, Secret};
use proto::v1::guard_client::GuardClient;
use proto::v1::{ConfirmRequest, EnrollRequest};

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("guardd.sock");
    let config = Config {
        socket: socket.clone(),
        database: dir.path().join("guardd.db"),
        key_file: dir.path().join("guardd.key"),
        policy: Some(harness::write_rules(dir.path(), harness::STRICT_RULES)),
        ..Config::default()
    };

    let start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let vtime = Arc::new(AtomicU64::new(start));
    let clock = {
        let vtime = vtime.clone();
        Clock::from_fn(move || vtime.load(Ordering::SeqCst))
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(guardd::server::run_with_clock(config, clock, async {
        let _ = stopped.await;
    }));
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }

    let user = "daemon";
    let secret = runtime.block_on(async {
        let mut client = GuardClient::new(
            proto::connect(&socket, Duration::from_secs(5))
                .await
                .unwrap(),
        );
        let uri = client
            .enroll(EnrollRequest {
                user: user.into(),
                label: "bench".into(),
                ..EnrollRequest::default()
            })
            .await
            .unwrap()
            .into_inner()
            .uri;
        let secret = Secret::from_uri(&uri);
        let code = secret.code_at_time(vtime.load(Ordering::SeqCst));
        client
            .confirm(ConfirmRequest {
                user: user.into(),
                code: code.into_bytes(),
            })
            .await
            .unwrap();
        secret
    });

    let otp = PamServices::new(
        "bench-otp",
        &PamServices::module_line(&format!("socket={} timeout=5", socket.display())),
    );
    let baseline = PamServices::new("bench-permit", "auth required pam_permit.so\n");

    let (mut with_module, mut without) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let now = vtime.fetch_add(30, Ordering::SeqCst) + 30;
        let input = format!("{}\n", secret.code_at_time(now));
        let t = Instant::now();
        let out = otp.pamtester("bench-otp", user, &input);
        with_module.push(t.elapsed());
        assert!(out.status.success(), "login failed: {out:?}");
        let t = Instant::now();
        let out = baseline.pamtester("bench-permit", user, &input);
        without.push(t.elapsed());
        assert!(out.status.success());
    }
    let _ = stop.send(());
    let _ = runtime.block_on(server);

    let (m, b) = (median(&mut with_module), median(&mut without));
    println!("pam_authenticate under pam_wrapper, {runs} interleaved runs each (whole pamtester process):");
    println!("  pam_permit only      median {:>8.3} ms", ms(b));
    println!("  pam_soffid_otp       median {:>8.3} ms", ms(m));
    println!(
        "  module cost          median {:>8.3} ms  (ratio {:.2}x)",
        ms(m) - ms(b),
        ms(m) / ms(b)
    );
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
