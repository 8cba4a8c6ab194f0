//! One whole `pam_authenticate` through pam_soffid_otp (pamtester → libpam → module → guardd →
//! SQLite → verify) against a stack of `pam_permit.so` alone, interleaved run by run (each round
//! in an order of its own), each run a whole pamtester process. Reports medians, and each
//! variant's cost over the baseline.
//!
//!     cargo build --release --workspace
//!     cargo bench -p soffid-otp-tests --bench pam_roundtrip          # BENCH_RUNS=200 by default
//!
//! Variants, under pam_wrapper (service files in a temp folder):
//! - `pam_permit only`: the baseline.
//! - `pam_google_authenticator`: Debian's libpam-google-authenticator, TOTP, an anchor: it
//!   reads a secret file and checks the code, writing nothing (no replay protection).
//! - `pam_oath`: Debian's libpam-oath, HOTP, an anchor: it checks the code and rewrites its
//!   users file with the new counter.
//! - `module, guardd absent`: `failmode=safe` then pam_permit; what loading the module and
//!   failing to connect cost (dlopen, connect attempt, syslog line).
//! - `module, rules permit`: one Begin answered with a permit, no prompt, nothing written.
//! - `module, OTP login`: Begin, the prompt, Answer, the code verified and committed (fsync).
//! - `floor: module, canned answers` (rules permit / OTP login): the module against a server
//!   thread in this process that answers each call at once from memory (a prompt, then a
//!   permit), with no HTTP/2 stack, no rules, no store: what crossing to another process costs
//!   the module, below which no daemon design can go.
//! - `floor: canned, OTP, synced`: the same, but before the permit it writes a page into a
//!   log file laid out ahead in the same folder and `fdatasync`s it, as guardd's SQLite commits
//!   an accepted code: the floor of any daemon that makes a used code durable before it answers.
//!
//! and, as root, the same baseline and OTP login through service files in /etc/pam.d and the
//! system's libpam without pam_wrapper.
//!
//! `BENCH_MODULE_BEFORE=/path/to/libpam_soffid_otp.so` adds the same module variants with
//! another build of the module (an earlier version), interleaved in the same run.
//!
//! Every login needs a fresh TOTP step (each is accepted once), so guardd runs in-process with a
//! clock that the benchmark moves forward 30 s before each login.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guardd::config::Config;
use guardd::service::Clock;
use harness::{artefact, is_root, system_pamtester, EtcFile, PamServices};

/// Services named `*-nootp` are permitted without an OTP; every other login needs one.
const RULES: &str = r#"
version = 1
default = "deny"

[[rule]]
id = "bench-no-otp"
effect = "permit"
match = { service = ["*-nootp"] }

[[rule]]
id = "everyone-otp"
effect = "otp"
"#;

const USER: &str = "daemon";

/// What a variant's user types.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Input {
    Nothing,
    /// guardd's TOTP code for the next virtual step.
    Guardd,
    /// The TOTP code of now (google-authenticator reads the real clock).
    TotpNow,
    /// The next HOTP code (pam_oath).
    Hotp,
    /// Any code: the canned server permits whatever it is told.
    Canned,
}

/// One way to run pam_authenticate, and its timings.
struct Variant {
    name: &'static str,
    service: &'static str,
    input: Input,
    /// Through /etc/pam.d and the plain system libpam, not pam_wrapper.
    system: bool,
    times: Vec<Duration>,
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("guardd.sock");
    let config = Config {
        socket: socket.clone(),
        database: dir.path().join("guardd.db").into(),
        key_file: dir.path().join("guardd.key"),
        policy: Some(harness::write_rules(dir.path(), RULES)),
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
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // guardd on its own thread, on the runtime the daemon runs on.
    let server = std::thread::spawn(move || {
        guardd::server::runtime()
            .unwrap()
            .block_on(guardd::server::run_with_clock(config, clock, async {
                let _ = stopped.await;
            }))
    });
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let secret = client.block_on(harness::Guard::new(socket.clone()).enroll_active(USER));

    let canned_permit = canned::serve(dir.path().join("canned-permit.sock"), false, None);
    let canned_otp = canned::serve(dir.path().join("canned-otp.sock"), true, None);
    let canned_committed = canned::serve(
        dir.path().join("canned-committed.sock"),
        true,
        Some(canned::Log::lay_out(&dir.path().join("canned.log"))),
    );

    let module = artefact("libpam_soffid_otp.so");
    let line = |args: &str| format!("auth required {} {args}\n", module.display());
    let absent = dir.path().join("absent.sock");
    let args = format!("socket={} timeout=5", socket.display());
    let services = PamServices::new("bench-permit", "auth required pam_permit.so\n");
    let files = [
        ("bench-otp", line(&args)),
        ("bench-nootp", line(&args)),
        (
            "bench-canned-nootp",
            line(&format!("socket={} timeout=5", canned_permit.display())),
        ),
        (
            "bench-canned-otp",
            line(&format!("socket={} timeout=5", canned_otp.display())),
        ),
        (
            "bench-canned-committed",
            line(&format!("socket={} timeout=5", canned_committed.display())),
        ),
        (
            "bench-absent",
            format!(
                "auth sufficient {} socket={} failmode=safe\nauth required pam_permit.so\n",
                module.display(),
                absent.display()
            ),
        ),
    ];
    for (name, text) in &files {
        std::fs::write(services.dir.path().join(name), text).unwrap();
    }
    // The anchors: the same secret in google-authenticator's file and pam_oath's users file.
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap()
        .name;
    let ga_file = dir.path().join("google_authenticator");
    std::fs::write(&ga_file, format!("{}\n\" TOTP_AUTH\n", secret.base32())).unwrap();
    std::fs::set_permissions(
        &ga_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let oath_file = dir.path().join("users.oath");
    std::fs::write(&oath_file, format!("HOTP {USER} - {}\n", secret.hex())).unwrap();
    std::fs::set_permissions(
        &oath_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let anchors = [
        (
            "bench-ga",
            format!(
                "auth required pam_google_authenticator.so secret={} user={me}\n",
                ga_file.display()
            ),
        ),
        (
            "bench-oath",
            format!(
                "auth required pam_oath.so usersfile={} window=5 digits=6\n",
                oath_file.display()
            ),
        ),
    ];
    for (name, text) in &anchors {
        std::fs::write(services.dir.path().join(name), text).unwrap();
    }
    let before = std::env::var_os("BENCH_MODULE_BEFORE").map(std::path::PathBuf::from);
    if let Some(old) = &before {
        let line = format!("auth required {} {args}\n", old.display());
        for name in ["bench-before-otp", "bench-before-nootp"] {
            std::fs::write(services.dir.path().join(name), &line).unwrap();
        }
    }
    let hotp_counter = AtomicU64::new(0);
    let mut variants = vec![
        Variant::new("pam_permit only", "bench-permit", Input::Nothing, false),
        Variant::new(
            "pam_google_authenticator",
            "bench-ga",
            Input::TotpNow,
            false,
        ),
        Variant::new("pam_oath", "bench-oath", Input::Hotp, false),
        Variant::new(
            "module, guardd absent",
            "bench-absent",
            Input::Nothing,
            false,
        ),
        Variant::new("module, rules permit", "bench-nootp", Input::Nothing, false),
        Variant::new("module, OTP login", "bench-otp", Input::Guardd, false),
        Variant::new(
            "floor: canned, permit",
            "bench-canned-nootp",
            Input::Nothing,
            false,
        ),
        Variant::new(
            "floor: canned, OTP",
            "bench-canned-otp",
            Input::Canned,
            false,
        ),
        Variant::new(
            "floor: canned, OTP, synced",
            "bench-canned-committed",
            Input::Canned,
            false,
        ),
    ];
    if before.is_some() {
        variants.push(Variant::new(
            "module before, rules permit",
            "bench-before-nootp",
            Input::Nothing,
            false,
        ));
        variants.push(Variant::new(
            "module before, OTP login",
            "bench-before-otp",
            Input::Guardd,
            false,
        ));
    }
    // The /etc/pam.d variants need root to write there.
    let _etc = is_root().then(|| {
        variants.push(Variant::new(
            "pam_permit only",
            "soffid-otp-bench-permit",
            Input::Nothing,
            true,
        ));
        variants.push(Variant::new(
            "module, OTP login",
            "soffid-otp-bench-otp",
            Input::Guardd,
            true,
        ));
        [
            EtcFile::write(
                "/etc/pam.d/soffid-otp-bench-permit",
                "auth required pam_permit.so\n",
                0o644,
            ),
            EtcFile::write("/etc/pam.d/soffid-otp-bench-otp", &line(&args), 0o644),
        ]
    });

    // Each round runs the variants in an order of its own (a fixed seed, so runs repeat): in a
    // fixed order each would always follow the same neighbour, and what that neighbour leaves
    // behind (a device cache it filled with a sync, pages it touched) would bias it.
    let mut order: Vec<usize> = (0..variants.len()).collect();
    let mut seed = 0x5eed_u64;
    for _ in 0..runs {
        shuffle(&mut order, &mut seed);
        for &i in &order {
            let v = &mut variants[i];
            let input = match v.input {
                Input::Nothing => String::new(),
                Input::Guardd => {
                    let now = vtime.fetch_add(30, Ordering::SeqCst) + 30;
                    format!("{}\n", secret.code_at_time(now))
                }
                Input::TotpNow => format!("{}\n", secret.code_at(0)),
                Input::Canned => "123456\n".to_owned(),
                Input::Hotp => {
                    let counter = hotp_counter.fetch_add(1, Ordering::SeqCst);
                    format!("{}\n", secret.hotp(counter))
                }
            };
            let t = Instant::now();
            let out = if v.system {
                system_pamtester(v.service, USER, &input)
            } else {
                services.pamtester(v.service, USER, &input)
            };
            v.times.push(t.elapsed());
            assert!(out.status.success(), "{}: {out:?}", v.name);
        }
    }
    let _ = stop.send(());
    let _ = server.join();

    // Paired by round before the medians sort the samples: each round ran every variant once,
    // back to back, so a difference within a round is free of the machine's drift over the run.
    let paired = |a: &str, b: &str| {
        let find = |name: &str| variants.iter().find(|v| !v.system && v.name == name);
        let (a, b) = (find(a)?, find(b)?);
        let mut diffs: Vec<f64> = a
            .times
            .iter()
            .zip(&b.times)
            .map(|(x, y)| ms(*x) - ms(*y))
            .collect();
        let below = diffs.iter().filter(|d| **d < 0.0).count() * 100 / diffs.len().max(1);
        diffs.sort_by(f64::total_cmp);
        Some((diffs[diffs.len() / 2], below))
    };
    let pairs: Vec<_> = [
        ("module, OTP login", "pam_oath"),
        ("module, OTP login", "pam_google_authenticator"),
        ("module, OTP login", "floor: canned, OTP"),
        ("pam_oath", "floor: canned, OTP"),
        ("module, OTP login", "floor: canned, OTP, synced"),
        ("pam_oath", "floor: canned, OTP, synced"),
    ]
    .into_iter()
    .filter_map(|(a, b)| Some((a, b, paired(a, b)?)))
    .collect();

    println!("pam_authenticate, {runs} interleaved runs of each (a whole pamtester process each):");
    for (system, title) in [(false, "pam_wrapper"), (true, "/etc/pam.d, system libpam")] {
        let mut mine: Vec<&mut Variant> =
            variants.iter_mut().filter(|v| v.system == system).collect();
        if mine.is_empty() {
            println!("  {title}: skipped (needs root)");
            continue;
        }
        println!("  {title}:");
        let base = median(&mut mine[0].times);
        for v in mine {
            let m = median(&mut v.times);
            println!(
                "    {:<28} median {:>7.3} ms   over baseline {:>+7.3} ms (ratio {:.2}x)",
                v.name,
                ms(m),
                ms(m) - ms(base),
                ms(m) / ms(base)
            );
        }
    }
    println!("  paired by round (pam_wrapper), median of the differences:");
    for (a, b, (median, below)) in pairs {
        println!(
            "    {:<42} {:>+7.3} ms   ({below}% of rounds below)",
            format!("{a} - {b}"),
            median
        );
    }
}

impl Variant {
    fn new(name: &'static str, service: &'static str, input: Input, system: bool) -> Variant {
        Variant {
            name,
            service,
            input,
            system,
            times: Vec::new(),
        }
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A server that speaks just enough of gRPC over HTTP/2 to answer the module at once from
/// memory: for each request (the frames up to a DATA that ends its stream), a reply on that
/// stream. With `prompt`, a connection's first call gets a prompt and every later one a permit;
/// without, every call gets a permit. One thread per connection, as cheap as a server can be.
/// With a `Log`, each permit that follows a prompt is first made durable in it.
mod canned {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixListener;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use harness::{grpc_message, h2_frame, H2_PREFACE};
    use prost::Message;
    use proto::v1::{step, Permit, Prompt, Step};

    /// A file written ahead to its full size and synced, so that a commit's page overwrites
    /// blocks already allocated (as guardd's laid-out SQLite log): `fdatasync` then writes the
    /// data and no size or times.
    pub struct Log {
        file: File,
        next: AtomicU64,
    }

    /// Pages in the log before writing wraps to its start.
    const LOG_PAGES: u64 = 1000;

    impl Log {
        pub fn lay_out(path: &Path) -> Arc<Log> {
            let file = File::create(path).unwrap();
            file.write_all_at(&vec![0; 4096 * LOG_PAGES as usize], 0)
                .unwrap();
            file.sync_all().unwrap();
            Arc::new(Log {
                file,
                next: AtomicU64::new(0),
            })
        }

        fn commit(&self) {
            let page = self.next.fetch_add(1, Ordering::Relaxed) % LOG_PAGES;
            self.file.write_all_at(&[1; 4096], page * 4096).unwrap();
            self.file.sync_data().unwrap();
        }
    }

    pub fn serve(path: PathBuf, prompt: bool, log: Option<Arc<Log>>) -> PathBuf {
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut input = Vec::new();
                    let mut at = 0;
                    let mut calls = 0;
                    let mut buf = [0u8; 16384];
                    loop {
                        // Whole frames so far: a DATA frame with END_STREAM ends a request.
                        let mut ended = None;
                        loop {
                            if at == 0
                                && input.len() >= H2_PREFACE.len()
                                && input.starts_with(H2_PREFACE)
                            {
                                at = H2_PREFACE.len();
                            }
                            if at == 0 || input.len() < at + 9 {
                                break;
                            }
                            let len =
                                u32::from_be_bytes([0, input[at], input[at + 1], input[at + 2]])
                                    as usize;
                            if input.len() < at + 9 + len {
                                break;
                            }
                            let stream = u32::from_be_bytes([
                                input[at + 5] & 0x7f,
                                input[at + 6],
                                input[at + 7],
                                input[at + 8],
                            ]);
                            if input[at + 3] == 0 && input[at + 4] & 1 != 0 {
                                ended = Some(stream);
                            }
                            at += 9 + len;
                        }
                        if let Some(stream) = ended {
                            let kind = if prompt && calls == 0 {
                                step::Kind::Prompt(Prompt {
                                    challenge: "canned".into(),
                                    text: "Verification code: ".into(),
                                    ..Prompt::default()
                                })
                            } else {
                                if let (true, Some(log)) = (prompt, &log) {
                                    log.commit();
                                }
                                step::Kind::Permit(Permit::default())
                            };
                            calls += 1;
                            let reply = reply(stream, &Step { kind: Some(kind) }.encode_to_vec());
                            if conn.write_all(&reply).is_err() {
                                return;
                            }
                            continue;
                        }
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => input.extend_from_slice(&buf[..n]),
                        }
                    }
                });
            }
        });
        path
    }

    /// Response headers (`:status: 200`), the message, and the trailers (`grpc-status: 0`).
    fn reply(stream: u32, message: &[u8]) -> Vec<u8> {
        [
            h2_frame(0x1, 0x4, stream, &[0x88]),
            h2_frame(0x0, 0, stream, &grpc_message(message)),
            h2_frame(0x1, 0x5, stream, b"\x00\x0bgrpc-status\x010"),
        ]
        .concat()
    }
}

/// A Fisher-Yates shuffle of `items` driven by splitmix64 from `state`: no dependency, and the
/// same sequence of orders on every run.
fn shuffle(items: &mut [usize], state: &mut u64) {
    for i in (1..items.len()).rev() {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        items.swap(i, (z % (i as u64 + 1)) as usize);
    }
}
