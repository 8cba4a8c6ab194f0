//! guardd-load: drives a real guardd (the binary beside this one) on a scratch socket with N
//! enrolled users (HOTP tokens, so every success has a fresh counter) from C concurrent clients
//! for T seconds, and reports throughput, latency percentiles and guardd's peak RSS.
//!
//! ```text
//! cargo build --release -p guardd -p soffid-otp-tests && \
//! cargo run --release -p soffid-otp-tests --bin guardd-load -- --users 1000 --clients 32 --seconds 10
//! ```
//!
//! `--mode ok` (right codes), `wrong` (a wrong-code storm: the back-off must stay cheap) or
//! `mixed` (one client in ten sends wrong codes for its own users). Before the logins, the same
//! clients run `--baseline-seconds` of the cheapest call that still crosses the socket, gRPC, the
//! caller check, the store thread and the rules (a Begin for a user without a token, answered
//! with a deny), so the figures come with a baseline from the same run. The last line is
//! machine-readable.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use guardd::otp::{self, Kind, OtpParams};
use guardd::procfs;
use guardd::store::{NewToken, SqliteStore};
use proto::v1::guard_client::GuardClient;
use proto::v1::{step, AnswerRequest, BeginRequest, LoginContext};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Ok,
    Wrong,
    Mixed,
}

#[derive(Parser)]
#[command(about = "Load test a real guardd")]
struct Args {
    /// Enrolled users (one HOTP token each)
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Concurrent clients, each on its own connection
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds of load
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, value_enum, default_value_t = Mode::Ok)]
    mode: Mode,
    /// Seconds of baseline calls before the logins (0: none)
    #[arg(long, default_value_t = 3)]
    baseline_seconds: u64,
    /// The guardd binary [default: the one beside guardd-load]
    #[arg(long)]
    guardd: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.clients == 0 || args.users < args.clients {
        bail!("need at least one client and at least as many users as clients");
    }
    let guardd = match args.guardd.clone() {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("no parent directory")?
            .join("guardd"),
    };
    let dir = tempfile::tempdir()?;
    let (socket, db, key) = (
        dir.path().join("guardd.sock"),
        dir.path().join("guardd.db"),
        dir.path().join("guardd.key"),
    );
    std::fs::write(
        dir.path().join("rules.toml"),
        "version = 1\ndefault = \"deny\"\n[[rule]]\nid = \"all\"\neffect = \"otp\"\n",
    )?;
    std::fs::write(dir.path().join("guardd.toml"), "max_tries = 1\n")?;

    let t = Instant::now();
    let secrets: Vec<Vec<u8>> = (0..args.users)
        .map(|_| otp::new_secret().map(|s| s.to_vec()))
        .collect::<Result<_, _>>()?;
    let names: Vec<String> = (0..args.users).map(|i| format!("load{i}")).collect();
    {
        let store = SqliteStore::open(&db, &key)?;
        let tokens: Vec<NewToken> = names
            .iter()
            .zip(&secrets)
            .map(|(user, secret)| NewToken {
                uid: None,
                user,
                label: "load",
                kind: Kind::Hotp,
                params: OtpParams::default(),
                secret,
            })
            .collect();
        store.add_active_many(&tokens, 0)?;
    }
    eprintln!("enrolled {} users in {:?}", args.users, t.elapsed());

    let started = Instant::now();
    let mut child = Command::new(&guardd)
        .arg("--config")
        .arg(dir.path().join("guardd.toml"))
        .arg("--socket")
        .arg(&socket)
        .arg("--database")
        .arg(&db)
        .arg("--key-file")
        .arg(&key)
        .arg("--policy")
        .arg(dir.path().join("rules.toml"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} (build it: cargo build --release -p guardd)",
                guardd.display()
            )
        })?;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            bail!("guardd did not start");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let startup = started.elapsed();

    let runtime = tokio::runtime::Runtime::new()?;
    let baseline = match args.baseline_seconds {
        0 => None,
        s => {
            let cpu = procfs::cpu_us(child.id());
            let (l, e, _) =
                runtime.block_on(drive(&args, &socket, Work::Baseline, s, &secrets, &names))?;
            Some((l, e, procfs::cpu_us(child.id()) - cpu))
        }
    };
    let cpu = procfs::cpu_us(child.id());
    let (latencies, errors, wrong_sent) = runtime.block_on(drive(
        &args,
        &socket,
        Work::Logins(args.mode),
        args.seconds,
        &secrets,
        &names,
    ))?;
    let cpu = procfs::cpu_us(child.id()) - cpu;
    let rss = procfs::peak_rss_kib(child.id());
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGTERM,
    );
    let _ = child.wait();

    let l = Latencies::of(latencies);
    let per_s = l.0.len() as f64 / args.seconds as f64;
    // guardd's own CPU time per call: what the server costs, whatever the clients beside it take.
    let cpu_per = |cpu: u64, calls: usize| cpu as f64 / calls.max(1) as f64;
    println!(
        "{} logins in {} s from {} clients over {} users (mode {}): {:.0}/s ({} with wrong codes)",
        l.0.len(),
        args.seconds,
        args.clients,
        args.users,
        match args.mode {
            Mode::Ok => "ok",
            Mode::Wrong => "wrong",
            Mode::Mixed => "mixed",
        },
        per_s,
        wrong_sent
    );
    println!(
        "latency p50 {} µs, p90 {} µs, p99 {} µs, max {} µs; guardd CPU {:.0} µs per login; guardd start-up {} ms; peak RSS {} KiB",
        l.us(0.5),
        l.us(0.9),
        l.us(0.99),
        l.us(1.0),
        cpu_per(cpu, l.0.len()),
        startup.as_millis(),
        rss
    );
    let mut extra = String::new();
    if let Some((b, b_errors, b_cpu)) = baseline {
        let b = Latencies::of(b);
        let b_per_s = b.0.len() as f64 / args.baseline_seconds as f64;
        println!(
            "baseline (Begin denied by the rules, same clients): {b_per_s:.0}/s, p50 {} µs, p99 {} µs, guardd CPU {:.0} µs per call ({b_errors} errors); logins/s {:.2}x of it, p50 {:.2}x",
            b.us(0.5),
            b.us(0.99),
            cpu_per(b_cpu, b.0.len()),
            per_s / b_per_s.max(1.0),
            l.us(0.5) as f64 / b.us(0.5).max(1) as f64,
        );
        extra = format!(
            " baseline_per_s={b_per_s:.0} baseline_p50_us={} baseline_p99_us={}",
            b.us(0.5),
            b.us(0.99)
        );
    }
    println!(
        "verifications_per_s={per_s:.0} p50_us={} p99_us={} max_us={} guardd_peak_rss_kib={rss} guardd_cpu_us_per_login={:.0} startup_ms={}{extra} errors={errors}",
        l.us(0.5),
        l.us(0.99),
        l.us(1.0),
        cpu_per(cpu, l.0.len()),
        startup.as_millis()
    );
    Ok(())
}

/// Sorted latencies, for percentiles.
struct Latencies(Vec<Duration>);

impl Latencies {
    fn of(mut v: Vec<Duration>) -> Self {
        v.sort_unstable();
        Latencies(v)
    }

    /// The `p` quantile in microseconds (`1.0`: the maximum); 0 without samples.
    fn us(&self, p: f64) -> u128 {
        let i = ((self.0.len() as f64 * p) as usize).min(self.0.len().saturating_sub(1));
        self.0.get(i).map_or(0, |d| d.as_micros())
    }
}

/// What the clients do.
#[derive(Clone, Copy)]
enum Work {
    /// A Begin for a user without a token: denied by the rules, nothing to verify or commit.
    Baseline,
    Logins(Mode),
}

/// Runs the clients for `seconds`; returns every call's latency, the number of errors, and of
/// wrong sends.
async fn drive(
    args: &Args,
    socket: &std::path::Path,
    work: Work,
    seconds: u64,
    secrets: &[Vec<u8>],
    names: &[String],
) -> anyhow::Result<(Vec<Duration>, u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (secrets, names) = (Arc::new(secrets.to_vec()), Arc::new(names.to_vec()));
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut client = GuardClient::new(proto::connect(socket, Duration::from_secs(10)).await?);
        let (secrets, names) = (secrets.clone(), names.clone());
        let (users, clients) = (args.users, args.clients);
        let wrong = match work {
            Work::Baseline | Work::Logins(Mode::Ok) => false,
            Work::Logins(Mode::Wrong) => true,
            Work::Logins(Mode::Mixed) => c % 10 == 0,
        };
        tasks.push(tokio::spawn(async move {
            // This client's users: c, c + C, c + 2C, ...; their next HOTP counters.
            let mine: Vec<usize> = (c..users).step_by(clients).collect();
            let mut next = vec![1u64; mine.len()];
            let (mut lat, mut errors, mut sent_wrong) = (Vec::new(), 0u64, 0u64);
            let mut k = 0;
            while Instant::now() < deadline {
                let slot = k % mine.len();
                let user = mine[slot];
                k += 1;
                if let Work::Baseline = work {
                    let t = Instant::now();
                    let denied = begin(&mut client, &format!("absent{user}")).await;
                    lat.push(t.elapsed());
                    if !matches!(denied, Ok(None)) {
                        errors += 1;
                    }
                    continue;
                }
                let code = if wrong {
                    sent_wrong += 1;
                    "000000".to_owned()
                } else {
                    match otp::code_for(
                        &secrets[user],
                        Kind::Hotp,
                        OtpParams::default(),
                        next[slot],
                    ) {
                        Ok(code) => code,
                        Err(_) => {
                            errors += 1;
                            continue;
                        }
                    }
                };
                let t = Instant::now();
                let permitted = login(&mut client, &names[user], &code).await;
                lat.push(t.elapsed());
                match (permitted, wrong) {
                    (Ok(true), false) => next[slot] += 1,
                    (Ok(false), true) => {}
                    _ => errors += 1,
                }
            }
            (lat, errors, sent_wrong)
        }));
    }
    let (mut all, mut errors, mut wrong) = (Vec::new(), 0, 0);
    for t in tasks {
        let (l, e, w) = t.await?;
        all.extend(l);
        errors += e;
        wrong += w;
    }
    Ok((all, errors, wrong))
}

/// Begins a login; the challenge if guardd prompts, `None` if it decides at once.
async fn begin(
    client: &mut GuardClient<tonic::transport::Channel>,
    user: &str,
) -> Result<Option<String>, tonic::Status> {
    let step = client
        .begin(BeginRequest {
            context: Some(LoginContext {
                user: user.into(),
                service: "load".into(),
                ..LoginContext::default()
            }),
        })
        .await?
        .into_inner();
    Ok(match step.kind {
        Some(step::Kind::Prompt(p)) => Some(p.challenge),
        _ => None,
    })
}

async fn login(
    client: &mut GuardClient<tonic::transport::Channel>,
    user: &str,
    code: &str,
) -> Result<bool, tonic::Status> {
    let Some(challenge) = begin(client, user).await? else {
        return Ok(false);
    };
    let done = client
        .answer(AnswerRequest {
            challenge,
            response: code.as_bytes().to_vec(),
        })
        .await?
        .into_inner();
    Ok(matches!(done.kind, Some(step::Kind::Permit(_))))
}
