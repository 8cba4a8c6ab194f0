use std::cell::Cell;

use super::*;

/// Facts from a table; counts look-ups to prove they are lazy.
struct FakeFacts {
    groups: Result<Vec<String>, LookupError>,
    enrolled: Result<bool, LookupError>,
    group_lookups: Cell<u32>,
}

impl FakeFacts {
    fn new(groups: &[&str], enrolled: bool) -> FakeFacts {
        FakeFacts {
            groups: Ok(groups.iter().map(|g| g.to_string()).collect()),
            enrolled: Ok(enrolled),
            group_lookups: Cell::new(0),
        }
    }
}

impl Facts for FakeFacts {
    fn groups(&self) -> Result<Vec<String>, LookupError> {
        self.group_lookups.set(self.group_lookups.get() + 1);
        self.groups.clone()
    }
    fn enrolled(&self) -> Result<bool, LookupError> {
        self.enrolled.clone()
    }
}

fn req(user: &str, service: &str) -> Request {
    Request {
        user: user.into(),
        service: service.into(),
        host: "db-1.prod.example.com".into(),
        rhost: Some("192.0.2.7".into()),
        tty: Some("ssh".into()),
        command: None,
        ssh_keys: Vec::new(),
        // Wednesday 2026-11-25 12:00 UTC
        time: 1_795_608_000,
    }
}

fn policy(text: &str) -> Policy {
    Policy::parse("rules.toml", text).unwrap_or_else(|e| panic!("{e}"))
}

fn decide(p: &Policy, r: &Request, f: &FakeFacts) -> Verdict {
    p.evaluate(r, f, false).verdict
}

const OTP: Verdict = Verdict::Otp {
    unenrolled: Unenrolled::Deny,
};

fn deny(message: Option<&str>) -> Verdict {
    Verdict::Deny {
        message: message.map(str::to_owned),
    }
}

/// The Soffid examples of docs/rules.md#examples, as shipped (commented) in packaging/rules.toml.
const SOFFID: &str = include_str!("../../../packaging/examples/soffid-rules.toml");

#[test]
fn soffid_examples_decide_a_grid_of_requests() {
    let p = policy(SOFFID);
    let enrolled = FakeFacts::new(&["dev"], true);
    let unenrolled = FakeFacts::new(&["dev"], false);
    let mut root_admin = req("root", "sshd");
    root_admin.rhost = Some("10.20.3.4".into());
    let mut other_host = req("alice", "sshd");
    other_host.host = "web-1.example.com".into();
    let mut pay = req("alice", "sshd");
    pay.host = "pay-7".into();
    let cases: Vec<(&str, Request, &FakeFacts, Verdict, &str)> = vec![
        (
            "root from outside",
            req("root", "sshd"),
            &enrolled,
            deny(Some("root login is only allowed from the admin network")),
            "root-only-from-admin-net",
        ),
        (
            "root from admin net, prod",
            root_admin,
            &enrolled,
            OTP,
            "prod-ssh-otp",
        ),
        (
            "recovery",
            req("alice", "recovery"),
            &unenrolled,
            OTP,
            "recovery-needs-otp",
        ),
        (
            "prod ssh",
            req("alice", "sshd"),
            &unenrolled,
            OTP,
            "prod-ssh-otp",
        ),
        ("pay ssh", pay, &enrolled, OTP, "prod-ssh-otp"),
        (
            "other host ssh",
            other_host,
            &enrolled,
            Verdict::Permit,
            "default",
        ),
        (
            "sudo enrolled",
            req("alice", "sudo"),
            &enrolled,
            Verdict::Otp {
                unenrolled: Unenrolled::Permit,
            },
            "sudo-otp-if-enrolled",
        ),
        (
            "sudo unenrolled",
            req("alice", "sudo"),
            &unenrolled,
            Verdict::Permit,
            "sudo-otp-if-enrolled",
        ),
        (
            "su",
            req("alice", "su"),
            &enrolled,
            Verdict::Permit,
            "default",
        ),
    ];
    for (name, r, f, want, rule) in cases {
        let d = p.evaluate(&r, f, true);
        assert_eq!(d.verdict, want, "{name}");
        assert_eq!(d.rule_label(), rule, "{name}");
        assert_eq!(d.trace.len(), 4, "{name}: every rule is evaluated");
    }
}

#[test]
fn default_policy_asks_enrolled_users_on_ssh_and_sudo_only() {
    let p = policy(DEFAULT_POLICY);
    let yes = FakeFacts::new(&[], true);
    let no = FakeFacts::new(&[], false);
    for service in ["sshd", "sudo"] {
        assert!(matches!(
            decide(&p, &req("a", service), &yes),
            Verdict::Otp { .. }
        ));
        assert_eq!(decide(&p, &req("a", service), &no), Verdict::Permit);
    }
    assert_eq!(decide(&p, &req("a", "login"), &yes), Verdict::Permit);
}

#[test]
fn every_attribute_matches_exact_and_glob_values() {
    let f = FakeFacts::new(&["alice", "dev", "wheel"], true);
    let r = req("alice", "sshd");
    let applies = |target: &str| {
        let p = policy(&format!(
            "version = 1\ndefault = \"permit\"\n[[rule]]\nid = \"r\"\neffect = \"deny\"\nmatch = {{ {target} }}\n"
        ));
        matches!(decide(&p, &r, &f), Verdict::Deny { .. })
    };
    let table = [
        ("user = [\"alice\"]", true),
        ("user = [\"al*\"]", true),
        ("user = [\"bob\", \"a?ice\"]", true),
        ("user = [\"bob\"]", false),
        ("group = [\"wheel\"]", true),
        ("group = [\"adm\"]", false),
        ("service = [\"ssh*\"]", true),
        ("service = [\"sudo\"]", false),
        ("host = [\"db-*.prod.example.com\"]", true),
        ("host = [\"web-*\"]", false),
        ("rhost = [\"192.0.2.0/24\"]", true),
        ("rhost = [\"192.0.2.7\"]", true),
        ("rhost = [\"198.51.100.0/24\"]", false),
        ("rhost = [\"2001:db8::/32\"]", false),
        ("rhost = [\"192.0.2.*\"]", true),
        ("rhost = [\"local\"]", false),
        ("tty = [\"ssh\"]", true),
        ("tty = [\"tty*\"]", false),
        ("time = [\"wed 11:00-13:00\"]", true),
        ("time = [\"mon-fri 08:00-19:00\"]", true),
        ("time = [\"sat,sun 00:00-24:00\"]", false),
        ("time = [\"12:30-11:00\"]", false),
        ("enrolled = true", true),
        ("enrolled = false", false),
        ("command = [\"/usr/bin/id\"]", false),
        ("user = [\"alice\"], service = [\"sudo\"]", false),
        (
            "user = [\"alice\"], service = [\"sshd\"], group = [\"dev\"]",
            true,
        ),
    ];
    for (target, want) in table {
        assert_eq!(applies(target), want, "{target}");
    }
}

#[test]
fn ipv6_sources_local_and_absent_attributes() {
    let p = policy(
        r#"version = 1
default = "permit"
[[rule]]
id = "v6"
effect = "deny"
match = { rhost = ["2001:db8:20::/48"] }
[[rule]]
id = "console"
effect = "otp"
match = { rhost = ["local"] }
[[rule]]
id = "no-tty"
effect = "deny"
match = { tty = ["*"] }
"#,
    );
    let f = FakeFacts::new(&[], true);
    let mut r = req("a", "sshd");
    r.rhost = Some("2001:db8:20::5".into());
    assert_eq!(p.evaluate(&r, &f, false).rules, ["v6"]);
    r.rhost = None;
    r.tty = None;
    assert_eq!(p.evaluate(&r, &f, false).rules, ["console"]);
    r.rhost = Some(String::new());
    assert_eq!(
        p.evaluate(&r, &f, false).rules,
        ["console"],
        "empty rhost is local"
    );
    r.rhost = Some("198.51.100.1".into());
    // No tty: the tty condition is false, not an error.
    assert_eq!(p.evaluate(&r, &f, false).verdict, Verdict::Permit);
}

#[test]
fn time_windows_cross_midnight_and_follow_the_zone_through_dst() {
    let p = policy(
        r#"version = 1
default = "permit"
timezone = "Europe/Madrid"
[[rule]]
id = "night"
effect = "deny"
match = { time = ["fri 22:00-02:00"] }
"#,
    );
    let f = FakeFacts::new(&[], true);
    let at = |rfc3339: &str| {
        let mut r = req("a", "sshd");
        r.time = rfc3339.parse::<jiff::Timestamp>().unwrap().as_second();
        matches!(decide(&p, &r, &f), Verdict::Deny { .. })
    };
    // Friday 2026-11-27 23:30 Madrid (UTC+1) = 22:30 UTC.
    assert!(at("2026-11-27T22:30:00Z"));
    // Saturday 01:30 Madrid: still inside, the window started on Friday.
    assert!(at("2026-11-28T00:30:00Z"));
    // Saturday 02:30 Madrid: outside.
    assert!(!at("2026-11-28T01:30:00Z"));
    // Friday 21:30 Madrid: before.
    assert!(!at("2026-11-27T20:30:00Z"));
    // Thursday 23:30 Madrid: wrong day.
    assert!(!at("2026-11-26T22:30:00Z"));
    // Summer time (UTC+2): Friday 2026-07-03 22:30 Madrid = 20:30 UTC.
    assert!(at("2026-07-03T20:30:00Z"));
    assert!(!at("2026-07-03T19:30:00Z"));
    // The night DST ends (Sun 2026-10-25): a Saturday-night window is unaffected by design,
    // and a Friday one on 2026-10-23 uses summer time.
    assert!(at("2026-10-23T20:30:00Z"));
}

#[test]
fn except_makes_a_rule_not_applicable_only_when_all_of_it_holds() {
    let p = policy(
        r#"version = 1
default = "permit"
[[rule]]
id = "r"
effect = "deny"
match = { service = ["sshd"] }
except = { rhost = ["192.0.2.0/24"], user = ["alice"] }
"#,
    );
    let f = FakeFacts::new(&[], true);
    assert_eq!(decide(&p, &req("alice", "sshd"), &f), Verdict::Permit);
    assert!(matches!(
        decide(&p, &req("bob", "sshd"), &f),
        Verdict::Deny { .. }
    ));
}

const ALGO: &str = r#"
default = "permit"
[[rule]]
id = "p"
effect = "permit"
match = { user = ["alice"] }
[[rule]]
id = "o"
effect = "otp"
unenrolled = "permit"
match = { service = ["sshd"] }
[[rule]]
id = "o2"
effect = "otp"
match = { group = ["dev"] }
[[rule]]
id = "d"
effect = "deny"
match = { tty = ["ssh"] }
"#;

fn algo(name: &str) -> Policy {
    policy(&format!("version = 1\nalgorithm = \"{name}\"\n{ALGO}"))
}

#[test]
fn combining_algorithms_order_results_as_xacml_says() {
    let f = FakeFacts::new(&["dev"], true);
    let r = req("alice", "sshd");
    // first-applicable (C.8): the first applicable rule alone.
    let d = algo("first-applicable").evaluate(&r, &f, false);
    assert_eq!(
        (d.verdict, d.rules),
        (Verdict::Permit, vec!["p".to_string()])
    );
    // deny-overrides (C.2): any deny wins.
    let d = algo("deny-overrides").evaluate(&r, &f, false);
    assert_eq!(d.rules, ["d"]);
    assert!(matches!(d.verdict, Verdict::Deny { .. }));
    // permit-overrides (C.4): permit-class wins, with the union of obligations: otp required,
    // strictest unenrolled.
    let d = algo("permit-overrides").evaluate(&r, &f, false);
    assert_eq!(d.verdict, OTP);
    assert_eq!(d.rules, ["o", "o2"]);
    // Without the deny rule applying, deny-overrides also unions the obligations.
    let mut console = r.clone();
    console.tty = None;
    let d = algo("deny-overrides").evaluate(&console, &f, false);
    assert_eq!(d.verdict, OTP);
    // Nothing applicable: default.
    let none = FakeFacts::new(&[], true);
    let mut other = req("bob", "login");
    other.tty = None;
    for a in ["first-applicable", "deny-overrides", "permit-overrides"] {
        let d = algo(a).evaluate(&other, &none, false);
        assert_eq!(
            (d.rule_label(), d.verdict),
            ("default".to_string(), Verdict::Permit),
            "{a}"
        );
    }
}

#[test]
fn failed_lookups_make_rules_indeterminate_and_the_result_deny() {
    let broken = FakeFacts {
        groups: Err(LookupError::Nss(nix::Error::EIO)),
        enrolled: Ok(true),
        group_lookups: Cell::new(0),
    };
    let mut r = req("bob", "sshd");
    r.tty = None;
    // first-applicable: "o" applies before o2 (Ind{P}, groups failed), so "o" decides.
    let d = algo("first-applicable").evaluate(&r, &broken, false);
    assert!(matches!(d.verdict, Verdict::Otp { .. }));
    assert_eq!(d.rules, ["o"]);
    // Make "o" not apply: then o2's Indeterminate decides.
    let mut s = r.clone();
    s.service = "sudo".into();
    let d = algo("first-applicable").evaluate(&s, &broken, false);
    assert!(matches!(d.verdict, Verdict::Deny { .. }));
    assert!(d
        .indeterminate
        .as_deref()
        .unwrap()
        .contains("NSS look-up failed"));
    // permit-overrides: the applicable permit-class "o" still wins over Ind{P}.
    let d = algo("permit-overrides").evaluate(&r, &broken, false);
    assert!(matches!(d.verdict, Verdict::Otp { .. }));
    // deny-overrides: Ind{P} does not beat an applicable otp either (C.2 puts Permit first).
    let d = algo("deny-overrides").evaluate(&r, &broken, false);
    assert!(matches!(d.verdict, Verdict::Otp { .. }));
    // A deny rule that is Indeterminate (Ind{D}) beats permits under deny-overrides.
    let p = policy(
        r#"version = 1
algorithm = "deny-overrides"
default = "permit"
[[rule]]
id = "dev-deny"
effect = "deny"
match = { group = ["dev"] }
[[rule]]
id = "all-permit"
effect = "permit"
"#,
    );
    let d = p.evaluate(&r, &broken, false);
    assert!(matches!(d.verdict, Verdict::Deny { .. }));
    assert!(d.indeterminate.unwrap().contains("dev-deny"));
    // ...and loses to them under permit-overrides.
    let p = policy(
        r#"version = 1
algorithm = "permit-overrides"
[[rule]]
id = "dev-deny"
effect = "deny"
match = { group = ["dev"] }
[[rule]]
id = "all-permit"
effect = "permit"
"#,
    );
    assert_eq!(p.evaluate(&r, &broken, false).verdict, Verdict::Permit);
    // An unenrolled=permit rule whose enrolled look-up fails is Indeterminate.
    let no_db = FakeFacts {
        groups: Ok(vec![]),
        enrolled: Err(LookupError::NotYet("the token store")),
        group_lookups: Cell::new(0),
    };
    let d = policy(DEFAULT_POLICY).evaluate(&req("a", "sudo"), &no_db, false);
    assert!(matches!(d.verdict, Verdict::Deny { .. }));
}

#[test]
fn groups_are_looked_up_only_when_a_rule_needs_them() {
    let f = FakeFacts::new(&["dev"], true);
    let p = policy(SOFFID);
    p.evaluate(&req("alice", "sshd"), &f, false);
    assert_eq!(f.group_lookups.get(), 0);
}

#[test]
fn explain_says_why_for_every_rule() {
    let p = policy(SOFFID);
    let d = p.evaluate(&req("alice", "sshd"), &FakeFacts::new(&[], true), true);
    let lines: Vec<String> = d
        .trace
        .iter()
        .map(|t| format!("{} {:?} {} {}", t.id, t.outcome, t.why, t.decides))
        .collect();
    assert!(lines[0].contains("user alice not in [root]"), "{lines:?}");
    assert!(lines[2].contains("host db-1.prod.example.com matches") && lines[2].ends_with("true"));
    assert!(lines[3].contains("service sshd not in [sudo]"));
    assert!(p.digest().starts_with("sha256:"));
}

#[test]
fn invalid_files_are_refused_with_line_and_column() {
    let cases = [
        ("version = 1\nalgoritm = \"x\"\n", 2, "unknown field"),
        ("version = 2\n", 1, "version must be 1"),
        ("version = 1\nalgorithm = \"best\"\n", 2, "algorithm must be"),
        ("version = 1\ntimezone = \"Mars/Olympus\"\n", 2, "unknown time zone"),
        (
            "version = 1\n[[rule]]\nid = \"a\"\neffect = \"permit\"\n[[rule]]\nid = \"a\"\neffect = \"deny\"\n",
            6,
            "duplicate rule id",
        ),
        ("version = 1\n[[rule]]\nid = \"a\"\neffect = \"allow\"\n", 4, "effect must be"),
        (
            "version = 1\n[[rule]]\nid = \"a\"\neffect = \"deny\"\nmatch = { rhost = [\"10.0.0.0/33\"] }\n",
            5,
            "not a CIDR",
        ),
        (
            "version = 1\n[[rule]]\nid = \"a\"\neffect = \"deny\"\nmatch = { time = [\"mon-fry 08:00-09:00\"] }\n",
            5,
            "not a time window",
        ),
        (
            "version = 1\n[[rule]]\nid = \"a\"\neffect = \"deny\"\nmatch = { user = [\"@admins\"] }\n",
            5,
            "undefined set @admins",
        ),
        (
            "version = 1\n[[rule]]\nid = \"a\"\neffect = \"permit\"\nunenrolled = \"deny\"\n",
            5,
            "only to otp rules",
        ),
        (
            "version = 1\n[[rule]]\nid = \"a\"\neffect = \"otp\"\nmatch = { colour = [\"red\"] }\n",
            5,
            "unknown field",
        ),
        ("version = 1\n[[rule]]\nid = \"Bad Id\"\neffect = \"otp\"\n", 3, "kebab-case"),
        ("version = 1\n[[rule]\n", 2, ""),
    ];
    for (text, line, words) in cases {
        let err = match Policy::parse("rules.toml", text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e,
        };
        assert_eq!(err.line, line, "{text}\n{err}");
        assert!(err.column >= 1);
        assert!(
            err.to_string().starts_with(&format!("rules.toml:{line}:")),
            "{err}"
        );
        assert!(err.message.contains(words), "{err}");
    }
}

#[test]
fn shadowed_rules_are_warned_about() {
    let p = policy(
        "version = 1\n[[rule]]\nid = \"all\"\neffect = \"otp\"\n[[rule]]\nid = \"never\"\neffect = \"deny\"\n",
    );
    assert_eq!(p.warnings().len(), 1);
    assert!(p.warnings()[0].contains("never"));
}

/// Every TOML example in docs/rules.md loads (a fragment without `version` as part of a file),
/// and the one shown as the shipped default decides as the shipped file does.
#[test]
fn the_examples_in_the_rules_reference_load() {
    let doc = include_str!("../../../docs/rules.md");
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
        .collect();
    assert!(blocks.len() >= 4, "found {} toml blocks", blocks.len());
    for block in &blocks {
        let text = if block.contains("version") {
            block.to_string()
        } else {
            format!("version = 1\n{block}")
        };
        if let Err(e) = Policy::parse("docs/rules.md", &text) {
            panic!("{e}\n{text}");
        }
    }
    let shown = blocks
        .iter()
        .find(|b| b.contains("ssh-and-sudo-otp-if-enrolled"))
        .map(|b| policy(b))
        .expect("the shipped default is shown");
    let shipped = policy(DEFAULT_POLICY);
    for enrolled in [true, false] {
        let f = FakeFacts::new(&[], enrolled);
        for service in ["sshd", "sudo", "enroll", "recovery", "login"] {
            let r = req("a", service);
            assert_eq!(
                decide(&shown, &r, &f),
                decide(&shipped, &r, &f),
                "{service}"
            );
        }
    }
}

/// Details docs/rules.md states that the tests above do not reach.
#[test]
fn details_of_the_rules_reference_hold() {
    let f = FakeFacts::new(&[], true);
    let at = |p: &Policy, rfc3339: &str| {
        let mut r = req("a", "sshd");
        r.time = rfc3339.parse::<jiff::Timestamp>().unwrap().as_second();
        matches!(decide(p, &r, &f), Verdict::Deny { .. })
    };
    // Day ranges wrap; the end is exclusive; 24:00 is the end of the day.
    let p = policy(
        "version = 1\ndefault = \"permit\"\n[[rule]]\nid = \"w\"\neffect = \"deny\"\nmatch = { time = [\"fri-mon 20:00-24:00\"] }\n",
    );
    assert!(at(&p, "2026-11-30T23:59:00Z"), "Monday is inside fri-mon");
    assert!(!at(&p, "2026-12-01T21:00:00Z"), "Tuesday is not");
    assert!(!at(&p, "2026-11-30T19:59:00Z"), "before the start");
    // A default of "otp" requires a token of every user.
    let p = policy("version = 1\ndefault = \"otp\"\n");
    assert_eq!(decide(&p, &req("a", "sshd"), &f), OTP);
    // Without `default`, no applicable rule is a deny.
    let p = policy("version = 1\n");
    assert_eq!(decide(&p, &req("a", "sshd"), &f), deny(None));
    // rhost: a name is compared with the text; a set may hold networks.
    let p = policy(
        "version = 1\ndefault = \"permit\"\n[sets]\nnets = [\"192.0.2.0/28\"]\n[[rule]]\nid = \"n\"\neffect = \"deny\"\nmatch = { rhost = [\"@nets\", \"gw.example.com\"] }\n",
    );
    let mut r = req("a", "sshd");
    assert!(matches!(decide(&p, &r, &f), Verdict::Deny { .. }));
    r.rhost = Some("gw.example.com".into());
    assert!(matches!(decide(&p, &r, &f), Verdict::Deny { .. }));
    r.rhost = Some("GW.example.com".into());
    assert_eq!(
        decide(&p, &r, &f),
        Verdict::Permit,
        "names are case-sensitive"
    );
    // Errors the reference lists beyond invalid_files_are_refused_with_line_and_column.
    for (text, words) in [
        (
            "version = 1\n[[rule]]\nid = \"a\"\neffect = \"otp\"\nmessage = \"no\"\n",
            "message applies only to deny rules",
        ),
        (
            "version = 1\n[sets]\na = [\"@b\"]\nb = [\"x\"]\n[[rule]]\nid = \"a\"\neffect = \"deny\"\nmatch = { user = [\"@a\"] }\n",
            "sets cannot contain sets",
        ),
        (
            "version = 1\n[[rule]]\nid = \"a\"\neffect = \"deny\"\nmatch = { time = [\"10:00-10:00\"] }\n",
            "empty time window",
        ),
    ] {
        match Policy::parse("rules.toml", text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => assert!(e.message.contains(words), "{e}"),
        }
    }
}

const KEY_A: &str = "SHA256:m03Gu4hX3L7b9dcRBVWzhP2yxdit9hsiPMVWQ48wSS0";
const KEY_B: &str = "SHA256:zD1XQY5G3tSjp4rmSKyBlZW/tVagAfj5TY2q8KyUbJA";

const REUSE: &str = r#"
version = 1
sets = { hardware = ["SHA256:m03Gu4hX3L7b9dcRBVWzhP2yxdit9hsiPMVWQ48wSS0"] }

[[rule]]
id = "hardware-keys"
effect = "permit"
match = { service = ["sshd"], ssh_key = ["@hardware"] }

[[rule]]
id = "ssh"
effect = "otp"
reuse = "10m"
reuse_scope = ["rhost", "ssh_key"]
match = { service = ["sshd"] }

[[rule]]
id = "sudo"
effect = "otp"
reuse = "15m"
reuse_scope = ["session", "host"]
match = { service = ["sudo"] }
"#;

#[test]
fn an_otp_rule_with_reuse_carries_its_window_scope_and_digest() {
    let p = policy(REUSE);
    let d = p.evaluate(&req("ann", "sudo"), &FakeFacts::new(&[], true), false);
    assert!(matches!(d.verdict, Verdict::Otp { .. }));
    assert_eq!(d.reuse.len(), 1);
    let r = &d.reuse[0];
    assert_eq!((r.rule.as_str(), r.window), ("sudo", 900));
    assert_eq!(r.scope, [Scope::Host, Scope::Session]);
    assert_eq!(r.digest.len(), 32);
    // A permit, a deny or an otp rule without reuse carries none.
    let plain = policy("version = 1\ndefault = \"otp\"\n");
    assert!(plain
        .evaluate(&req("ann", "sudo"), &FakeFacts::new(&[], true), false)
        .reuse
        .is_empty());
}

#[test]
fn a_rule_s_digest_changes_with_the_rule_or_its_sets_only() {
    let digest = |text: &str, service: &str| {
        policy(text)
            .evaluate(&req("ann", service), &FakeFacts::new(&[], true), false)
            .reuse
            .first()
            .map(|r| r.digest.clone())
    };
    let before = (digest(REUSE, "sshd"), digest(REUSE, "sudo"));
    // Another rule's window changes: this one's grants stay.
    let sudo_changed = REUSE.replace("\"15m\"", "\"20m\"");
    assert_eq!(digest(&sudo_changed, "sshd"), before.0);
    assert_ne!(digest(&sudo_changed, "sudo"), before.1);
    // A comment or blank line changes nothing.
    let commented = REUSE.replace(
        "[[rule]]\nid = \"ssh\"",
        "# ssh logins\n\n[[rule]]\nid = \"ssh\"",
    );
    assert_eq!(digest(&commented, "sshd"), before.0);
    // A set the rule uses changes it.
    let with_set = REUSE
        .replace(
            "match = { service = [\"sshd\"] }",
            "match = { service = [\"@ssh\"] }",
        )
        .replace("sets = {", "sets = { ssh = [\"sshd\"],");
    let d1 = digest(&with_set, "sshd");
    let d2 = digest(
        &with_set.replace("ssh = [\"sshd\"]", "ssh = [\"sshd\", \"ssh2\"]"),
        "sshd",
    );
    assert_ne!(d1, d2);
}

#[test]
fn ssh_key_rules_need_every_key_listed_and_never_match_no_key() {
    let p = policy(REUSE);
    let with = |keys: &[&str]| {
        let mut r = req("ann", "sshd");
        r.ssh_keys = keys.iter().map(|k| k.to_string()).collect();
        decide(&p, &r, &FakeFacts::new(&[], true))
    };
    assert_eq!(with(&[KEY_A]), Verdict::Permit);
    assert!(matches!(with(&[KEY_B]), Verdict::Otp { .. }));
    assert!(matches!(with(&[KEY_A, KEY_B]), Verdict::Otp { .. }));
    assert!(matches!(with(&[]), Verdict::Otp { .. }));
    let any = policy(
        "version = 1\ndefault = \"otp\"\n[[rule]]\nid = \"k\"\neffect = \"permit\"\nmatch = { ssh_key = [\"*\"] }\n",
    );
    let mut r = req("ann", "sshd");
    assert!(matches!(
        decide(&any, &r, &FakeFacts::new(&[], true)),
        Verdict::Otp { .. }
    ));
    r.ssh_keys = vec![KEY_B.into()];
    assert_eq!(
        decide(&any, &r, &FakeFacts::new(&[], true)),
        Verdict::Permit
    );
}

#[test]
fn reuse_faults_are_refused_with_line_and_column() {
    let rule =
        |body: &str| format!("version = 1\n[[rule]]\nid = \"a\"\neffect = \"otp\"\n{body}\n");
    let cases = [
        (rule("reuse = \"10m\""), 5, "reuse needs reuse_scope"),
        (rule("reuse_scope = [\"rhost\"]"), 5, "reuse_scope needs reuse"),
        (rule("reuse = \"soon\"\nreuse_scope = [\"rhost\"]"), 5, "reuse must be"),
        (rule("reuse = \"0s\"\nreuse_scope = [\"rhost\"]"), 5, "reuse must be"),
        (rule("reuse = \"25h\"\nreuse_scope = [\"rhost\"]"), 5, "reuse must be"),
        (rule("reuse = \"1.5s\"\nreuse_scope = [\"rhost\"]"), 5, "reuse must be"),
        (rule("reuse = \"10m\"\nreuse_scope = []"), 6, "at least one"),
        (rule("reuse = \"10m\"\nreuse_scope = [\"rhost\", \"ip\"]"), 6, "unknown reuse_scope"),
        (rule("reuse = \"10m\"\nreuse_scope = [\"tty\", \"tty\"]"), 6, "listed twice"),
        (rule("match = { ssh_key = [\"md5:aa\"] }"), 5, "not a key fingerprint"),
        (
            "version = 1\n[[rule]]\nid = \"a\"\neffect = \"permit\"\nreuse = \"10m\"\nreuse_scope = [\"tty\"]\n".to_owned(),
            5,
            "only to otp rules",
        ),
    ];
    for (text, line, words) in cases {
        let err = match Policy::parse("rules.toml", &text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e,
        };
        assert_eq!(err.line, line, "{text}\n{err}");
        assert!(err.message.contains(words), "{err}");
    }
    // Seconds are fine (tests use them), and so is a day.
    policy(&rule("reuse = \"1s\"\nreuse_scope = [\"session\"]"));
    policy(&rule(
        "reuse = \"24h\"\nreuse_scope = [\"ssh_key\", \"rhost\"]",
    ));
}

/// `host` and `service` are the same for every login a rule sees on a server, and sshd sets
/// PAM_TTY to "ssh" for every login it authenticates (a pts number is reused by the next
/// login that opens one): a scope made of these alone binds the grant to the user alone, which
/// an empty scope is refused for. A stolen password then skips the OTP from anywhere.
#[test]
fn a_reuse_scope_without_the_login_s_origin_is_warned_about() {
    let rule = |scope: &str| {
        format!(
            "version = 1\n[[rule]]\nid = \"a\"\neffect = \"otp\"\nreuse = \"10m\"\nreuse_scope = {scope}\n"
        )
    };
    for scope in [
        r#"["service"]"#,
        r#"["host"]"#,
        r#"["tty"]"#,
        r#"["host", "service", "tty"]"#,
    ] {
        let p = policy(&rule(scope));
        assert_eq!(p.warnings().len(), 1, "{scope}: {:?}", p.warnings());
        assert!(
            p.warnings()[0].contains("rules.toml:3: rule a"),
            "{:?}",
            p.warnings()
        );
    }
    for scope in [
        r#"["rhost"]"#,
        r#"["ssh_key", "tty"]"#,
        r#"["session", "host"]"#,
    ] {
        assert!(policy(&rule(scope)).warnings().is_empty(), "{scope}");
    }
}
