//! Layer 4: a hostile local user. Any local user may connect to guardd's socket (it is 0666:
//! screen lockers run as the user), so every attack here is made from an unprivileged uid with
//! nothing but that socket: a real guardd, an attacker account (a token or backup codes enrolled
//! by root, as the attack needs) running `guardd-attack` under `setpriv`, and, while it runs, root
//! logging a victim in through the real module (pamtester under pam_wrapper, an HOTP token so
//! every login needs a fresh code). Root must still be served: every login passes, guardd's peak
//! RSS stays small, and the attack's own limits hold (checked answers, audit volume, CPU).
//!
//! Then the caller's identity: a user namespace, a borrowed group id, a user asking about
//! themself, a reused account name.
//!
//! Root only (users, setpriv): reported as ignored otherwise. One test at a time, whatever
//! `--test-threads` says: an attack takes the machine's cores, and another test's logins would
//! measure it. The figures:
//!
//! ```text
//! cargo test -p soffid-otp-tests --test hostile -- --nocapture --test-threads=1
//! ```
//!
//! prints one `attack=NAME root_logins=OK/N root_login_ms_median=… max=… guardd_peak_rss_kb=…
//! guardd_cpu_ms=… attacker=<guardd-attack's summary>` line per attack.

/// Every test here needs root (real users, /etc/pam.d, other uids): a normal user's run reports
/// them as ignored; the README's test command runs them as root (`--ignored as_root`).
mod as_root {
    use std::io::{BufRead, BufReader, Read};
    use std::path::Path;
    use std::process::{Child, Command, Output, Stdio};
    use std::sync::{mpsc, Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    use harness::{artefact, is_deny, Daemon, PamServices, Secret, User, STRICT_RULES};

    /// guardd's peak resident set must stay below this during any attack.
    const PEAK_RSS_LIMIT_KIB: u64 = 64 * 1024;
    /// Root logins made during each attack.
    const ROOT_LOGINS: usize = 10;
    /// After this many failed root logins in a row the rest are skipped (each may take the module's
    /// whole timeout), so a failing test still ends well within a minute.
    const GIVE_UP_AFTER: usize = 3;
    /// guardd's `max_failures` (its default): wrong answers checked before a user must wait.
    const MAX_FAILURES: usize = 5;
    /// The group guardd's test configuration names as `admin_group` (see the harness).
    const ADMIN_GROUP: &str = "soffid-otp-test-admins";
    /// The PAM service the root logins use.
    const SERVICE: &str = "otp-hostile";

    /// One test at a time (see the module comment).
    fn one_at_a_time() -> MutexGuard<'static, ()> {
        static TURN: Mutex<()> = Mutex::new(());
        TURN.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A local account of the test, and how to run a command as it.
    struct Local {
        user: User,
        uid: u32,
        gid: u32,
    }

    impl Local {
        fn create(prefix: &str) -> Local {
            let user = User::create_named(prefix);
            let pw = nix::unistd::User::from_name(&user.name)
                .unwrap()
                .expect("the user just created");
            Local {
                uid: pw.uid.as_raw(),
                gid: pw.gid.as_raw(),
                user,
            }
        }

        fn name(&self) -> &str {
            &self.user.name
        }

        /// `setpriv` as this user and its own group, no supplementary groups, no capabilities.
        fn run_as(&self) -> Command {
            self.run_as_with_gid(self.gid)
        }

        /// `setpriv` as this user with `gid` as the process's group.
        fn run_as_with_gid(&self, gid: u32) -> Command {
            let mut cmd = Command::new("setpriv");
            cmd.arg(format!("--reuid={}", self.uid))
                .arg(format!("--regid={gid}"))
                .args(["--clear-groups", "--inh-caps=-all", "--"]);
            cmd
        }
    }

    /// guardd-attack running as the attacker; killed on drop, also when the test fails.
    struct Attack {
        child: Option<Child>,
        ready: mpsc::Receiver<()>,
        stdout: Option<std::thread::JoinHandle<String>>,
        stderr: std::sync::Arc<Mutex<String>>,
        started: Instant,
    }

    impl Attack {
        fn start(d: &Daemon, attacker: &Local, attack: &str, args: &[&str]) -> Attack {
            let tool = d.world_executable_copy(Path::new(env!("CARGO_BIN_EXE_guardd-attack")));
            let mut child = attacker
                .run_as()
                .arg(tool)
                .arg(attack)
                .arg("--socket")
                .arg(&d.socket)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("setpriv (util-linux)");
            let (tx, ready) = mpsc::channel();
            let stderr = std::sync::Arc::new(Mutex::new(String::new()));
            let err = BufReader::new(child.stderr.take().unwrap());
            let seen = stderr.clone();
            std::thread::spawn(move || {
                for line in err.lines().map_while(Result::ok) {
                    if line == "ready" {
                        let _ = tx.send(());
                    }
                    let mut seen = seen.lock().unwrap();
                    if seen.len() < 64 * 1024 {
                        seen.push_str(&line);
                        seen.push('\n');
                    }
                }
            });
            let mut out = child.stdout.take().unwrap();
            let stdout = std::thread::spawn(move || {
                let mut s = String::new();
                let _ = out.read_to_string(&mut s);
                s
            });
            Attack {
                child: Some(child),
                ready,
                stdout: Some(stdout),
                stderr,
                started: Instant::now(),
            }
        }

        /// Waits until the attack's first burst is out.
        fn wait_ready(&self, within: Duration) {
            if self.ready.recv_timeout(within).is_err() {
                panic!(
                    "guardd-attack was not ready within {within:?}; its stderr:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
        }

        /// Ends the attack now (SIGTERM) and returns its summary line.
        fn stop(self) -> String {
            if let Some(child) = &self.child {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::SIGTERM,
                );
            }
            self.summary()
        }

        /// Lets the attack run to its own end and returns its summary line.
        fn summary(mut self) -> String {
            let mut child = self.child.take().unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let out = self.stdout.take().unwrap().join().unwrap_or_default();
            match out.lines().rev().find(|l| l.starts_with("attack=")) {
                Some(line) => line.to_owned(),
                None => panic!(
                    "guardd-attack printed no summary; stdout:\n{out}\nstderr:\n{}",
                    self.stderr.lock().unwrap()
                ),
            }
        }

        fn running_for(&self) -> Duration {
            self.started.elapsed()
        }
    }

    impl Drop for Attack {
        fn drop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// A `key=N` count of a summary line (0 when absent).
    fn field(summary: &str, key: &str) -> u64 {
        summary
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The account root logs in during the attacks, with an HOTP token: each login needs a fresh
    /// code.
    struct Victim {
        local: Local,
        secret: Secret,
        /// The next HOTP counter to use.
        next: u64,
        pam: PamServices,
    }

    impl Victim {
        fn enroll(d: &Daemon, rt: &tokio::runtime::Runtime) -> Victim {
            let local = Local::create("otpvic");
            let secret = rt.block_on(d.enroll_hotp(local.name()));
            let pam = PamServices::new(
                SERVICE,
                &PamServices::module_line(&format!(
                    "socket={} timeout=5 failmode=secure",
                    d.socket.display()
                )),
            );
            Victim {
                local,
                secret,
                next: 1,
                pam,
            }
        }
    }

    /// Root's logins during an attack: each one's time, and what the failed ones printed.
    struct RootLogins {
        ms: Vec<f64>,
        failures: Vec<String>,
    }

    impl RootLogins {
        fn ok(&self) -> usize {
            self.ms.len() - self.failures.len()
        }

        fn median_ms(&self) -> f64 {
            let mut v = self.ms.clone();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        }

        fn max_ms(&self) -> f64 {
            self.ms.iter().copied().fold(0.0, f64::max)
        }
    }

    fn text(out: &Output) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Root logs the victim in through the module, up to ROOT_LOGINS times, timing each.
    fn root_logins(d: &Daemon, victim: &mut Victim) -> RootLogins {
        let mut logins = RootLogins {
            ms: Vec::new(),
            failures: Vec::new(),
        };
        let mut in_a_row = 0;
        for i in 0..ROOT_LOGINS {
            // A failed login may or may not have used its code: always move on (10 logins stay
            // within the HOTP look-ahead of 10).
            let code = victim.secret.hotp(victim.next);
            victim.next += 1;
            d.remember(&code);
            let t = Instant::now();
            let out = victim
                .pam
                .pamtester(SERVICE, victim.local.name(), &format!("{code}\n"));
            logins.ms.push(t.elapsed().as_secs_f64() * 1000.0);
            if out.status.success() {
                in_a_row = 0;
            } else {
                in_a_row += 1;
                logins.failures.push(format!(
                    "login {}: {:?} after {:.0} ms: {}",
                    i + 1,
                    out.status.code(),
                    t.elapsed().as_secs_f64() * 1000.0,
                    text(&out).trim()
                ));
                if in_a_row == GIVE_UP_AFTER {
                    break;
                }
            }
        }
        logins
    }

    /// guardd's peak resident set (VmHWM), in KiB; 0 when guardd is gone.
    fn peak_rss_kib(d: &Daemon) -> u64 {
        guardd::procfs::peak_rss_kib(d.pid().as_raw() as u32)
    }

    /// The CPU time (user + system) guardd has used so far, in milliseconds; 0 when it is gone.
    fn cpu_ms(d: &Daemon) -> u64 {
        guardd::procfs::cpu_us(d.pid().as_raw() as u32) / 1000
    }

    /// Whether guardd still runs (not exited, not killed: a zombie until the harness reaps it).
    fn alive(d: &Daemon) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", d.pid()))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().to_owned())
            })
            .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
    }

    /// The end of guardd's log, for failure messages.
    fn log_tail(d: &Daemon, lines: usize) -> String {
        let log = d.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|l| l.chars().take(300).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Failed checks of one test, reported together so one run shows every broken limit.
    #[derive(Default)]
    struct Checks(Vec<String>);

    impl Checks {
        fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
            if !ok {
                self.0.push(what());
            }
        }

        fn root_served(&mut self, d: &Daemon, logins: &RootLogins, rss: u64) {
            self.check(alive(d), || {
                "guardd is no longer running (crashed or killed, e.g. by the OOM killer)".into()
            });
            self.check(
                logins.failures.is_empty() && logins.ms.len() == ROOT_LOGINS,
                || {
                    format!(
                        "root logins failed during the attack ({} of {} passed):\n  {}",
                        logins.ok(),
                        logins.ms.len(),
                        logins.failures.join("\n  ")
                    )
                },
            );
            self.check(rss < PEAK_RSS_LIMIT_KIB, || {
                format!("guardd's peak RSS {rss} KiB is over {PEAK_RSS_LIMIT_KIB} KiB")
            });
        }

        fn assert_none(self, line: &str, d: &Daemon) {
            assert!(
                self.0.is_empty(),
                "{line}\n{}\nguardd's log ends:\n{}",
                self.0.join("\n"),
                log_tail(d, 8)
            );
        }
    }

    /// The figures line of an attack.
    fn report(attack: &str, logins: &RootLogins, rss: u64, cpu: u64, summary: &str) -> String {
        let line = format!(
            "attack={attack} root_logins={}/{} root_login_ms_median={:.1} max={:.1} guardd_peak_rss_kb={rss} guardd_cpu_ms={cpu} attacker={summary}",
            logins.ok(),
            logins.ms.len(),
            logins.median_ms(),
            logins.max_ms(),
        );
        println!("{line}");
        line
    }

    /// Logins of the attacker's own account (which has a token), begun as fast as they go and never
    /// answered: the table of open conversations is guardd's to bound per user, not global.
    #[test]
    #[ignore = "needs root"]
    fn a_flood_of_unanswered_logins_leaves_root_served() {
        let _turn = one_at_a_time();
        let rt = runtime();
        let d = Daemon::with_config(STRICT_RULES, "max_tries = 1\n");
        let mut victim = Victim::enroll(&d, &rt);
        let attacker = Local::create("otpatk");
        rt.block_on(d.enroll_active(attacker.name()));
        let cpu = cpu_ms(&d);
        let attack = Attack::start(
            &d,
            &attacker,
            "sessions",
            &[
                "--user",
                attacker.name(),
                "--count",
                "5000",
                "--seconds",
                "60",
            ],
        );
        attack.wait_ready(Duration::from_secs(30));
        let logins = root_logins(&d, &mut victim);
        let summary = attack.stop();
        let (rss, cpu) = (peak_rss_kib(&d), cpu_ms(&d).saturating_sub(cpu));
        let line = report("sessions", &logins, rss, cpu, &summary);
        let mut checks = Checks::default();
        checks.root_served(&d, &logins, rss);
        checks.check(field(&summary, "prompt") > 0, || {
            "the attacker never got a prompt: the attack did not run as meant".into()
        });
        checks.assert_none(&line, &d);
    }

    /// Wrong backup-code-shaped answers from many connections at once, over and over: each one is
    /// an Argon2 comparison against every stored hash unless it is refused first. At most the free
    /// failures may be checked (the rest are refused as locked, unchecked), the hashing must not
    /// grow guardd, and root's logins must not wait behind it. The counts are the attacker's own
    /// (each reply's deny reason): guardd audits an unprivileged uid's denials only a few lines per
    /// interval, which is checked too. (A reply cannot tell an answer hashed and then refused as
    /// locked from one refused at once; the attacker's `answer_locked_slow` counts the locked
    /// refusals that took over 100 ms, a hint of the former, and the peak RSS shows how many hashes
    /// ran at once.)
    #[test]
    #[ignore = "needs root"]
    fn a_backup_code_storm_gets_only_the_free_failures_checked_and_leaves_root_served() {
        let _turn = one_at_a_time();
        let rt = runtime();
        let d = Daemon::with_config(STRICT_RULES, "max_tries = 1\n");
        let mut victim = Victim::enroll(&d, &rt);
        let attacker = Local::create("otpatk");
        rt.block_on(async {
            d.enroll_active(attacker.name()).await;
            d.backup_codes(attacker.name()).await;
        });
        let cpu = cpu_ms(&d);
        let attack = Attack::start(
            &d,
            &attacker,
            "backup",
            &[
                "--user",
                attacker.name(),
                "--parallel",
                "8",
                "--seconds",
                "60",
            ],
        );
        attack.wait_ready(Duration::from_secs(30));
        let logins = root_logins(&d, &mut victim);
        // A few seconds of storm at least, whatever the logins took.
        std::thread::sleep(Duration::from_secs(5).saturating_sub(attack.running_for()));
        let summary = attack.stop();
        let (rss, cpu) = (peak_rss_kib(&d), cpu_ms(&d).saturating_sub(cpu));
        let line = report("backup", &logins, rss, cpu, &summary);
        let log = d.log();
        let audited = harness::audit_events(&log)
            .iter()
            .filter(|e| e["action"] == "answer" && e["user"] == attacker.name())
            .count();
        let checked = field(&summary, "answer_checked") as usize;
        let locked = field(&summary, "answer_locked") as usize;
        println!("attack=backup checked={checked} locked={locked} audited_answers={audited}");
        let mut checks = Checks::default();
        checks.root_served(&d, &logins, rss);
        checks.check(checked <= MAX_FAILURES, || {
            format!("{checked} of the attacker's answers were checked (denied as wrong), not at most {MAX_FAILURES}")
        });
        checks.check(audited < 100, || {
            format!(
                "{audited} audit lines of the attacker's answers, not under 100: not rate-limited"
            )
        });
        checks.check(field(&summary, "answer_permit") == 0, || {
            "a guessed backup code was accepted".into()
        });
        checks.check(checked + locked > MAX_FAILURES, || {
            format!(
                "only {} answers were answered: the storm did not run as meant",
                checked + locked
            )
        });
        checks.assert_none(&line, &d);
    }

    /// Streams to Begin that declare a 4 MB message and send a megabyte of it, never the rest,
    /// spread over as many connections as guardd takes: what guardd buffers for them must stay
    /// bounded, and the streams must not keep root out.
    #[test]
    #[ignore = "needs root"]
    fn half_sent_messages_neither_grow_guardd_nor_keep_root_out() {
        let _turn = one_at_a_time();
        let rt = runtime();
        let d = Daemon::with_config(STRICT_RULES, "max_tries = 1\n");
        let mut victim = Victim::enroll(&d, &rt);
        let attacker = Local::create("otpatk");
        let cpu = cpu_ms(&d);
        let attack = Attack::start(
            &d,
            &attacker,
            "halfsent",
            &["--count", "200", "--bytes", "1000000", "--seconds", "60"],
        );
        attack.wait_ready(Duration::from_secs(30));
        // Let the bytes already sent land before the logins.
        std::thread::sleep(Duration::from_secs(1));
        let logins = root_logins(&d, &mut victim);
        let summary = attack.stop();
        let (rss, cpu) = (peak_rss_kib(&d), cpu_ms(&d).saturating_sub(cpu));
        let line = report("halfsent", &logins, rss, cpu, &summary);
        let mut checks = Checks::default();
        checks.root_served(&d, &logins, rss);
        checks.check(field(&summary, "sent") > 0, || {
            "the attacker opened no stream: the attack did not run as meant".into()
        });
        checks.assert_none(&line, &d);
    }

    /// Thousands of connections that never say anything (half of them after the HTTP/2 preface),
    /// against a guardd whose descriptor limit (512) they exceed: guardd must neither spin on a
    /// failing accept nor leave root without a connection.
    #[test]
    #[ignore = "needs root"]
    fn thousands_of_idle_connections_neither_starve_root_nor_spin_guardd() {
        let _turn = one_at_a_time();
        let rt = runtime();
        let d = Daemon::with_config(STRICT_RULES, "max_tries = 1\n");
        let mut victim = Victim::enroll(&d, &rt);
        let attacker = Local::create("otpatk");
        harness::run(
            Command::new("prlimit")
                .arg("--nofile=512:512")
                .arg(format!("--pid={}", d.pid())),
        );
        let cpu = cpu_ms(&d);
        let attack = Attack::start(
            &d,
            &attacker,
            "idle",
            &["--count", "3000", "--preface", "half", "--seconds", "60"],
        );
        attack.wait_ready(Duration::from_secs(30));
        let logins = root_logins(&d, &mut victim);
        // Enough attack time for the CPU figure to mean something.
        std::thread::sleep(Duration::from_secs(8).saturating_sub(attack.running_for()));
        let wall_ms = attack.running_for().as_millis() as u64;
        let summary = attack.stop();
        let (rss, cpu) = (peak_rss_kib(&d), cpu_ms(&d).saturating_sub(cpu));
        let line = report("idle", &logins, rss, cpu, &summary);
        let mut checks = Checks::default();
        checks.root_served(&d, &logins, rss);
        // A spinning accept loop burns a whole core: 100% of the wall time.
        checks.check(cpu * 5 < wall_ms, || {
            format!("guardd used {cpu} ms of CPU in {wall_ms} ms of idle connections (over 20%)")
        });
        checks.check(field(&summary, "ok") > 512, || {
            "the attacker did not get past guardd's 512 descriptors: the attack did not run as meant"
                .into()
        });
        checks.assert_none(&line, &d);
    }

    /// Calls guardd must refuse, as fast as they go: each refusal may be audited, but not one line
    /// each; a few lines and a summary of what was left out.
    #[test]
    #[ignore = "needs root"]
    fn a_flood_of_refused_calls_is_audited_in_bounded_lines_with_a_summary() {
        let _turn = one_at_a_time();
        let rt = runtime();
        let mut d = Daemon::with_config(STRICT_RULES, "max_tries = 1\n");
        let mut victim = Victim::enroll(&d, &rt);
        let attacker = Local::create("otpatk");
        let cpu = cpu_ms(&d);
        let attack = Attack::start(&d, &attacker, "refused", &["--seconds", "10"]);
        attack.wait_ready(Duration::from_secs(30));
        let logins = root_logins(&d, &mut victim);
        let summary = attack.summary();
        let (rss, cpu) = (peak_rss_kib(&d), cpu_ms(&d).saturating_sub(cpu));
        let line = report("refused", &logins, rss, cpu, &summary);
        let refusals = |log: &str| {
            harness::audit_events(log)
                .iter()
                .filter(|e| e["caller_uid"] == attacker.uid && e["outcome"] == "refused")
                .count()
        };
        // A summary of refusals left out may come a little later, or when guardd stops.
        let mut summarised = refusal_summary(&d.log(), attacker.uid);
        let deadline = Instant::now() + Duration::from_secs(3);
        while summarised.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            summarised = refusal_summary(&d.log(), attacker.uid);
        }
        let mut checks = Checks::default();
        checks.root_served(&d, &logins, rss);
        if summarised.is_none() {
            d.stop();
            summarised = refusal_summary(&d.log(), attacker.uid);
        }
        let audited = refusals(&d.log());
        println!(
            "attack=refused audit_refusal_lines={audited} summary={}",
            summarised.as_deref().unwrap_or("none")
        );
        checks.check(audited < 100, || {
            format!(
                "{audited} audit lines of refusals for uid {} in ~10 s, not under 100",
                attacker.uid
            )
        });
        checks.check(summarised.is_some(), || {
            format!(
                "no audit line sums up the refusals left out for uid {}",
                attacker.uid
            )
        });
        checks.check(field(&summary, "sent") >= 500, || {
            "fewer than 500 calls in 10 s: the attack did not run as meant".into()
        });
        checks.check(field(&summary, "not_refused") == 0, || {
            "guardd answered a call it must refuse".into()
        });
        checks.assert_none(&line, &d);
    }

    /// A line of the log that sums up refusals of `uid` that were not logged one by one: it names
    /// the uid (as a number of its own: `caller_uid=UID`, `uid=UID`, `uid UID`) and says that lines
    /// were left out ("suppressed", "rate limit(ed)", "throttled", "omitted", "not logged",
    /// "dropped", "skipped", "elided", "coalesced", "summary").
    fn refusal_summary(log: &str, uid: u32) -> Option<String> {
        const SAYS_SO: &[&str] = &[
            "suppress",
            "rate limit",
            "rate-limit",
            "rate_limit",
            "ratelimit",
            "throttl",
            "omitted",
            "not logged",
            "dropped",
            "skipped",
            "elided",
            "coalesc",
            "summar",
        ];
        let uid = uid.to_string();
        log.lines()
            .find(|l| {
                let lower = l.to_lowercase();
                l.split(|c: char| !c.is_ascii_alphanumeric())
                    .any(|word| word == uid)
                    && SAYS_SO.iter().any(|w| lower.contains(w))
            })
            .map(str::to_owned)
    }

    /// What `refusal_summary` takes for a summary, and what not (no root needed).
    #[test]
    fn refusal_summaries_are_told_from_refusals() {
        let refusal = r#"2026-11-29T17:36:04.589963Z  INFO audit: action="list" user="*" service="" rhost="" tty="" outcome="refused" reason="permission denied: run this as root or as a member of the guardd admin group" token="" rule="" policy="" caller_uid=1003 caller_pid=12279"#;
        assert_eq!(refusal_summary(refusal, 1003), None);
        for summary in [
            r#"2026-11-29T17:36:14Z  WARN audit: action="refusals" outcome="suppressed" count=18923 caller_uid=1003"#,
            "2026-11-29T17:36:14Z  INFO audit: 18923 refusals of uid 1003 not logged in the last 10 s",
        ] {
            assert!(refusal_summary(summary, 1003).is_some(), "{summary}");
            assert_eq!(refusal_summary(summary, 100), None, "another uid");
        }
    }

    /// The attacker is over budget (its sessions flood runs), and logs in through a stack where the
    /// module is `failmode=safe` after a module that passes (the password, say): guardd's refusal
    /// of an over-budget user must be a failed login, not the module stepping aside as if guardd
    /// were absent, which would let the password alone in.
    #[test]
    #[ignore = "needs root"]
    fn an_over_budget_user_is_refused_by_a_failmode_safe_module_not_let_through() {
        let _turn = one_at_a_time();
        let rt = runtime();
        let d = Daemon::with_config(STRICT_RULES, "max_tries = 1\n");
        let attacker = Local::create("otpatk");
        let secret = rt.block_on(d.enroll_active(attacker.name()));
        let attack = Attack::start(
            &d,
            &attacker,
            "sessions",
            &[
                "--user",
                attacker.name(),
                "--count",
                "5000",
                "--seconds",
                "60",
            ],
        );
        attack.wait_ready(Duration::from_secs(30));
        let pam = PamServices::new(
            "otp-safe",
            &format!(
                "auth required pam_permit.so\n{}",
                PamServices::module_line(&format!(
                    "socket={} timeout=5 failmode=safe",
                    d.socket.display()
                ))
            ),
        );
        let mut passed = Vec::new();
        for _ in 0..3 {
            // If guardd prompts after all, a wrong code: the login must fail either way.
            let out = pam.pamtester(
                "otp-safe",
                attacker.name(),
                &format!("{}\n", secret.wrong_code()),
            );
            if out.status.success() {
                passed.push(text(&out));
            }
        }
        let summary = attack.stop();
        println!(
            "attack=sessions failmode=safe attacker_logins_passed={}/3 attacker={summary}",
            passed.len()
        );
        assert!(
            passed.is_empty(),
            "the over-budget attacker logged in without a code through failmode=safe:\n{}\nguardd's log ends:\n{}",
            passed.join("\n"),
            log_tail(&d, 10)
        );
    }

    /// A caller inside its own user namespace is uid 0 there, but SO_PEERCRED reports its uid as
    /// guardd's namespace sees it: `guardctl list` of everyone is refused as that uid.
    #[test]
    #[ignore = "needs root"]
    fn root_inside_a_user_namespace_is_still_its_real_uid() {
        let _turn = one_at_a_time();
        let d = Daemon::start();
        let user = Local::create("otpns");
        let guardctl = d.world_executable_copy(&artefact("guardctl"));
        let probe = user
            .run_as()
            .args(["unshare", "-r", "id", "-u"])
            .output()
            .unwrap();
        if !probe.status.success() || String::from_utf8_lossy(&probe.stdout).trim() != "0" {
            eprintln!(
                "skipped: this kernel lets no unprivileged user namespace be made: {}",
                text(&probe)
            );
            return;
        }
        let out = user
            .run_as()
            .args(["unshare", "-r"])
            .arg(&guardctl)
            .arg("--socket")
            .arg(&d.socket)
            .arg("list")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains("permission denied"), "{}", text(&out));
        assert!(
            harness::audited(
                &d.log(),
                &[
                    ("action", "list"),
                    ("outcome", "refused"),
                    ("caller_uid", &user.uid.to_string())
                ]
            ),
            "the refusal is not audited as uid {}:\n{}",
            user.uid,
            log_tail(&d, 10)
        );
    }

    /// The admin group, created for the test when the system has none (and then removed).
    struct AdminGroup {
        gid: u32,
        created: bool,
    }

    impl AdminGroup {
        fn ensure() -> AdminGroup {
            let mut created = false;
            if nix::unistd::Group::from_name(ADMIN_GROUP)
                .unwrap()
                .is_none()
            {
                harness::run(Command::new("groupadd").arg(ADMIN_GROUP));
                created = true;
            }
            let gid = nix::unistd::Group::from_name(ADMIN_GROUP)
                .unwrap()
                .expect("the admin group")
                .gid
                .as_raw();
            AdminGroup { gid, created }
        }
    }

    impl Drop for AdminGroup {
        fn drop(&mut self) {
            if self.created {
                let _ = Command::new("groupdel").arg(ADMIN_GROUP).output();
            }
        }
    }

    /// A process may run with the admin group's id as its gid (a setgid program, `newgrp` with a
    /// group password) without its user being a member: that makes no administrator. A member of
    /// the group is one.
    #[test]
    #[ignore = "needs root"]
    fn the_admin_groups_id_as_process_gid_makes_no_administrator() {
        let _turn = one_at_a_time();
        let group = AdminGroup::ensure();
        let d = Daemon::start();
        let rt = runtime();
        rt.block_on(d.enroll_active("daemon"));
        let guardctl = d.world_executable_copy(&artefact("guardctl"));
        let member = Local::create("otpadm");
        harness::run(Command::new("usermod").args(["-aG", ADMIN_GROUP, member.name()]));
        let outsider = Local::create("otpout");
        let list = |cmd: &mut Command| {
            cmd.arg(&guardctl)
                .arg("--socket")
                .arg(&d.socket)
                .arg("list")
                .output()
                .unwrap()
        };
        let by_member = list(&mut member.run_as());
        assert!(
            by_member.status.success() && text(&by_member).contains("daemon"),
            "a member of {ADMIN_GROUP} may list everyone's tokens: {}",
            text(&by_member)
        );
        let by_outsider = list(&mut outsider.run_as_with_gid(group.gid));
        assert_eq!(
            by_outsider.status.code(),
            Some(1),
            "a non-member running with gid {} ({ADMIN_GROUP}) listed everyone's tokens: {}",
            group.gid,
            text(&by_outsider)
        );
        assert!(
            text(&by_outsider).contains("permission denied"),
            "{}",
            text(&by_outsider)
        );
    }

    /// `explain` shows how the rules treat a login, groups and enrolment included: admins only,
    /// also about oneself (a user would learn which of the site's rules to get around).
    #[test]
    #[ignore = "needs root"]
    fn explain_is_for_administrators_even_about_oneself() {
        let _turn = one_at_a_time();
        let d = Daemon::start();
        let user = Local::create("otpexp");
        let rt = runtime();
        rt.block_on(d.enroll_active(user.name()));
        let guardctl = d.world_executable_copy(&artefact("guardctl"));
        let explain = |cmd: &mut Command| {
            cmd.arg(&guardctl)
                .arg("--socket")
                .arg(&d.socket)
                .args(["explain", "--user", user.name(), "--service", "sshd"])
                .output()
                .unwrap()
        };
        let by_root = explain(&mut Command::new("env"));
        assert!(
            by_root.status.success(),
            "root may explain: {}",
            text(&by_root)
        );
        let by_self = explain(&mut user.run_as());
        assert_eq!(
            by_self.status.code(),
            Some(1),
            "{} was shown how the rules decide their logins: {}",
            user.name(),
            text(&by_self)
        );
        assert!(
            text(&by_self).contains("permission denied"),
            "{}",
            text(&by_self)
        );
    }

    const UNENROLLED_PERMIT_RULES: &str = r#"
    version = 1
    algorithm = "first-applicable"
    default = "deny"

    [[rule]]
    id = "enrolled-otp"
    effect = "otp"
    unenrolled = "permit"
    "#;

    /// An account enrolled, deleted, and made again under the same name with another uid is a new
    /// person: the old account's token must not open its logins, nor may the new account pass as
    /// unenrolled (no code) while a token of that name exists. Its login is denied until an
    /// administrator sorts it out.
    #[test]
    #[ignore = "needs root"]
    fn a_new_account_reusing_an_enrolled_name_is_denied() {
        let _turn = one_at_a_time();
        let d = Daemon::with_config(UNENROLLED_PERMIT_RULES, "max_tries = 1\n");
        let rt = runtime();
        let old = Local::create("otpreuse");
        let secret = rt.block_on(d.enroll_active(old.name()));
        let name = old.name().to_owned();
        harness::run(Command::new("userdel").args(["-r", &name]));
        let new_uid = (old.uid + 1000..)
            .find(|uid| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(*uid))
                    .unwrap()
                    .is_none()
            })
            .unwrap();
        // `old` (a User) removes the new account under the same name on drop.
        harness::run(Command::new("useradd").args([
            "-m",
            "-s",
            "/bin/sh",
            "-u",
            &new_uid.to_string(),
            &name,
        ]));
        harness::run(Command::new("usermod").args(["-p", "*", &name]));
        // guardd reuses an account look-up for one second (see the README's trust model).
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let step = rt.block_on(d.login(&name, &secret.code_at(0)));
        assert!(
            is_deny(&step),
            "{name} (uid {} deleted, now uid {new_uid}) logging in with the old account's token: {step:?}\n{}",
            old.uid,
            log_tail(&d, 5)
        );
    }
}
