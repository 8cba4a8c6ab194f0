//! The words of an explanation: what a policy is, and why each condition held or not.

use super::eval::Ctx;
use super::window::DAYS;
use super::{Condition, Name, Policy, Source};

impl Policy {
    /// One line describing the policy, for explanations.
    pub fn summary(&self) -> String {
        format!(
            "{} {} {} default={} timezone={} rules={}",
            self.file,
            self.digest,
            self.algorithm.as_str(),
            self.default.as_str(),
            self.timezone_name,
            self.rules.len()
        )
    }
}

impl Condition {
    /// Words for an explanation.
    pub(super) fn describe(&self, ctx: &Ctx<'_>, held: bool) -> String {
        let r = ctx.request;
        let names = |n: &[Name]| n.iter().map(Name::text).collect::<Vec<_>>().join(", ");
        let (value, list) = match self {
            Condition::User(n) => (r.user.clone(), names(n)),
            Condition::Service(n) => (r.service.clone(), names(n)),
            Condition::Host(n) => (r.host.clone(), names(n)),
            Condition::Tty(n) => (r.tty.clone().unwrap_or_else(|| "(none)".into()), names(n)),
            Condition::Command(n) => (
                r.command.clone().unwrap_or_else(|| "(none)".into()),
                names(n),
            ),
            Condition::SshKey(n) => (
                if r.ssh_keys.is_empty() {
                    "(none)".into()
                } else {
                    r.ssh_keys.join(",")
                },
                names(n),
            ),
            Condition::Group(n) => (
                format!("[{}]", ctx.facts.groups().unwrap_or_default().join(",")),
                names(n),
            ),
            Condition::Rhost(s) => (
                r.rhost
                    .clone()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "local".into()),
                s.iter()
                    .map(|s| match s {
                        Source::Local => "local".to_owned(),
                        Source::Net(n) => n.to_string(),
                        Source::Name(n) => n.text().to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            Condition::Time(_) => (
                ctx.clock
                    .map(|(d, m)| format!("{} {:02}:{:02}", DAYS[d], m / 60, m % 60))
                    .unwrap_or_else(|| "(invalid time)".into()),
                "the time windows".into(),
            ),
            Condition::Enrolled(want) => {
                let have = ctx
                    .facts
                    .enrolled()
                    .map_or("unknown".into(), |e| e.to_string());
                return format!(
                    "enrolled={have} {} {want}",
                    if held { "is" } else { "is not" }
                );
            }
        };
        let key = self.key();
        if held {
            format!("{key} {value} matches [{list}]")
        } else {
            format!("{key} {value} not in [{list}]")
        }
    }
}
