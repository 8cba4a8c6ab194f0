//! Layer 2, crash durability: a code guardd accepted must stay used across a `kill -9`, or it
//! could be replayed after the crash (docs/architecture.md#durability: an accepted code is
//! committed before the answer leaves guardd).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guardd::otp::{self, Kind, OtpParams};
use guardd::store::{NewToken, SqliteStore};
use harness::{Daemon, STRICT_RULES};

const USERS: usize = 200;
const CLIENTS: usize = 8;

/// Many clients log 200 HOTP users in with consecutive codes; guardd is killed with SIGKILL in
/// the middle and started again on the same database: no code it accepted before the kill is
/// accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_code_accepted_before_a_kill_9_is_accepted_after_the_restart() {
    // Replays are wrong codes: no back-off may refuse them unchecked and hide a reuse.
    let mut d = Daemon::with_config(STRICT_RULES, "max_tries = 1\nmax_failures = 1000000\n");
    assert!(d.stop());
    let secrets: Vec<Vec<u8>> = (0..USERS)
        .map(|_| otp::new_secret().unwrap().to_vec())
        .collect();
    let names: Vec<String> = (0..USERS).map(|i| format!("crash{i}")).collect();
    {
        let store = SqliteStore::open(
            &d.dir.path().join("lib/guardd.db"),
            &d.dir.path().join("etc/guardd.key"),
        )
        .unwrap();
        let tokens: Vec<NewToken> = names
            .iter()
            .zip(&secrets)
            .map(|(user, secret)| NewToken {
                user,
                // Bulk imports bind to no account (these names have none).
                uid: None,
                label: "crash",
                kind: Kind::Hotp,
                params: OtpParams::default(),
                secret,
            })
            .collect();
        store.add_active_many(&tokens, 0).unwrap();
    }
    d.restart();
    let code = |user: usize, counter: u64| {
        otp::code_for(&secrets[user], Kind::Hotp, OtpParams::default(), counter).unwrap()
    };

    let accepted = Arc::new(Mutex::new(Vec::<(usize, u64)>::new()));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut client = d.client().await;
        let (accepted, names) = (accepted.clone(), names.clone());
        let codes: Vec<Vec<String>> = (c..USERS)
            .step_by(CLIENTS)
            .map(|u| (1..=400).map(|n| code(u, n)).collect())
            .collect();
        tasks.push(tokio::spawn(async move {
            // This client's users c, c + CLIENTS, ...; their next counters.
            let mine: Vec<usize> = (c..USERS).step_by(CLIENTS).collect();
            let mut next = vec![1u64; mine.len()];
            let mut unexpected = 0;
            for k in 0.. {
                let slot = k % mine.len();
                let Some(code) = codes[slot].get(next[slot] as usize - 1) else {
                    break;
                };
                match harness::login_with(&mut client, &names[mine[slot]], code).await {
                    Ok(step) if harness::is_permit(&step) => {
                        accepted.lock().unwrap().push((mine[slot], next[slot]));
                        next[slot] += 1;
                    }
                    Ok(_) => unexpected += 1,
                    // guardd was killed.
                    Err(_) => break,
                }
            }
            unexpected
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_kill = accepted.lock().unwrap().len();
    nix::sys::signal::kill(d.pid(), nix::sys::signal::SIGKILL).unwrap();
    let mut unexpected = 0;
    for t in tasks {
        unexpected += t.await.unwrap();
    }
    // Reap the killed process, then start again on the same socket, database and key.
    assert!(!d.stop(), "guardd was killed, not stopped");
    let started = Instant::now();
    d.restart();
    let restart_ms = started.elapsed().as_millis();
    let accepted = accepted.lock().unwrap().clone();
    println!(
        "durability: accepted={} (at 1.5 s: {before_kill}) before kill -9 from {CLIENTS} clients over {USERS} users; restart {restart_ms} ms",
        accepted.len()
    );
    assert!(
        accepted.len() >= 20,
        "too few logins before the kill to mean anything"
    );
    assert_eq!(
        unexpected,
        0,
        "a right code was refused before the kill\n{}",
        d.log()
    );

    // Replay every accepted code, CLIENTS at a time; but not a code that is also the code of a
    // later counter of the same user: six digits collide, and guardd rightly takes such a code
    // as that later counter, which is no replay (about one run in a hundred, over ~1,500
    // replays). guardd looks at most `hotp_look_ahead` (10) counters past the last it accepted,
    // and each accepted replay moves that on: a margin of twice that past the highest counter.
    let mut highest = vec![0u64; USERS];
    for &(u, n) in &accepted {
        highest[u] = highest[u].max(n);
    }
    let ambiguous = |u: usize, n: u64| {
        let c = code(u, n);
        (n + 1..=highest[u] + 20).any(|k| code(u, k) == c)
    };
    let (skipped, accepted): (Vec<_>, Vec<_>) =
        accepted.into_iter().partition(|&(u, n)| ambiguous(u, n));
    println!(
        "durability: {} replays skipped, their code also a later counter's",
        skipped.len()
    );
    let reaccepted = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut client = d.client().await;
        let mine: Vec<(usize, u64, String)> = accepted
            .iter()
            .skip(c)
            .step_by(CLIENTS)
            .map(|&(u, n)| (u, n, code(u, n)))
            .collect();
        let (names, reaccepted) = (names.clone(), reaccepted.clone());
        tasks.push(tokio::spawn(async move {
            for (u, n, code) in mine {
                let step = harness::login_with(&mut client, &names[u], &code)
                    .await
                    .unwrap();
                if !harness::is_deny(&step) {
                    reaccepted
                        .lock()
                        .unwrap()
                        .push(format!("{} counter {n}: {step:?}", names[u]));
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let reaccepted = reaccepted.lock().unwrap();
    assert!(
        reaccepted.is_empty(),
        "{} of {} codes accepted before the kill were accepted again:\n{}",
        reaccepted.len(),
        accepted.len(),
        reaccepted.join("\n")
    );
}
