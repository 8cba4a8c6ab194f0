//! Deciding a request: each rule's outcome, then the combining algorithm over them.

use std::net::IpAddr;

use super::{
    Algorithm, Condition, Decision, Effect, Facts, LookupError, Name, Outcome, Policy, Request,
    Reuse, Rule, RuleTrace, Source, Unenrolled, Verdict,
};

impl Policy {
    /// Decides `request`. Every rule is evaluated, so the trace is complete and the result does
    /// not depend on evaluation order; `explain` also fills in the reasons in words.
    pub fn evaluate(&self, request: &Request, facts: &dyn Facts, explain: bool) -> Decision {
        let clock = jiff::Timestamp::from_second(request.time)
            .map(|t| t.to_zoned(self.timezone.clone()))
            .ok()
            .map(|z| {
                (
                    z.weekday().to_monday_zero_offset() as usize,
                    (z.hour() as u16) * 60 + z.minute() as u16,
                )
            });
        let ctx = Ctx {
            request,
            facts,
            clock,
            explain,
        };
        let mut trace: Vec<RuleTrace> =
            Vec::with_capacity(if explain { self.rules.len() } else { 0 });
        // Effective effect of each applicable rule (an `unenrolled = permit` otp rule is plain
        // permit for a user without a token).
        let mut results: Vec<(usize, Result<Effect, String>)> = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let (outcome, why) = rule.evaluate(&ctx);
            let effect = match &outcome {
                Outcome::Applicable => Some(rule.effective_effect(&ctx)),
                Outcome::Indeterminate(cause) => Some(Err(cause.clone())),
                Outcome::NotApplicable => None,
            };
            if let Some(e) = effect {
                results.push((i, e));
            }
            if !explain {
                continue;
            }
            trace.push(RuleTrace {
                id: rule.id.clone(),
                line: rule.line,
                outcome,
                why,
                decides: false,
            });
        }
        let (verdict, deciding, indeterminate) = self.combine(&results);
        for &i in &deciding {
            if let Some(t) = trace.get_mut(i) {
                t.decides = true;
            }
        }
        let reuse = self.reuse_of(&verdict, &deciding);
        Decision {
            verdict,
            rules: deciding.iter().map(|&i| self.rules[i].id.clone()).collect(),
            indeterminate,
            trace,
            reuse,
        }
    }

    /// The reuse obligations of an `otp` verdict: every deciding rule's, or none when one of
    /// them (or the default) asks for a code every time.
    fn reuse_of(&self, verdict: &Verdict, deciding: &[usize]) -> Vec<Reuse> {
        if !matches!(verdict, Verdict::Otp { .. }) || deciding.is_empty() {
            return Vec::new();
        }
        deciding
            .iter()
            .map(|&i| self.rules[i].reuse.clone())
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default()
    }

    /// Applies the combining algorithm to the applicable and indeterminate rules.
    fn combine(
        &self,
        results: &[(usize, Result<Effect, String>)],
    ) -> (Verdict, Vec<usize>, Option<String>) {
        let indeterminate = |i: usize, cause: &str| {
            (
                Verdict::Deny { message: None },
                vec![i],
                Some(format!("rule {}: {cause}", self.rules[i].id)),
            )
        };
        // Indeterminate rules keep their effect's class: deny rules are Ind{D}, others Ind{P}.
        let is_deny_class = |i: usize| self.rules[i].effect == Effect::Deny;
        match self.algorithm {
            Algorithm::FirstApplicable => match results.first() {
                Some((i, Ok(effect))) => (self.verdict_of(*i, *effect), vec![*i], None),
                Some((i, Err(cause))) => indeterminate(*i, cause),
                None => self.default_verdict(),
            },
            Algorithm::DenyOverrides => {
                if let Some((i, _)) = results.iter().find(|(_, r)| r == &Ok(Effect::Deny)) {
                    return (self.verdict_of(*i, Effect::Deny), vec![*i], None);
                }
                if let Some((i, Err(c))) = results
                    .iter()
                    .find(|(i, r)| r.is_err() && is_deny_class(*i))
                {
                    return indeterminate(*i, c);
                }
                if let Some(permit) = self.union_of_permits(results) {
                    return permit;
                }
                if let Some((i, Err(c))) = results.iter().find(|(_, r)| r.is_err()) {
                    return indeterminate(*i, c);
                }
                self.default_verdict()
            }
            Algorithm::PermitOverrides => {
                if let Some(permit) = self.union_of_permits(results) {
                    return permit;
                }
                if let Some((i, Err(c))) = results
                    .iter()
                    .find(|(i, r)| r.is_err() && !is_deny_class(*i))
                {
                    return indeterminate(*i, c);
                }
                if let Some((i, _)) = results.iter().find(|(_, r)| r == &Ok(Effect::Deny)) {
                    return (self.verdict_of(*i, Effect::Deny), vec![*i], None);
                }
                if let Some((i, Err(c))) = results.iter().find(|(_, r)| r.is_err()) {
                    return indeterminate(*i, c);
                }
                self.default_verdict()
            }
        }
    }

    /// All applicable permit-class rules together: any `otp` requires an OTP, and the strictest
    /// `unenrolled` among them wins.
    fn union_of_permits(
        &self,
        results: &[(usize, Result<Effect, String>)],
    ) -> Option<(Verdict, Vec<usize>, Option<String>)> {
        let permits: Vec<(usize, Effect)> = results
            .iter()
            .filter_map(|(i, r)| match r {
                Ok(e @ (Effect::Permit | Effect::Otp)) => Some((*i, *e)),
                _ => None,
            })
            .collect();
        if permits.is_empty() {
            return None;
        }
        let otp: Vec<usize> = permits
            .iter()
            .filter(|(_, e)| *e == Effect::Otp)
            .map(|(i, _)| *i)
            .collect();
        if otp.is_empty() {
            return Some((
                Verdict::Permit,
                permits.iter().map(|(i, _)| *i).collect(),
                None,
            ));
        }
        let unenrolled = otp
            .iter()
            .map(|&i| self.rules[i].unenrolled)
            .max()
            .unwrap_or(Unenrolled::Deny);
        Some((Verdict::Otp { unenrolled }, otp, None))
    }

    fn verdict_of(&self, i: usize, effect: Effect) -> Verdict {
        match effect {
            Effect::Permit => Verdict::Permit,
            Effect::Otp => Verdict::Otp {
                unenrolled: self.rules[i].unenrolled,
            },
            Effect::Deny => Verdict::Deny {
                message: self.rules[i].message.clone(),
            },
        }
    }

    fn default_verdict(&self) -> (Verdict, Vec<usize>, Option<String>) {
        let verdict = match self.default {
            Effect::Permit => Verdict::Permit,
            Effect::Otp => Verdict::Otp {
                unenrolled: Unenrolled::Deny,
            },
            Effect::Deny => Verdict::Deny { message: None },
        };
        (verdict, Vec::new(), None)
    }
}

/// Evaluation context: the request, its lazily looked-up facts, and its local time.
pub(super) struct Ctx<'a> {
    pub(super) request: &'a Request,
    pub(super) facts: &'a dyn Facts,
    /// Local weekday (Monday = 0) and minute of the day, in the policy's time zone.
    pub(super) clock: Option<(usize, u16)>,
    pub(super) explain: bool,
}

impl Rule {
    /// NotApplicable, Applicable or Indeterminate, and why (in words when explaining).
    fn evaluate(&self, ctx: &Ctx<'_>) -> (Outcome, String) {
        match all_hold(&self.target, ctx) {
            Holds::No(why) => (Outcome::NotApplicable, why),
            Holds::Unknown(cause) => (Outcome::Indeterminate(cause.clone()), cause),
            Holds::Yes(why) => {
                if self.except.is_empty() {
                    return (Outcome::Applicable, why);
                }
                match all_hold(&self.except, ctx) {
                    Holds::Yes(e) => (
                        Outcome::NotApplicable,
                        if ctx.explain {
                            format!("except holds: {e}")
                        } else {
                            String::new()
                        },
                    ),
                    Holds::No(_) => (Outcome::Applicable, why),
                    Holds::Unknown(cause) => (Outcome::Indeterminate(cause.clone()), cause),
                }
            }
        }
    }

    /// The effect of an applicable rule for this request: `otp` with `unenrolled = permit` is
    /// shorthand for "otp if enrolled, else permit".
    fn effective_effect(&self, ctx: &Ctx<'_>) -> Result<Effect, String> {
        if self.effect == Effect::Otp && self.unenrolled == Unenrolled::Permit {
            return match ctx.facts.enrolled() {
                Ok(true) => Ok(Effect::Otp),
                Ok(false) => Ok(Effect::Permit),
                Err(cause) => Err(format!("enrolled: {cause}")),
            };
        }
        Ok(self.effect)
    }
}

enum Holds {
    Yes(String),
    No(String),
    Unknown(String),
}

/// XACML AllOf: false if any condition is false (even when another could not be evaluated),
/// else Indeterminate if any could not be evaluated, else true.
fn all_hold(conditions: &[Condition], ctx: &Ctx<'_>) -> Holds {
    let mut unknown = None;
    let mut reasons = Vec::new();
    for c in conditions {
        match c.holds(ctx) {
            Ok(true) => {
                if ctx.explain {
                    reasons.push(c.describe(ctx, true));
                }
            }
            Ok(false) => {
                return Holds::No(if ctx.explain {
                    c.describe(ctx, false)
                } else {
                    String::new()
                })
            }
            Err(cause) => unknown = Some(format!("{}: {cause}", c.key())),
        }
    }
    match unknown {
        Some(cause) => Holds::Unknown(cause),
        None if reasons.is_empty() && ctx.explain => Holds::Yes("matches every request".into()),
        None => Holds::Yes(reasons.join(", ")),
    }
}

impl Condition {
    pub(super) fn key(&self) -> &'static str {
        match self {
            Condition::User(_) => "user",
            Condition::Group(_) => "group",
            Condition::Service(_) => "service",
            Condition::Host(_) => "host",
            Condition::Rhost(_) => "rhost",
            Condition::Tty(_) => "tty",
            Condition::Command(_) => "command",
            Condition::SshKey(_) => "ssh_key",
            Condition::Time(_) => "time",
            Condition::Enrolled(_) => "enrolled",
        }
    }

    fn holds(&self, ctx: &Ctx<'_>) -> Result<bool, LookupError> {
        let r = ctx.request;
        let any = |names: &[Name], value: Option<&str>| {
            value.is_some_and(|v| names.iter().any(|n| n.matches(v)))
        };
        Ok(match self {
            Condition::User(n) => any(n, Some(&r.user)),
            Condition::Service(n) => any(n, Some(&r.service)),
            Condition::Host(n) => any(n, Some(&r.host)),
            Condition::Tty(n) => any(n, r.tty.as_deref().filter(|t| !t.is_empty())),
            Condition::Command(n) => any(n, r.command.as_deref()),
            Condition::SshKey(n) => {
                !r.ssh_keys.is_empty() && r.ssh_keys.iter().all(|k| n.iter().any(|p| p.matches(k)))
            }
            Condition::Group(n) => {
                let groups = ctx.facts.groups()?;
                groups.iter().any(|g| n.iter().any(|p| p.matches(g)))
            }
            Condition::Rhost(sources) => {
                let rhost = r.rhost.as_deref().filter(|h| !h.is_empty());
                let ip = rhost.and_then(|h| h.parse::<IpAddr>().ok());
                sources.iter().any(|s| match (s, rhost) {
                    (Source::Local, None) => true,
                    (Source::Net(net), _) => ip.is_some_and(|ip| net.contains(&ip)),
                    (Source::Name(n), Some(h)) => n.matches(h),
                    _ => false,
                })
            }
            Condition::Time(windows) => match ctx.clock {
                Some((day, minute)) => windows.iter().any(|w| w.contains(day, minute)),
                None => false,
            },
            Condition::Enrolled(want) => ctx.facts.enrolled()? == *want,
        })
    }
}
