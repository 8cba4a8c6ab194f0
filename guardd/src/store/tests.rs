//! The store's behaviour, one set of cases run against both backends: SQLite files on disk and
//! a real PostgreSQL cluster started for the test run (see the `pgtemp` crate).

use std::sync::Arc;

use super::postgres::{prepare, Connector};
use super::*;
use crate::otp::OtpParams;

/// A store of each kind, with the scratch files it needs.
pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    pub url: Option<String>,
}

impl Fixture {
    pub(crate) fn sqlite() -> (Fixture, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), &dir.path().join("k")).unwrap();
        (Fixture { dir, url: None }, store)
    }

    /// A fresh database in the test run's cluster.
    pub(crate) fn postgres() -> (Fixture, PgStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = pgtemp::Cluster::shared().database();
        let connector = Arc::new(Connector::new(&settings(&url)).unwrap());
        let sealer = prepare(connector.clone(), &dir.path().join("k")).unwrap();
        let store = PgStore::new(connector, Arc::new(sealer)).unwrap();
        (
            Fixture {
                dir,
                url: Some(url),
            },
            store,
        )
    }

    /// A fixture for the PostgreSQL database at `url`, with scratch files of its own.
    pub(crate) fn at(url: String) -> Fixture {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            url: Some(url),
        }
    }

    /// A runner over a store like this one's (the same database, key and file).
    pub(crate) fn runner(&self, connections: usize) -> Runner {
        let key = self.dir.path().join("k");
        match &self.url {
            Some(url) => Runner::Postgres(PgPool::open(&settings(url), &key, connections).unwrap()),
            None => Runner::Sqlite(
                StoreThread::start(
                    SqliteStore::open(&self.dir.path().join("t.db"), &key).unwrap(),
                    2,
                )
                .unwrap(),
            ),
        }
    }
}

/// A runtime on the test's own thread, for driving a runner.
pub(crate) fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub(crate) fn settings(url: &str) -> PgSettings {
    PgSettings {
        url: url.into(),
        password_file: None,
        ca_file: None,
        host: "test".into(),
    }
}

fn new_token<'a>(user: &'a str, secret: &'a [u8]) -> NewToken<'a> {
    NewToken {
        user,
        uid: Some(1000),
        label: "phone",
        kind: Kind::Totp,
        params: OtpParams::default(),
        secret,
    }
}

/// Runs each case on a fresh SQLite store and on a fresh PostgreSQL database.
macro_rules! on_both {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $case() {
                let (_f, s) = super::Fixture::sqlite();
                super::$case(&s);
            })*
        }
        mod postgres {
            $(#[test]
            fn $case() {
                let (_f, s) = super::Fixture::postgres();
                super::$case(&s);
            })*
        }
    };
    (with fixture: $($case:ident),* $(,)?) => {
        mod sqlite_runner {
            $(#[test]
            fn $case() {
                let (f, s) = super::Fixture::sqlite();
                super::$case(&f, &s);
            })*
        }
        mod postgres_runner {
            $(#[test]
            fn $case() {
                let (f, s) = super::Fixture::postgres();
                super::$case(&f, &s);
            })*
        }
    };
}

on_both!(
    pending_token_becomes_active_once_and_counters_only_move_forward,
    state_changes_and_delete_are_scoped_to_the_user,
    failures_back_off_and_clear,
    a_name_is_bound_per_host_to_the_uid_seen_first,
    a_forgiven_failure_ends_the_wait_it_started,
    invitations_are_single_use_bound_to_the_uid_and_expire,
    backup_codes_are_replaced_and_used_once,
    a_code_revoked_while_a_login_compares_it_does_not_use_up_a_new_one,
    grants_are_kept_bounded_bound_to_a_session_once_and_forgotten,
    the_overview_counts_states_lockouts_and_low_backup_codes
);
on_both!(with fixture:
    concurrent_accepts_record_one_step_once,
    a_burst_of_guesses_spread_over_connections_gets_only_the_free_failures,
    calls_whose_callers_have_gone_do_not_hold_up_the_next_caller,
);

fn pending_token_becomes_active_once_and_counters_only_move_forward(s: &dyn Store) {
    let t = s.add_pending(new_token("ann", &[7; 20]), 1).unwrap();
    assert!(!s.has_active("ann").unwrap());
    assert!(s.accept(&t.id, TokenState::Pending, 100, 0, 2).unwrap());
    assert!(s.has_active("ann").unwrap());
    assert!(!s.accept(&t.id, TokenState::Pending, 101, 0, 2).unwrap());
    assert!(
        !s.accept(&t.id, TokenState::Active, 100, 0, 3).unwrap(),
        "replay"
    );
    assert!(
        !s.accept(&t.id, TokenState::Active, 99, 0, 3).unwrap(),
        "older"
    );
    assert!(s.accept(&t.id, TokenState::Active, 101, -1, 3).unwrap());
    let info = s.get("ann", &t.id).unwrap().unwrap();
    assert_eq!((info.state, info.last_used), (TokenState::Active, Some(3)));
    let secret = &s.secrets("ann", TokenState::Active).unwrap()[0];
    assert_eq!((secret.counter.last, secret.counter.drift), (Some(101), -1));
}

fn state_changes_and_delete_are_scoped_to_the_user(s: &dyn Store) {
    let t = s.add_pending(new_token("ann", &[9; 20]), 1).unwrap();
    assert!(s.accept(&t.id, TokenState::Pending, 1, 0, 1).unwrap());
    assert!(!s
        .set_state("bob", &t.id, TokenState::Active, TokenState::Disabled)
        .unwrap());
    assert!(s
        .set_state("ann", &t.id, TokenState::Active, TokenState::Disabled)
        .unwrap());
    assert!(!s.has_active("ann").unwrap());
    assert!(!s.delete("bob", &t.id).unwrap());
    assert!(s.delete("ann", &t.id).unwrap());
    assert!(s.list(None).unwrap().is_empty());
}

fn failures_back_off_and_clear(s: &dyn Store) {
    let b = Backoff::default();
    for i in 1..5 {
        assert_eq!(
            s.record_failure("ann", Some(1000), &b, 1000).unwrap().until,
            0,
            "{i}"
        );
    }
    assert_eq!(
        s.record_failure("ann", Some(1000), &b, 1000).unwrap().until,
        1030
    );
    assert_eq!(
        s.record_failure("ann", Some(1000), &b, 1000).unwrap().until,
        1060
    );
    assert_eq!(s.lockout("bob").unwrap(), Lockout::default());
    assert!(s.clear_failures("ann").unwrap());
    assert_eq!(s.lockout("ann").unwrap(), Lockout::default());
}

fn a_name_is_bound_per_host_to_the_uid_seen_first(s: &dyn Store) {
    // Without records a name is bound to nothing.
    assert_eq!(s.foreign_uid("ann", "a", Some(1000)).unwrap(), None);
    s.add_pending(new_token("ann", &[7; 20]), 1).unwrap();
    // Each host binds the uid it sees first: accounts may differ between hosts.
    assert_eq!(s.foreign_uid("ann", "a", Some(1000)).unwrap(), None);
    assert_eq!(s.foreign_uid("ann", "b", Some(2000)).unwrap(), None);
    assert_eq!(s.foreign_uid("ann", "a", Some(1000)).unwrap(), None);
    assert_eq!(s.foreign_uid("ann", "b", Some(2000)).unwrap(), None);
    // A new account of that name on host a is someone else; so is no account.
    assert_eq!(s.foreign_uid("ann", "a", Some(1001)).unwrap(), Some(1000));
    assert_eq!(s.foreign_uid("ann", "a", None).unwrap(), Some(1000));
    assert_eq!(s.foreign_uid("ann", "b", Some(1000)).unwrap(), Some(2000));
    // Failures are records too; once they are gone the name binds afresh.
    s.record_failure("bob", Some(5), &Backoff::default(), 1)
        .unwrap();
    assert_eq!(s.foreign_uid("bob", "a", Some(5)).unwrap(), None);
    assert_eq!(s.foreign_uid("bob", "a", Some(6)).unwrap(), Some(5));
    assert!(s.clear_failures("bob").unwrap());
    assert_eq!(s.foreign_uid("bob", "a", Some(6)).unwrap(), None);
    s.record_failure("bob", Some(6), &Backoff::default(), 1)
        .unwrap();
    assert_eq!(s.foreign_uid("bob", "a", Some(6)).unwrap(), None);
    assert_eq!(s.foreign_uid("bob", "a", Some(5)).unwrap(), Some(6));
}

fn a_forgiven_failure_ends_the_wait_it_started(s: &dyn Store) {
    let b = Backoff::default();
    for _ in 0..5 {
        s.record_failure("ann", None, &b, 1000).unwrap();
    }
    assert_eq!(s.lockout("ann").unwrap().until, 1030);
    s.forgive_failure("ann", &b).unwrap();
    assert_eq!(
        s.lockout("ann").unwrap(),
        Lockout {
            failures: 4,
            until: 0
        }
    );
    // Two failures past the free ones: forgiving one leaves the first wait.
    s.record_failure("ann", None, &b, 1000).unwrap();
    s.record_failure("ann", None, &b, 1000).unwrap();
    s.forgive_failure("ann", &b).unwrap();
    assert_eq!(s.lockout("ann").unwrap().failures, 5);
    assert_ne!(s.lockout("ann").unwrap().until, 0);
}

fn invitations_are_single_use_bound_to_the_uid_and_expire(s: &dyn Store) {
    s.add_invitation("ann", 1000, b"h1", 100).unwrap();
    assert!(
        !s.use_invitation("ann", 1001, b"h1", 50).unwrap(),
        "other uid"
    );
    assert!(
        !s.use_invitation("ann", 1000, b"h2", 50).unwrap(),
        "other code"
    );
    assert!(
        !s.use_invitation("ann", 1000, b"h1", 100).unwrap(),
        "expired"
    );
    assert!(s.use_invitation("ann", 1000, b"h1", 99).unwrap());
    assert!(!s.use_invitation("ann", 1000, b"h1", 99).unwrap(), "used");
}

fn backup_codes_are_replaced_and_used_once(s: &dyn Store) {
    s.replace_backup_codes("ann", None, &["h1".into(), "h2".into()], 1)
        .unwrap();
    s.replace_backup_codes("ann", None, &["h3".into()], 2)
        .unwrap();
    let codes = s.backup_codes("ann").unwrap();
    assert_eq!(codes.len(), 1);
    assert!(s.use_backup_code(codes[0].0, &codes[0].1).unwrap());
    assert!(!s.use_backup_code(codes[0].0, &codes[0].1).unwrap());
}

/// A login compares the typed code with the user's hashes off the store thread, then uses up
/// the one that matched, by its id. If the codes were reissued meanwhile (the sheet was lost),
/// the revoked code must not get in: on SQLite the new codes took the ids of the old ones, and
/// the old code used up a new one and logged in.
fn a_code_revoked_while_a_login_compares_it_does_not_use_up_a_new_one(s: &dyn Store) {
    s.replace_backup_codes("ann", None, &["old1".into(), "old2".into()], 1)
        .unwrap();
    let compared = s.backup_codes("ann").unwrap();
    s.replace_backup_codes("ann", None, &["new1".into(), "new2".into()], 2)
        .unwrap();
    for (id, hash) in &compared {
        assert!(
            !s.use_backup_code(*id, hash).unwrap(),
            "a revoked code used up a new one"
        );
    }
    assert_eq!(s.backup_codes("ann").unwrap().len(), 2);
}

/// Many callers at once (for PostgreSQL, eight connections, as eight hosts would be) with the
/// same code: each token accepts it once.
fn concurrent_accepts_record_one_step_once(fixture: &Fixture, s: &dyn Store) {
    let a = s.add_pending(new_token("ann", &[1; 20]), 1).unwrap();
    let b = s.add_pending(new_token("bob", &[2; 20]), 1).unwrap();
    assert!(s.accept(&a.id, TokenState::Pending, 10, 0, 1).unwrap());
    assert!(s.accept(&b.id, TokenState::Pending, 10, 0, 1).unwrap());
    let wins = with_runner(fixture, |runner| async move {
        let runner = Arc::new(runner);
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let id = if i % 2 == 0 {
                    a.id.clone()
                } else {
                    b.id.clone()
                };
                let runner = runner.clone();
                tokio::spawn(async move {
                    let won = runner
                        .run(move |s| s.accept(&id, TokenState::Active, 11, 0, 2))
                        .await
                        .unwrap();
                    (i % 2, won)
                })
            })
            .collect();
        let mut wins = [0, 0];
        for t in tasks {
            let (k, won) = t.await.unwrap();
            wins[k] += usize::from(won);
        }
        wins
    });
    assert_eq!(wins, [1, 1]);
}

/// Forty wrong guesses at once, spread over eight connections (hosts): each is counted before
/// the next is checked, so only the free failures are ever checked.
fn a_burst_of_guesses_spread_over_connections_gets_only_the_free_failures(
    fixture: &Fixture,
    s: &dyn Store,
) {
    let backoff = Backoff::default();
    let checked = with_runner(fixture, |runner| async move {
        let runner = Arc::new(runner);
        let tasks: Vec<_> = (0..40)
            .map(|_| {
                let runner = runner.clone();
                tokio::spawn(async move {
                    runner
                        .run(move |s| {
                            if s.lock_attempts("ann")?.remaining(1000).is_some() {
                                return Ok::<_, StoreError>(false);
                            }
                            // Where a code would be verified.
                            std::thread::sleep(std::time::Duration::from_millis(1));
                            s.record_failure("ann", None, &backoff, 1000)?;
                            Ok(true)
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut checked = 0;
        for t in tasks {
            checked += usize::from(t.await.unwrap());
        }
        checked
    });
    assert_eq!(checked as u32, backoff.free_failures);
    assert_eq!(s.lockout("ann").unwrap().failures, backoff.free_failures);
}

/// A local user opens logins and hangs up at once, again and again (gRPC drops the call's
/// future, and with it the store call's answer): such calls are not run for nobody, so a root
/// login queued behind them is served at once. Each stands for a call that costs the database
/// 10 ms (a few round trips to a remote PostgreSQL): a thousand of them, run for nobody, held
/// root's login for 1.3 s on eight connections (10 s on SQLite's one thread), and a few more
/// filled the queue, refusing it. The store is kept busy meanwhile by a call that waits, so that
/// they queue (on an idle SQLite store a call runs at once, while its caller waits).
fn calls_whose_callers_have_gone_do_not_hold_up_the_next_caller(fixture: &Fixture, _: &dyn Store) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    let ran = Arc::new(AtomicUsize::new(0));
    let (waited, result) = with_runner(fixture, |runner| {
        let ran = ran.clone();
        async move {
            let runner = Arc::new(runner);
            let (release, held) = std::sync::mpsc::channel::<()>();
            let (started, has_started) = std::sync::mpsc::channel::<()>();
            let holder = tokio::spawn({
                let runner = runner.clone();
                async move {
                    runner
                        .run(move |_| {
                            let _ = started.send(());
                            let _ = held.recv_timeout(Duration::from_secs(10));
                            Ok::<_, StoreError>(())
                        })
                        .await
                }
            });
            has_started.recv().unwrap();
            for _ in 0..1000 {
                let ran = ran.clone();
                let call = runner.run(move |s| {
                    ran.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(10));
                    s.has_active("mallory")
                });
                // Queued, then given up, as when the client hangs up.
                let mut call = Box::pin(call);
                let _ = futures_poll_once(call.as_mut()).await;
            }
            release.send(()).unwrap();
            holder.await.unwrap().unwrap();
            let started = Instant::now();
            let result = runner.run(|s| s.has_active("root")).await;
            (started.elapsed(), result)
        }
    });
    assert!(matches!(result, Ok(false)), "{result:?}");
    assert!(
        waited < Duration::from_millis(500),
        "root waited {waited:?}"
    );
    // Only calls already running when their callers went (one per connection) ran.
    assert!(
        ran.load(Ordering::SeqCst) <= 8,
        "{}",
        ran.load(Ordering::SeqCst)
    );
}

/// Polls `f` once, so that a store call is queued without waiting for its answer.
async fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) {
    let mut f = Some(f);
    std::future::poll_fn(|cx| {
        if let Some(f) = f.take() {
            let _ = f.poll(cx);
        }
        std::task::Poll::Ready(())
    })
    .await
}

/// Runs `f` with a runner over the fixture's store, on a runtime of its own.
fn with_runner<T, F, Fut>(fixture: &Fixture, f: F) -> T
where
    F: FnOnce(Runner) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let runner = fixture.runner(8);
    runtime.block_on(f(runner))
}

/// While the database is down, calls fail at once as unavailable; once it is back, the same
/// pool serves again without a restart.
#[test]
fn a_pool_fails_fast_while_the_database_is_down_and_reconnects_by_itself() {
    use std::time::{Duration, Instant};
    let cluster = pgtemp::Cluster::start();
    let fixture = Fixture::at(cluster.database());
    let runtime = current_thread();
    let runner = fixture.runner(2);
    let call = || runner.run(|s| s.has_active("ann"));
    assert!(!runtime.block_on(call()).unwrap());
    cluster.stop();
    std::thread::scope(|scope| {
        // The server comes back while calls keep arriving (they must not keep the pool from
        // trying again).
        let restart = scope.spawn(|| {
            std::thread::sleep(Duration::from_secs(1));
            // The server may accept before pg_ctl sees it ready: the start is when it began.
            let began = Instant::now();
            cluster.start_server();
            began
        });
        runtime.block_on(async {
            let mut served = None;
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                let started = Instant::now();
                match call().await {
                    Ok(false) => {
                        served = Some(Instant::now());
                        break;
                    }
                    Err(StoreError::Unavailable(_)) => {
                        assert!(
                            started.elapsed() < pool::CALL_TIMEOUT,
                            "{:?}",
                            started.elapsed()
                        );
                    }
                    other => panic!("{other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let back = restart.join().unwrap();
            let served = served.expect("served again once the database was back");
            assert!(served > back, "served while the database was down");
        });
    });
}

/// What only the PostgreSQL store has: settings, TLS, concurrent start-ups, its own schema.
mod postgres_only {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    }

    /// A CA, and a server certificate it signed for the name `localhost` only.
    fn certificates(dir: &Path) {
        for ca in ["ca", "other-ca"] {
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "1",
                    "-subj",
                    &format!("/CN={ca}"),
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.crt"),
                ],
            );
        }
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
        );
        std::fs::write(dir.join("ext"), "subjectAltName=DNS:localhost\n").unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "ext",
                "-out",
                "server.crt",
            ],
        );
    }

    fn private_file(path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Over the network, the server's certificate must be signed by the configured CA and name
    /// the host of the URL (libpq's verify-full); the password comes from a private file.
    #[test]
    fn tls_verifies_the_certificate_and_the_host_name_and_the_password_comes_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        certificates(dir.path());
        let (cluster, port) = pgtemp::Cluster::start_tls(
            &dir.path().join("server.crt"),
            &dir.path().join("server.key"),
            "s3cret-for-test",
        );
        let db = cluster.database();
        let name = db
            .split('/')
            .nth(3)
            .unwrap()
            .split('?')
            .next()
            .unwrap()
            .to_owned();
        private_file(&dir.path().join("pw"), "s3cret-for-test\n");
        private_file(&dir.path().join("bad-pw"), "wrong\n");
        let key = dir.path().join("k");
        let connect = |host: &str, ca: &str, pw: &str| {
            let settings = PgSettings {
                url: format!("postgresql://guardd@{host}:{port}/{name}"),
                password_file: Some(dir.path().join(pw)),
                ca_file: Some(dir.path().join(ca)),
                host: "test".into(),
            };
            prepare(Arc::new(Connector::new(&settings)?), &key).map(drop)
        };
        connect("localhost", "ca.crt", "pw").unwrap();
        let err = connect("localhost", "other-ca.crt", "pw").unwrap_err();
        assert!(
            matches!(err, StoreError::Unavailable(_)),
            "another CA: {err}"
        );
        let err = connect("127.0.0.1", "ca.crt", "pw").unwrap_err();
        assert!(
            matches!(err, StoreError::Unavailable(_)),
            "a name the certificate does not hold: {err}"
        );
        let err = connect("localhost", "ca.crt", "bad-pw").unwrap_err();
        assert!(err.to_string().contains("password"), "{err}");
        assert!(
            !err.to_string().contains("wrong"),
            "the password leaked: {err}"
        );
    }

    #[test]
    fn unsafe_settings_are_refused_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let refused = |settings: PgSettings| match Connector::new(&settings) {
            Err(StoreError::Settings(m)) => m,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted {settings:?}"),
        };
        let m = refused(settings("postgresql://guardd:pw@/db?host=/run/x"));
        assert!(
            m.contains("database_password_file") && !m.contains("pw@"),
            "{m}"
        );
        let m = refused(settings("postgresql://guardd@db.example.com/guardd"));
        assert!(m.contains("database_ca_file"), "{m}");
        let open = dir.path().join("pw");
        std::fs::write(&open, "x").unwrap();
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let m = refused(PgSettings {
            password_file: Some(open),
            ..settings("postgresql://guardd@/db?host=/run/x")
        });
        assert!(m.contains("chmod 600"), "{m}");
        let m = refused(PgSettings {
            ca_file: Some(dir.path().join("absent.crt")),
            ..settings("postgresql://guardd@db.example.com/guardd?sslmode=disable")
        });
        assert!(m.contains("sslmode=disable"), "{m}");
        // `hostaddr` is where the connection goes, whatever `host` names (loopback or a Unix
        // socket directory): a remote address there needs TLS as much as a remote host name.
        for url in [
            "postgresql://guardd@localhost/guardd?hostaddr=192.0.2.10",
            "postgresql://guardd@/guardd?host=/run/postgresql&hostaddr=192.0.2.10",
            "postgresql://guardd@127.0.0.1,localhost/guardd?hostaddr=127.0.0.1,192.0.2.10",
        ] {
            let m = refused(settings(url));
            assert!(
                m.contains("database_ca_file") && m.contains("192.0.2.10"),
                "{url}: {m}"
            );
        }
        // With the CA, a remote address needs a host name to verify: a socket directory is none.
        let m = refused(PgSettings {
            ca_file: Some(dir.path().join("absent.crt")),
            ..settings("postgresql://guardd@/guardd?host=/run/postgresql&hostaddr=192.0.2.10")
        });
        assert!(m.contains("hostaddr"), "{m}");
        Connector::new(&settings(
            "postgresql://guardd@localhost/guardd?hostaddr=127.0.0.1",
        ))
        .unwrap();
        // Several hosts, the writable one chosen, and loopback without TLS, are fine.
        Connector::new(&settings(
            "postgresql://guardd@127.0.0.1:5432,localhost:5433/guardd?target_session_attrs=read-write",
        ))
        .unwrap();
    }

    /// Eight guardds start at once on an empty database: one migrates, all agree.
    #[test]
    fn eight_guardds_starting_at_once_migrate_once() {
        let dir = tempfile::tempdir().unwrap();
        let url = pgtemp::Cluster::shared().database();
        let key = dir.path().join("k");
        crate::seal::Sealer::load(&key, true).unwrap();
        std::thread::scope(|scope| {
            let starts: Vec<_> = (0..8)
                .map(|_| {
                    scope
                        .spawn(|| prepare(Arc::new(Connector::new(&settings(&url)).unwrap()), &key))
                })
                .collect();
            for s in starts {
                s.join().unwrap().unwrap();
            }
        });
        let name = url.split('/').nth(3).unwrap().split('?').next().unwrap();
        let versions = pgtemp::Cluster::shared().psql(name, "SELECT version FROM schema_version");
        assert_eq!(versions, SCHEMA_VERSION.to_string());
    }

    #[test]
    fn a_newer_schema_another_key_or_a_missing_key_are_refused() {
        let (fixture, store) = Fixture::postgres();
        store.add_pending(new_token("ann", &[1; 20]), 1).unwrap();
        drop(store);
        let url = fixture.url.clone().unwrap();
        let connector = || Arc::new(Connector::new(&settings(&url)).unwrap());
        // A host with a key of its own.
        let other = fixture.dir.path().join("other-key");
        crate::seal::Sealer::load(&other, true).unwrap();
        let err = prepare(connector(), &other).map(drop).unwrap_err();
        assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
        assert!(err.to_string().contains("wrong key file"), "{err}");
        // A host without the key file: refused, and no new key is made.
        let absent = fixture.dir.path().join("absent");
        let err = prepare(connector(), &absent).map(drop).unwrap_err();
        assert!(matches!(err, StoreError::KeyMissing { .. }), "{err}");
        assert!(!absent.exists());
        // A schema from a newer guardd.
        let name = url.split('/').nth(3).unwrap().split('?').next().unwrap();
        pgtemp::Cluster::shared().psql(name, "UPDATE schema_version SET version = 99");
        let err = prepare(connector(), &fixture.dir.path().join("k"))
            .map(drop)
            .unwrap_err();
        assert!(err.to_string().contains("upgrade guardd"), "{err}");
    }

    /// Rows another host or the database's administrator changed (a NULL where guardd never
    /// writes one, a column of another type, a negative schema version) make the call fail with
    /// an error, never panic: the key check runs on a pool worker outside the panic guard (a
    /// panic there ended the worker thread for good), and a panic costs a lot besides.
    #[test]
    fn odd_rows_fail_the_call_without_a_panic() {
        let (fixture, store) = Fixture::postgres();
        store.add_pending(new_token("ann", &[1; 20]), 1).unwrap();
        store
            .record_failure("ann", None, &Backoff::default(), 1)
            .unwrap();
        store
            .replace_backup_codes("ann", None, &["$argon2id$x".into()], 1)
            .unwrap();
        let url = fixture.url.clone().unwrap();
        let name = url.split('/').nth(3).unwrap().split('?').next().unwrap();
        let psql = |sql: &str| pgtemp::Cluster::shared().psql(name, sql);
        psql(
            "ALTER TABLE tokens ALTER COLUMN label DROP NOT NULL, ALTER COLUMN drift DROP NOT NULL; \
             UPDATE tokens SET label = NULL, drift = NULL; \
             ALTER TABLE lockouts ALTER COLUMN until TYPE text; \
             ALTER TABLE backup_codes ALTER COLUMN hash TYPE bytea USING hash::bytea; \
             ALTER TABLE meta ALTER COLUMN value TYPE text USING encode(value, 'hex')",
        );
        type Call<'a> = &'a dyn Fn() -> Result<(), StoreError>;
        let quiet = |f: Call<'_>| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let calls: [(&str, Call<'_>); 6] = [
            ("list", &|| store.list(Some("ann")).map(drop)),
            ("secrets", &|| {
                store.secrets("ann", TokenState::Pending).map(drop)
            }),
            ("lockout", &|| store.lockout("ann").map(drop)),
            ("lock_attempts", &|| store.lock_attempts("ann").map(drop)),
            ("backup_codes", &|| store.backup_codes("ann").map(drop)),
            ("check", &|| store.check()),
        ];
        for (what, call) in calls {
            store.begin().unwrap();
            let result = quiet(call);
            store.end(false).unwrap();
            assert!(matches!(result, Ok(Err(_))), "{what}: {result:?}");
        }
        psql("ALTER TABLE meta ALTER COLUMN value TYPE bytea USING decode(value, 'hex'); UPDATE schema_version SET version = -1");
        let result = quiet(&|| store.check());
        assert!(
            matches!(&result, Ok(Err(StoreError::Unversioned { .. }))),
            "{result:?}"
        );
    }

    /// A database administrator or a dump reads no secret.
    #[test]
    fn secrets_are_sealed_in_the_database() {
        let (fixture, store) = Fixture::postgres();
        let secret = b"0123456789abcdefghij";
        store.add_pending(new_token("ann", secret), 1).unwrap();
        assert_eq!(
            &**store.secrets("ann", TokenState::Pending).unwrap()[0].secret,
            secret
        );
        let url = fixture.url.unwrap();
        let name = url.split('/').nth(3).unwrap().split('?').next().unwrap();
        let stored =
            pgtemp::Cluster::shared().psql(name, "SELECT encode(secret, 'hex') FROM tokens");
        let plain: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!stored.is_empty() && !stored.contains(&plain), "{stored}");
    }
}

/// A database that stops answering (frozen, not gone): each call gives up within the call
/// timeout, and once the database answers again the pool serves without a restart.
#[test]
fn a_frozen_database_bounds_every_call_and_the_pool_recovers() {
    use std::time::{Duration, Instant};
    let cluster = pgtemp::Cluster::start();
    let fixture = Fixture::at(cluster.database());
    let runtime = current_thread();
    let runner = fixture.runner(2);
    let call = || runner.run(|s| s.has_active("ann"));
    assert!(!runtime.block_on(call()).unwrap());
    cluster.pause();
    for _ in 0..2 {
        let started = Instant::now();
        let result = runtime.block_on(call());
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
        assert!(
            started.elapsed() < pool::CALL_TIMEOUT + Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }
    cluster.resume();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match runtime.block_on(call()) {
            Ok(false) => break,
            other => assert!(Instant::now() < deadline, "{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Unix-socket proxy in front of a cluster that, once armed, cuts the connection right after
/// passing on the server's answer holding `trigger`: what a fail-over, a restart or a network
/// cut between two statements of one call looks like to guardd.
struct Cutter {
    dir: tempfile::TempDir,
    armed: Arc<std::sync::atomic::AtomicBool>,
    cut: Arc<std::sync::atomic::AtomicBool>,
    /// Set: the next server answer, and all after it on that connection, are held back (a
    /// database or network that stops answering), while the connection stays open.
    stall: Arc<std::sync::atomic::AtomicBool>,
}

impl Cutter {
    fn start(cluster: &pgtemp::Cluster, trigger: &'static [u8]) -> Cutter {
        use std::io::{Read, Write};
        use std::os::unix::net::{UnixListener, UnixStream};
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let name = ".s.PGSQL.5432";
        let listener = UnixListener::bind(dir.path().join(name)).unwrap();
        let upstream = cluster.socket_dir().join(name);
        let (armed, cut, stall) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (a, c, st) = (armed.clone(), cut.clone(), stall.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let server = UnixStream::connect(&upstream).unwrap();
                let (mut to_server, mut from_client) =
                    (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_client, &mut to_server);
                    // The client closed: so does the server's side.
                    let _ = to_server.shutdown(std::net::Shutdown::Write);
                });
                let (a, c, st) = (a.clone(), c.clone(), st.clone());
                std::thread::spawn(move || {
                    let (mut server, mut client) = (server, client);
                    let mut buf = [0; 65536];
                    let mut stalled = false;
                    loop {
                        let n = match server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if stalled || st.swap(false, Ordering::SeqCst) {
                            stalled = true;
                            continue;
                        }
                        let hit = buf[..n].windows(trigger.len()).any(|w| w == trigger)
                            && a.swap(false, Ordering::SeqCst);
                        if hit {
                            // Cut the server's side before the client reads the answer, so
                            // nothing the client sends after it (a COMMIT) can still reach
                            // the server: the outcome is then known to be a rollback.
                            let _ = server.shutdown(std::net::Shutdown::Both);
                            c.store(true, Ordering::SeqCst);
                        }
                        if client.write_all(&buf[..n]).is_err() || hit {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    let _ = server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Cutter {
            dir,
            armed,
            cut,
            stall,
        }
    }

    /// `url` (of a database in the cluster) through this proxy.
    fn url(&self, cluster: &pgtemp::Cluster, url: &str) -> String {
        let (from, to) = (cluster.socket_dir(), self.dir.path().to_owned());
        url.replace(&*from.to_string_lossy(), &to.to_string_lossy())
    }

    fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn has_cut(&self) -> bool {
        self.cut.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The connection is lost after a call's write was answered and before its COMMIT: the server
/// undid the write, so the caller must not hear that it stands. Reconnecting silently and
/// sending the COMMIT on a new connection (where it commits nothing) acknowledged a used code
/// that the store then accepted again.
#[test]
fn a_connection_lost_inside_a_call_is_never_reported_as_committed() {
    use std::time::{Duration, Instant};
    let cluster = pgtemp::Cluster::shared();
    let cutter = Cutter::start(cluster, b"UPDATE 1\0");
    let fixture = Fixture::at(cutter.url(cluster, &cluster.database()));
    let runtime = current_thread();
    let runner = fixture.runner(1);
    // Past the pause after a lost connection.
    let run = |f: fn(&dyn Store, &str) -> Result<bool, StoreError>, id: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let id = id.to_owned();
            match runtime.block_on(runner.run(move |s| f(s, &id))) {
                Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                other => return other,
            }
        }
    };
    let id = runtime
        .block_on(
            runner.run(|s| Ok::<_, StoreError>(s.add_pending(new_token("ann", &[1; 20]), 1)?.id)),
        )
        .unwrap();
    assert!(run(|s, id| s.accept(id, TokenState::Pending, 5, 0, 1), &id).unwrap());
    let step = |s: &dyn Store, id: &str| s.accept(id, TokenState::Active, 10, 0, 2);
    for _ in 0..5 {
        // Past the pause that follows a lost connection, so this call reaches the database.
        assert!(run(|s, _| s.has_active("ann"), "").unwrap());
        cutter.arm();
        let first = {
            let id = id.clone();
            runtime.block_on(runner.run(move |s| step(s, &id)))
        };
        assert!(cutter.has_cut(), "the proxy did not cut: {first:?}");
        cutter.cut.store(false, std::sync::atomic::Ordering::SeqCst);
        match first {
            // Acknowledged: the step is used, here and on every other guardd.
            Ok(true) => {
                assert!(
                    !run(step, &id).unwrap(),
                    "a step acknowledged as used was accepted again"
                );
                return;
            }
            Err(StoreError::Unavailable(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    // Never acknowledged, and indeed never recorded.
    assert!(
        run(step, &id).unwrap(),
        "the step was recorded though every call failed"
    );
}

/// The connection is lost between two statements of one call: the rest of the call does not
/// run on a new connection, outside any transaction (where it would be committed alone, and a
/// per-user attempt lock taken there would be released at once).
#[test]
fn the_rest_of_a_call_cut_off_from_its_transaction_does_not_run() {
    let cluster = pgtemp::Cluster::shared();
    let cutter = Cutter::start(cluster, b"UPDATE 1\0");
    let fixture = Fixture::at(cutter.url(cluster, &cluster.database()));
    let runtime = current_thread();
    let runner = fixture.runner(1);
    let id = runtime
        .block_on(runner.run(|s| {
            let id = s.add_pending(new_token("ann", &[1; 20]), 1)?.id;
            s.accept(&id, TokenState::Pending, 5, 0, 1)?;
            Ok::<_, StoreError>(id)
        }))
        .unwrap();
    cutter.arm();
    let result = runtime.block_on(runner.run(move |s| {
        s.accept(&id, TokenState::Active, 10, 0, 2)?;
        s.record_failure("bob", None, &Backoff::default(), 2)?;
        s.add_invitation("cy", 1, &[1; 32], 99)
    }));
    assert!(cutter.has_cut());
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    let name = fixture.url.as_deref().unwrap().split('/').nth(3).unwrap();
    let name = name.split('?').next().unwrap();
    let rows = cluster.psql(
        name,
        "SELECT (SELECT count(*) FROM lockouts) + (SELECT count(*) FROM invitations)",
    );
    assert_eq!(
        rows, "0",
        "statements of the call ran outside its transaction"
    );
}

/// A call's connection stops answering while its transaction holds the user's attempt lock:
/// the call gives up (unavailable), and the connection is closed at once, so the server ends
/// the transaction and every other guardd can check that user again. Left open (until the
/// worker's next call, or the server's 10 s idle-in-transaction timeout) it held the lock, and
/// every host's checks of the user waited 2 s and failed as busy.
#[test]
fn a_call_that_gives_up_releases_its_locks_at_once() {
    use std::time::{Duration, Instant};
    let cluster = pgtemp::Cluster::shared();
    let cutter = Cutter::start(cluster, b"never");
    let url = cluster.database();
    let fixture = Fixture::at(cutter.url(cluster, &url));
    let runtime = current_thread();
    let runner = fixture.runner(1);
    let stall = cutter.stall.clone();
    let result = runtime.block_on(runner.run(move |s| {
        s.lock_attempts("ann")?;
        stall.store(true, std::sync::atomic::Ordering::SeqCst);
        s.has_active("ann")
    }));
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    // Another guardd, straight to the database.
    let other = PgStore::new(
        Arc::new(Connector::new(&settings(&url)).unwrap()),
        Arc::new(crate::seal::Sealer::load(&fixture.dir.path().join("k"), false).unwrap()),
    )
    .unwrap();
    other.begin().unwrap();
    let started = Instant::now();
    let locked = other.lock_attempts("ann");
    let waited = started.elapsed();
    other.end(false).unwrap();
    assert!(locked.is_ok(), "{locked:?} after {waited:?}");
    assert!(waited < Duration::from_secs(1), "waited {waited:?}");
    drop(runner);
}

/// Another guardd holds a user's attempt lock for longer than a statement may wait: this
/// guardd's check of that user is refused by the server as busy (its lock_timeout), and the
/// pool goes on serving everyone else. The server's and the client's limits were both 2 s, so
/// the client usually gave up first: the connection was dropped as unreachable and the whole
/// pool refused every call (every user's logins, root's too) for half a second.
#[test]
fn a_lock_held_elsewhere_makes_that_call_busy_not_the_pool_unavailable() {
    let (fixture, holder) = Fixture::postgres();
    holder.begin().unwrap();
    holder.lock_attempts("ann").unwrap();
    let runtime = current_thread();
    let runner = fixture.runner(1);
    // Which limit fired first was a race: three tries.
    for _ in 0..3 {
        let waited = runtime.block_on(runner.run(|s| s.lock_attempts("ann").map(drop)));
        assert!(matches!(waited, Err(StoreError::Busy)), "{waited:?}");
        let other = runtime.block_on(runner.run(|s| s.has_active("root")));
        assert!(matches!(other, Ok(false)), "{other:?}");
    }
    holder.end(false).unwrap();
}

fn grant(id: &str, user: &str, created: i64, expires: i64) -> crate::grant::Grant {
    crate::grant::Grant {
        id: id.into(),
        user: user.into(),
        rule: "ssh".into(),
        digest: "d".into(),
        proof: format!("proof-{id}"),
        created,
        expires,
        attributes: crate::grant::Attributes {
            host: Some("h1".into()),
            service: Some("sshd".into()),
            rhost: Some("192.0.2.7".into()),
            tty: None,
            ssh_key: Some("SHA256:k".into()),
            session: None,
        },
        ssh_connection: Some("192.0.2.7 5555 192.0.2.1 22".into()),
    }
}

fn grants_are_kept_bounded_bound_to_a_session_once_and_forgotten(s: &dyn Store) {
    use crate::grant::MAX_PER_USER;
    s.add_grants(
        &[grant("a1", "ann", 100, 700), grant("b1", "bob", 100, 200)],
        100,
    )
    .unwrap();
    let got = s.grants("ann", 150).unwrap();
    assert_eq!(got, [grant("a1", "ann", 100, 700)], "read back as written");
    assert!(s.grants("ann", 700).unwrap().is_empty(), "expired at 700");
    // A later write drops what expired (bob's), and keeps only each user's newest.
    let many: Vec<_> = (0..MAX_PER_USER + 3)
        .map(|i| grant(&format!("n{i:02}"), "ann", 300 + i as i64, 900))
        .collect();
    s.add_grants(&many, 300).unwrap();
    assert!(s.grants("bob", 0).unwrap().is_empty());
    let kept = s.grants("ann", 300).unwrap();
    assert_eq!(kept.len(), MAX_PER_USER);
    assert!(
        kept.iter().all(|g| g.id.as_str() >= "n03"),
        "the oldest went"
    );

    // Binding: only this user's grants over this connection with the same keys, made since
    // `since`, and only once.
    s.forget("ann").unwrap();
    s.add_grants(&[grant("c1", "ann", 1000, 2000)], 1000)
        .unwrap();
    let conn = "192.0.2.7 5555 192.0.2.1 22";
    assert_eq!(
        s.bind_session("bob", conn, Some("SHA256:k"), 900, "b/h1/7")
            .unwrap(),
        0
    );
    assert_eq!(
        s.bind_session(
            "ann",
            "192.0.2.7 6666 192.0.2.1 22",
            Some("SHA256:k"),
            900,
            "b/h1/7"
        )
        .unwrap(),
        0
    );
    assert_eq!(
        s.bind_session("ann", conn, Some("SHA256:other"), 900, "b/h1/7")
            .unwrap(),
        0
    );
    assert_eq!(s.bind_session("ann", conn, None, 900, "b/h1/7").unwrap(), 0);
    assert_eq!(
        s.bind_session("ann", conn, Some("SHA256:k"), 1001, "b/h1/7")
            .unwrap(),
        0,
        "too old"
    );
    assert_eq!(
        s.bind_session("ann", conn, Some("SHA256:k"), 900, "b/h1/7")
            .unwrap(),
        1
    );
    assert_eq!(
        s.bind_session("ann", conn, Some("SHA256:k"), 900, "b/h1/8")
            .unwrap(),
        0,
        "once"
    );
    let bound = s.grants("ann", 1500).unwrap();
    assert_eq!(bound[0].attributes.session.as_deref(), Some("b/h1/7"));

    assert_eq!(s.forget("ann").unwrap(), 1);
    assert!(s.grants("ann", 1500).unwrap().is_empty());
    assert_eq!(s.forget("ann").unwrap(), 0);
}

fn the_overview_counts_states_lockouts_and_low_backup_codes(s: &dyn Store) {
    let empty = s.overview(1000, 3).unwrap();
    assert_eq!(
        empty,
        Overview {
            schema_version: SCHEMA_VERSION,
            ..Overview::default()
        }
    );
    let pending = s.add_pending(new_token("ann", &[1; 20]), 1).unwrap();
    let active = s.add_pending(new_token("ann", &[2; 20]), 1).unwrap();
    assert!(s.accept(&active.id, TokenState::Pending, 1, 0, 2).unwrap());
    let off = s.add_pending(new_token("bob", &[3; 20]), 1).unwrap();
    assert!(s.accept(&off.id, TokenState::Pending, 1, 0, 2).unwrap());
    assert!(s
        .set_state("bob", &off.id, TokenState::Active, TokenState::Disabled)
        .unwrap());
    let b = Backoff::default();
    for _ in 0..6 {
        s.record_failure("cy", None, &b, 1000).unwrap();
    }
    s.record_failure("dee", None, &b, 1000).unwrap();
    s.replace_backup_codes("ann", None, &["a".into(), "b".into()], 1)
        .unwrap();
    s.replace_backup_codes("bob", None, &["c".into(), "d".into(), "e".into()], 1)
        .unwrap();
    let o = s.overview(1000, 3).unwrap();
    assert_eq!(
        (
            o.users,
            o.tokens_pending,
            o.tokens_active,
            o.tokens_disabled
        ),
        (2, 1, 1, 1)
    );
    // cy waits (6 failures: 60 s); dee has one failure and no wait.
    assert_eq!(
        (o.locked, o.locked_total),
        (
            vec![(
                "cy".to_owned(),
                Lockout {
                    failures: 6,
                    until: 1060
                }
            )],
            1
        )
    );
    assert_eq!(
        (o.backup_codes_low, o.backup_codes_low_total),
        (vec![("ann".to_owned(), 2)], 1)
    );
    // Once the wait is over, nobody is locked.
    assert_eq!(s.overview(1060, 3).unwrap().locked_total, 0);
    assert!(s.delete("ann", &pending.id).unwrap());
    assert_eq!(s.overview(1000, 3).unwrap().tokens_pending, 0);
    // The health probe writes, again and again, and changes no count.
    s.probe("host-a", 1).unwrap();
    s.probe("host-a", 2).unwrap();
    s.probe("host-b", 2).unwrap();
    assert_eq!(s.overview(1000, 3).unwrap().users, 2);
}
