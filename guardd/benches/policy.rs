//! Evaluation time of a 100-rule policy for a request that only the last rule matches (every
//! rule is evaluated anyway), against a 1-rule policy as the baseline in the same run. NSS and
//! database look-ups are excluded: the facts come from memory.
//!
//!     cargo bench -p guardd --bench policy

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use guardd::policy::{Facts, LookupError, Policy, Request};

struct Memory;

impl Facts for Memory {
    fn groups(&self) -> Result<Vec<String>, LookupError> {
        Ok(vec!["alice".into(), "dev".into()])
    }
    fn enrolled(&self) -> Result<bool, LookupError> {
        Ok(true)
    }
}

const LAST: &str = "match = { user = [\"alice\"], service = [\"sshd\"], host = [\"web-*\"], rhost = [\"192.0.2.0/24\"] }";

fn hundred_rules() -> String {
    let mut text = String::from(
        "version = 1\nalgorithm = \"first-applicable\"\ndefault = \"deny\"\ntimezone = \"Europe/Madrid\"\n\n[sets]\nnets = [\"10.0.0.0/8\", \"2001:db8::/32\"]\n",
    );
    for i in 0..99 {
        let target = match i % 5 {
            0 => format!("user = [\"user{i}\", \"ops-*\"], service = [\"sshd\"]"),
            1 => format!("group = [\"team{i}\"], service = [\"sudo\"]"),
            2 => format!("host = [\"db-{i}-*.example.com\"], rhost = [\"@nets\"]"),
            3 => format!("service = [\"svc{i}\"], time = [\"mon-fri 08:00-19:00\"]"),
            _ => format!("tty = [\"tty{i}\"], enrolled = false"),
        };
        text.push_str(&format!(
            "\n[[rule]]\nid = \"rule-{i}\"\neffect = \"otp\"\nmatch = {{ {target} }}\n"
        ));
    }
    text.push_str(&format!(
        "\n[[rule]]\nid = \"last\"\neffect = \"otp\"\n{LAST}\n"
    ));
    text
}

fn request() -> Request {
    Request {
        user: "alice".into(),
        service: "sshd".into(),
        host: "web-1.example.com".into(),
        rhost: Some("192.0.2.7".into()),
        tty: Some("ssh".into()),
        command: None,
        ssh_keys: Vec::new(),
        time: 1_795_608_000,
    }
}

fn bench(c: &mut Criterion) {
    let big = Policy::parse("bench.toml", &hundred_rules()).unwrap();
    let one = Policy::parse(
        "one.toml",
        &format!("version = 1\n[[rule]]\nid = \"last\"\neffect = \"otp\"\n{LAST}\n"),
    )
    .unwrap();
    let req = request();
    assert_eq!(big.evaluate(&req, &Memory, false).rules, ["last"]);
    assert_eq!(one.evaluate(&req, &Memory, false).rules, ["last"]);
    let mut group = c.benchmark_group("policy");
    group.bench_function("1 rule (baseline)", |b| {
        b.iter(|| one.evaluate(black_box(&req), &Memory, false))
    });
    group.bench_function("100 rules, last decides", |b| {
        b.iter(|| big.evaluate(black_box(&req), &Memory, false))
    });
    group.bench_function("100 rules, explained", |b| {
        b.iter(|| big.evaluate(black_box(&req), &Memory, true))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
