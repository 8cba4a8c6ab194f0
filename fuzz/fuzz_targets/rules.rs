//! The rules parser and evaluator: any text either loads or is refused with a position, and a
//! loaded policy decides any request without panicking.
#![no_main]

use guardd::policy::{Facts, LookupError, Policy, Request};
use libfuzzer_sys::fuzz_target;

struct Fixed;

impl Facts for Fixed {
    fn groups(&self) -> Result<Vec<String>, LookupError> {
        Ok(vec!["users".into(), "wheel".into()])
    }
    fn enrolled(&self) -> Result<bool, LookupError> {
        Ok(true)
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::parse("fuzz.toml", text) {
        Ok(policy) => {
            for (user, service, rhost) in [
                ("root", "sshd", Some("192.0.2.7")),
                ("alice", "sudo", None),
                ("bob", "recovery", Some("2001:db8::1")),
            ] {
                let request = Request {
                    user: user.into(),
                    service: service.into(),
                    host: "db-1.prod.example.com".into(),
                    rhost: rhost.map(Into::into),
                    tty: Some("pts/1".into()),
                    command: None,
                    time: 1_790_000_000,
                };
                let _ = policy.evaluate(&request, &Fixed, true);
            }
        }
        Err(e) => assert!(e.line >= 1 && e.column >= 1, "{e}"),
    }
});
