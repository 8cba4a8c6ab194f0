//! Fleets: several guardd processes, each with its own `host`, on one real PostgreSQL (a
//! throw-away cluster started by the test run). One token per person across hosts, codes used
//! once fleet-wide, the back-off counted across hosts, and crashes of a guardd or of the
//! database that lose nothing acknowledged.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{is_deny, is_permit, login_with, Daemon, Secret, SharedStore, STRICT_RULES};
use proto::v1::guard_client::GuardClient;
use proto::v1::{step, DenyReason};

/// System accounts every Debian machine has: one HOTP token each in the load runs.
const USERS: [&str; 8] = ["daemon", "bin", "sys", "games", "man", "lp", "mail", "news"];

/// Guardd processes on one store, each with its own host name (`host-0`, `host-1`, ...).
struct Fleet {
    hosts: Vec<Daemon>,
    _keys: tempfile::TempDir,
}

impl Fleet {
    fn start(cluster: &pgtemp::Cluster, n: usize) -> Fleet {
        Fleet::with_rules(cluster, n, STRICT_RULES)
    }

    fn with_rules(cluster: &pgtemp::Cluster, n: usize, rules: &str) -> Fleet {
        let keys = tempfile::tempdir().unwrap();
        let store = SharedStore::postgres(cluster, keys.path());
        let hosts = (0..n)
            .map(|i| {
                Daemon::on_store(
                    rules,
                    &format!("max_tries = 1\nhost = \"host-{i}\"\n"),
                    Some(&store),
                )
            })
            .collect();
        Fleet { hosts, _keys: keys }
    }

    fn sockets(&self) -> Vec<PathBuf> {
        self.hosts.iter().map(|d| d.socket.clone()).collect()
    }

    /// Every host's log, for a failure message.
    fn logs(&self) -> String {
        self.hosts
            .iter()
            .enumerate()
            .map(|(i, d)| format!("--- host-{i}\n{}", d.log()))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_enrolled_on_one_host_logs_in_on_another_once() {
    let fleet = Fleet::start(pgtemp::Cluster::shared(), 3);
    let secret = fleet.hosts[0].enroll_active("daemon").await;
    let code = secret.code_at(0);
    fleet.hosts[2].remember(&code);
    assert!(
        is_permit(&fleet.hosts[2].login("daemon", &code).await),
        "{}",
        fleet.logs()
    );
    // Used up on host-2: refused there again and on host-1.
    assert!(is_deny(&fleet.hosts[1].login("daemon", &code).await));
    assert!(is_deny(&fleet.hosts[2].login("daemon", &code).await));
    // Each host's audit lines name it.
    let log = fleet.hosts[2].log();
    let answer = harness::audit_events(&log)
        .into_iter()
        .find(|e| e["action"] == "answer")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(answer["host"], "host-2", "{answer:?}");
}

/// Grants are in the shared store: reused on another host only where the rule leaves `host` out
/// of its scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_is_reused_across_hosts_only_without_host_in_its_scope() {
    let rules = r#"
version = 1
default = "deny"

[[rule]]
id = "fleet-wide"
effect = "otp"
reuse = "10m"
reuse_scope = ["service"]
match = { user = ["daemon"] }

[[rule]]
id = "per-host"
effect = "otp"
reuse = "10m"
reuse_scope = ["service", "host"]
match = { user = ["bin"] }
"#;
    let fleet = Fleet::with_rules(pgtemp::Cluster::shared(), 2, rules);
    for user in ["daemon", "bin"] {
        let secret = fleet.hosts[0].enroll_active(user).await;
        let code = secret.code_at(0);
        assert!(
            is_permit(&fleet.hosts[0].login(user, &code).await),
            "{}",
            fleet.logs()
        );
        // Again on host-0: let in without a code (no prompt, so the empty answer is unused).
        assert!(
            is_permit(&fleet.hosts[0].login(user, "").await),
            "{}",
            fleet.logs()
        );
    }
    assert!(
        is_permit(&fleet.hosts[1].login("daemon", "").await),
        "{}",
        fleet.logs()
    );
    assert!(
        is_deny(&fleet.hosts[1].login("bin", "").await),
        "{}",
        fleet.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_codes_on_one_host_lock_the_user_out_on_another() {
    let fleet = Fleet::start(pgtemp::Cluster::shared(), 2);
    let secret = fleet.hosts[0].enroll_active("daemon").await;
    for _ in 0..5 {
        let step = fleet.hosts[0].login("daemon", &secret.wrong_code()).await;
        assert!(is_deny(&step));
    }
    let code = secret.code_at(0);
    let step = fleet.hosts[1].login("daemon", &code).await;
    match step.kind {
        Some(step::Kind::Deny(d)) => assert_eq!(d.reason(), DenyReason::Locked, "{d:?}"),
        other => panic!("the back-off must hold on host-1, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guardd_killed_during_a_load_run_loses_no_accepted_code() {
    let mut fleet = Fleet::start(pgtemp::Cluster::shared(), 3);
    let run = LoadRun::start(&fleet).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed = Instant::now();
    fleet.hosts[1].crash_and_restart();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let outcome = run.stop().await;
    assert!(
        outcome.accepted_since(killed) > 0,
        "{outcome:?}\n{}",
        fleet.logs()
    );
    outcome.check(&fleet).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_during_a_load_run_fails_calls_fast_and_service_resumes() {
    // A cluster of its own: this test stops it.
    let cluster = pgtemp::Cluster::start();
    let fleet = Fleet::start(&cluster, 2);
    let run = LoadRun::start(&fleet).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cluster.stop();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    cluster.start_server();
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let outcome = run.stop().await;
    // During the outage calls failed, each well within the module's default 5 s timeout.
    assert!(outcome.failures > 0, "{outcome:?}");
    assert!(
        outcome.slowest_failure < Duration::from_millis(4500),
        "{outcome:?}"
    );
    // Logins were accepted again after the restart, by the same guardd processes.
    assert!(
        outcome.accepted_since(restarted) > 0,
        "{outcome:?}\n{}",
        fleet.logs()
    );
    outcome.check(&fleet).await;
}

/// Clients logging in with fresh HOTP codes, spread over the hosts of a fleet, until stopped.
struct LoadRun {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Record>>,
}

/// What one client saw.
#[derive(Debug, Default)]
struct Record {
    user: String,
    /// The host it logs in on.
    host: usize,
    /// The HOTP counters a host accepted, with when, and their codes.
    accepted: Vec<(u64, Instant, String)>,
    /// Calls that failed (guardd or the database away), and the slowest of them.
    failures: usize,
    slowest_failure: Duration,
    /// Denials of a code not tried before: none may happen.
    unexpected_denials: usize,
}

#[derive(Debug)]
struct Outcome {
    records: Vec<Record>,
    failures: usize,
    slowest_failure: Duration,
}

impl LoadRun {
    async fn start(fleet: &Fleet) -> LoadRun {
        let sockets = fleet.sockets();
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (i, user) in USERS.iter().enumerate() {
            let secret = fleet.hosts[0].enroll_hotp(user).await;
            let host = i % sockets.len();
            let socket = sockets[host].clone();
            let record = Record {
                user: user.to_string(),
                host,
                ..Record::default()
            };
            tasks.push(tokio::spawn(drive(record, secret, socket, stop.clone())));
        }
        LoadRun { stop, tasks }
    }

    async fn stop(self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        let mut records = Vec::new();
        for t in self.tasks {
            records.push(t.await.unwrap());
        }
        let failures = records.iter().map(|r| r.failures).sum();
        let slowest_failure = records
            .iter()
            .map(|r| r.slowest_failure)
            .max()
            .unwrap_or_default();
        Outcome {
            records,
            failures,
            slowest_failure,
        }
    }
}

/// One client: the next HOTP code of its user, again and again. A call that failed is retried
/// with the same code (it may have been accepted before the failure: then the retry must be
/// refused, and the client moves on).
async fn drive(
    mut record: Record,
    secret: Secret,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
) -> Record {
    let user = record.user.clone();
    let (mut counter, mut retrying) = (1u64, false);
    let mut client: Option<GuardClient<tonic::transport::Channel>> = None;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        if client.is_none() {
            match proto::connect(&socket, Duration::from_secs(5)).await {
                Ok(channel) => client = Some(GuardClient::new(channel)),
                Err(_) => {
                    record.failures += 1;
                    record.slowest_failure = record.slowest_failure.max(started.elapsed());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let code = secret.hotp(counter);
        match login_with(c, &user, &code).await {
            Ok(step) if is_permit(&step) => {
                record.accepted.push((counter, Instant::now(), code));
                counter += 1;
                retrying = false;
            }
            Ok(_) => {
                record.unexpected_denials += usize::from(!retrying);
                counter += 1;
                retrying = false;
            }
            Err(_) => {
                record.failures += 1;
                record.slowest_failure = record.slowest_failure.max(started.elapsed());
                client = None;
                retrying = true;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    record
}

impl Outcome {
    fn accepted_since(&self, t: Instant) -> usize {
        self.records
            .iter()
            .flat_map(|r| &r.accepted)
            .filter(|(_, at, _)| *at > t)
            .count()
    }

    /// Every accepted code was accepted once, no fresh code was refused, and every accepted
    /// code is refused now on every host.
    async fn check(&self, fleet: &Fleet) {
        for r in &self.records {
            assert_eq!(r.unexpected_denials, 0, "{r:?}\n{}", fleet.logs());
            assert!(!r.accepted.is_empty(), "{r:?}\n{}", fleet.logs());
            let mut counters: Vec<u64> = r.accepted.iter().map(|(c, _, _)| *c).collect();
            let n = counters.len();
            counters.sort_unstable();
            counters.dedup();
            assert_eq!(counters.len(), n, "a code accepted twice: {r:?}");
        }
        // Replayed on another host than the one that accepted it: refused.
        let sockets = fleet.sockets();
        let replays: Vec<_> = self
            .records
            .iter()
            .map(|r| {
                let socket = sockets[(r.host + 1) % sockets.len()].clone();
                let (user, codes) = (r.user.clone(), r.accepted.clone());
                tokio::spawn(async move {
                    let channel = proto::connect(&socket, Duration::from_secs(5))
                        .await
                        .unwrap();
                    let mut client = GuardClient::new(channel);
                    let mut accepted_again = Vec::new();
                    for (counter, _, code) in codes {
                        let step = login_with(&mut client, &user, &code).await.unwrap();
                        if !is_deny(&step) {
                            accepted_again.push(counter);
                        }
                    }
                    (user, accepted_again)
                })
            })
            .collect();
        for replay in replays {
            let (user, again) = replay.await.unwrap();
            assert!(again.is_empty(), "{user}: codes accepted again: {again:?}");
        }
    }
}

/// Tests that need root: a real account and PAM services in /etc/pam.d for the system's libpam.
/// Ignored in a normal user's run; the README's test command runs them when it is root.
mod as_root {
    use super::*;
    use harness::{system_pamtester, EtcFile, PamServices, User};

    /// Forty logins at once, spread over eight guardds through the real module and the
    /// system's libpam, all answer with the same valid code: exactly one gets in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root"]
    async fn forty_logins_with_one_code_over_eight_hosts_get_in_once() {
        let fleet = Fleet::start(pgtemp::Cluster::shared(), 8);
        let user = User::create_named("fleet");
        let secret = fleet.hosts[0].enroll_active(&user.name).await;
        let services: Vec<(String, EtcFile)> = fleet
            .hosts
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let name = format!("soffid-fleet-{}-{i}", std::process::id());
                let stack =
                    PamServices::module_line(&format!("socket={} timeout=10", d.socket.display()));
                let file = EtcFile::write(&format!("/etc/pam.d/{name}"), &stack, 0o644);
                (name, file)
            })
            .collect();
        let code = secret.code_at(0);
        fleet.hosts[0].remember(&code);
        let input = format!("{code}\n");
        let results: Vec<bool> = std::thread::scope(|scope| {
            let logins: Vec<_> = (0..40)
                .map(|i| {
                    let (service, input, user) = (&services[i % 8].0, &input, &user.name);
                    scope.spawn(move || system_pamtester(service, user, input).status.success())
                })
                .collect();
            logins.into_iter().map(|l| l.join().unwrap()).collect()
        });
        let successes = results.iter().filter(|ok| **ok).count();
        assert_eq!(successes, 1, "{}", fleet.logs());
        // Every host took part, and the others refused the used code.
        for (i, d) in fleet.hosts.iter().enumerate() {
            assert!(
                harness::audited(&d.log(), &[("action", "begin")]),
                "host-{i} saw no login"
            );
        }
    }
}

const BREAK_GLASS_RULES: &str = r#"
version = 1
algorithm = "first-applicable"
default = "deny"

[[rule]]
id = "break-glass"
effect = "permit"
match = { service = ["breakglass"] }

[[rule]]
id = "no-ftp"
effect = "deny"
match = { service = ["ftp"] }

[[rule]]
id = "everyone-otp"
effect = "otp"
unenrolled = "deny"
"#;

/// Rules that need no stored fact hold while the database is away: the break-glass permit and
/// the deny are decided; a login that needs the store is told "unavailable" at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_that_need_no_stored_fact_hold_while_the_database_is_down() {
    use proto::v1::{BeginRequest, LoginContext};
    let cluster = pgtemp::Cluster::start();
    let keys = tempfile::tempdir().unwrap();
    let store = SharedStore::postgres(&cluster, keys.path());
    let d = Daemon::on_store(BREAK_GLASS_RULES, "host = \"lonely\"\n", Some(&store));
    cluster.stop();
    let begin = |service: &str| BeginRequest {
        context: Some(LoginContext {
            user: "daemon".into(),
            service: service.into(),
            ..LoginContext::default()
        }),
    };
    let mut client = d.client().await;
    let step = client
        .begin(begin("breakglass"))
        .await
        .unwrap()
        .into_inner();
    assert!(is_permit(&step), "{step:?}\n{}", d.log());
    let step = client.begin(begin("ftp")).await.unwrap().into_inner();
    assert!(is_deny(&step), "{step:?}");
    let started = Instant::now();
    let err = client.begin(begin("sshd")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(!err.message().contains("password"), "{err:?}");
}

/// A change on one host holds on every other at its next call: a disabled token, a used
/// backup code, an unlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_on_one_host_hold_on_the_others_at_once() {
    use proto::v1::{SetEnabledRequest, UnlockRequest};
    let fleet = Fleet::start(pgtemp::Cluster::shared(), 2);
    let (a, b) = (&fleet.hosts[0], &fleet.hosts[1]);
    let secret = a.enroll_active("daemon").await;
    // A backup code used on host-0 is gone on host-1.
    let codes = a.backup_codes("daemon").await;
    assert!(
        is_permit(&a.login("daemon", &codes[0]).await),
        "{}",
        fleet.logs()
    );
    assert!(is_deny(&b.login("daemon", &codes[0]).await));
    // Disabled on host-1: host-0 refuses the token's next code before any prompt.
    let listed = b
        .client()
        .await
        .list(proto::v1::ListRequest {
            user: "daemon".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let id = listed.tokens[0].id.clone();
    b.client()
        .await
        .set_enabled(SetEnabledRequest {
            user: "daemon".into(),
            token_id: id.clone(),
            enabled: false,
        })
        .await
        .unwrap();
    assert!(is_deny(&a.login("daemon", &secret.code_at(0)).await));
    // Locked out through host-0, unlocked on host-1: host-0 takes the next code.
    a.client()
        .await
        .set_enabled(SetEnabledRequest {
            user: "daemon".into(),
            token_id: id,
            enabled: true,
        })
        .await
        .unwrap();
    for _ in 0..5 {
        a.login("daemon", &secret.wrong_code()).await;
    }
    assert!(is_deny(&a.login("daemon", &secret.code_at(0)).await));
    let unlocked = b
        .client()
        .await
        .unlock(UnlockRequest {
            user: "daemon".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(unlocked.was_locked);
    assert!(
        is_permit(&a.login("daemon", &secret.code_at(0)).await),
        "{}",
        fleet.logs()
    );
}

/// A guardd that starts while the database is down serves the rules that need no stored
/// fact, and logins with codes once the database is back (after checking the key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guardd_started_while_the_database_is_down_serves_once_it_is_back() {
    use proto::v1::{BeginRequest, LoginContext};
    let cluster = pgtemp::Cluster::start();
    let keys = tempfile::tempdir().unwrap();
    let store = SharedStore::postgres(&cluster, keys.path());
    let mut d = Daemon::on_store(BREAK_GLASS_RULES, "host = \"late\"\n", Some(&store));
    let secret = d.enroll_active("daemon").await;
    cluster.stop();
    d.restart();
    let step = d
        .client()
        .await
        .begin(BeginRequest {
            context: Some(LoginContext {
                user: "daemon".into(),
                service: "breakglass".into(),
                ..LoginContext::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(is_permit(&step), "{step:?}");
    cluster.start_server();
    let code = secret.code_at(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match login_with(&mut d.client().await, "daemon", &code).await {
            Ok(step) => {
                assert!(is_permit(&step), "{step:?}\n{}", d.log());
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "{e:?}\n{}", d.log()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
