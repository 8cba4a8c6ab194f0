//! The rules: who needs an OTP, for which service, on which server, from where, when.
//!
//! XACML's useful core without its XML (the reference: docs/rules.md): ordered rules with
//! AND-of-OR targets and `except`, NotApplicable vs Indeterminate, the first-applicable,
//! deny-overrides and permit-overrides algorithms, and the "verify an OTP" obligation.
//! A file is parsed and validated once; a decision is a walk over compiled matchers, and the
//! costly facts (NSS groups, "enrolled?") are looked up lazily, once per request.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;
use wildmatch::WildMatch;

/// The policy guardd uses when no rules file exists: every enrolled user is asked for an OTP
/// on sshd and sudo, and unenrolled users pass (safe to install without locking anyone out).
pub const DEFAULT_POLICY: &str = include_str!("../../packaging/rules.toml");

/// A policy file that cannot be used, with where the fault is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// What a rule does when it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Permit,
    Otp,
    Deny,
}

impl Effect {
    fn parse(s: &str) -> Option<Effect> {
        match s {
            "permit" => Some(Effect::Permit),
            "otp" => Some(Effect::Otp),
            "deny" => Some(Effect::Deny),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Permit => "permit",
            Effect::Otp => "otp",
            Effect::Deny => "deny",
        }
    }
}

/// How results of several rules combine (XACML 3.0 appendix C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    FirstApplicable,
    DenyOverrides,
    PermitOverrides,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::FirstApplicable => "first-applicable",
            Algorithm::DenyOverrides => "deny-overrides",
            Algorithm::PermitOverrides => "permit-overrides",
        }
    }
}

/// For an `otp` rule: whether a user without an active token is refused or let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unenrolled {
    Permit,
    Deny,
}

/// The final answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// In without a code.
    Permit,
    /// In after a verified OTP; `unenrolled` says what happens to a user without a token.
    Otp { unenrolled: Unenrolled },
    /// Refused; `message` is the deciding rule's text for the user, if it has one.
    Deny { message: Option<String> },
}

/// The outcome of one rule for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    NotApplicable,
    Applicable,
    /// A look-up failed; the rule carries its effect's class into the combining algorithm.
    Indeterminate(String),
}

/// One rule's line in an explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleTrace {
    pub id: String,
    pub line: usize,
    pub outcome: Outcome,
    /// Why, in words (only filled when explaining).
    pub why: String,
    /// Whether this rule decided (or helped decide) the result.
    pub decides: bool,
}

/// A decision with the reason for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// Ids of the deciding rules; empty when `default` decided.
    pub rules: Vec<String>,
    /// Set when a look-up failure made the result Indeterminate (and so Deny).
    pub indeterminate: Option<String>,
    /// Per-rule outcomes (every rule is evaluated); filled only when explaining.
    pub trace: Vec<RuleTrace>,
}

impl Decision {
    /// The deciding rule ids for audit lines, or `default`.
    pub fn rule_label(&self) -> String {
        if self.rules.is_empty() {
            "default".into()
        } else {
            self.rules.join(",")
        }
    }
}

/// A look-up that could not be done (NSS down, database error): the rule becomes Indeterminate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupError(pub String);

/// The facts about a request that cost a look-up. Implementations should cache: the engine may
/// ask several times per request.
pub trait Facts {
    /// The user's primary and supplementary group names (empty for an unknown user).
    fn groups(&self) -> Result<Vec<String>, LookupError>;
    /// Whether the user has at least one active token.
    fn enrolled(&self) -> Result<bool, LookupError>;
}

/// What is being decided. Absent attributes are `None`: conditions on them are simply false.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub user: String,
    pub service: String,
    pub host: String,
    pub rhost: Option<String>,
    pub tty: Option<String>,
    pub command: Option<String>,
    /// When the login happens (Unix seconds).
    pub time: i64,
}

/// A compiled, validated policy.
pub struct Policy {
    file: String,
    digest: String,
    algorithm: Algorithm,
    default: Effect,
    timezone: jiff::tz::TimeZone,
    timezone_name: String,
    rules: Vec<Rule>,
    warnings: Vec<String>,
}

struct Rule {
    id: String,
    line: usize,
    effect: Effect,
    unenrolled: Unenrolled,
    message: Option<String>,
    target: Vec<Condition>,
    except: Vec<Condition>,
}

/// One key of a target: any of the values may match.
enum Condition {
    User(Vec<Name>),
    Group(Vec<Name>),
    Service(Vec<Name>),
    Host(Vec<Name>),
    Rhost(Vec<Source>),
    Tty(Vec<Name>),
    Command(Vec<Name>),
    Time(Vec<Window>),
    Enrolled(bool),
}

/// An exact name or a glob with `*` and `?`.
enum Name {
    Exact(String),
    Glob(String, WildMatch),
}

impl Name {
    fn new(s: &str) -> Name {
        if s.contains(['*', '?']) {
            Name::Glob(s.to_owned(), WildMatch::new(s))
        } else {
            Name::Exact(s.to_owned())
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Name::Exact(s) => s == value,
            Name::Glob(_, g) => g.matches(value),
        }
    }

    fn text(&self) -> &str {
        match self {
            Name::Exact(s) | Name::Glob(s, _) => s,
        }
    }
}

/// Where a login comes from.
enum Source {
    Net(IpNet),
    Name(Name),
    /// No remote host (console, local su/sudo), as pam_access's LOCAL.
    Local,
}

/// A weekly window: on `days` (Monday = 0), from `start` to `end` minutes after midnight;
/// a window whose end is before its start runs past midnight into the next day.
#[derive(Clone, Copy)]
struct Window {
    days: [bool; 7],
    start: u16,
    end: u16,
}

impl Window {
    /// Whether local weekday `day` (Monday = 0) at `minute` lies in the window.
    fn contains(&self, day: usize, minute: u16) -> bool {
        if self.start <= self.end {
            self.days[day] && self.start <= minute && minute < self.end
        } else {
            (self.days[day] && minute >= self.start)
                || (self.days[(day + 6) % 7] && minute < self.end)
        }
    }
}

// ---- the file format ------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: Spanned<i64>,
    algorithm: Option<Spanned<String>>,
    default: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    #[serde(default)]
    sets: BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Spanned<String>,
    #[allow(dead_code)]
    description: Option<String>,
    effect: Spanned<String>,
    #[serde(rename = "match")]
    target: Option<RawTarget>,
    except: Option<RawTarget>,
    message: Option<Spanned<String>>,
    unenrolled: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    user: Option<Vec<Spanned<String>>>,
    group: Option<Vec<Spanned<String>>>,
    service: Option<Vec<Spanned<String>>>,
    host: Option<Vec<Spanned<String>>>,
    rhost: Option<Vec<Spanned<String>>>,
    tty: Option<Vec<Spanned<String>>>,
    time: Option<Vec<Spanned<String>>>,
    enrolled: Option<Spanned<bool>>,
    command: Option<Vec<Spanned<String>>>,
}

/// Turns byte offsets into the file:line:column of errors.
struct Text<'a> {
    file: &'a str,
    text: &'a str,
}

impl Text<'_> {
    fn error(&self, offset: usize, message: impl Into<String>) -> PolicyError {
        let before = &self.text[..offset.min(self.text.len())];
        PolicyError {
            file: self.file.to_owned(),
            line: before.matches('\n').count() + 1,
            column: before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1,
            message: message.into(),
        }
    }

    fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }
}

impl Policy {
    /// Reads and compiles the rules file at `path`.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            file: name.clone(),
            line: 1,
            column: 1,
            message: format!("cannot read the rules file: {e}"),
        })?;
        Policy::parse(&name, &text)
    }

    /// Parses and validates `text`, naming it `file` in errors and explanations.
    pub fn parse(file: &str, text: &str) -> Result<Policy, PolicyError> {
        let src = Text { file, text };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            src.error(
                e.span().map_or(0, |s| s.start),
                e.message().trim_end().to_owned(),
            )
        })?;
        if *raw.version.get_ref() != 1 {
            return Err(src.error(raw.version.span().start, "version must be 1"));
        }
        let algorithm =
            match &raw.algorithm {
                None => Algorithm::FirstApplicable,
                Some(a) => match a.get_ref().as_str() {
                    "first-applicable" => Algorithm::FirstApplicable,
                    "deny-overrides" => Algorithm::DenyOverrides,
                    "permit-overrides" => Algorithm::PermitOverrides,
                    _ => return Err(src.error(
                        a.span().start,
                        "algorithm must be first-applicable, deny-overrides or permit-overrides",
                    )),
                },
            };
        let default = match &raw.default {
            None => Effect::Deny,
            Some(d) => Effect::parse(d.get_ref())
                .ok_or_else(|| src.error(d.span().start, "default must be permit, otp or deny"))?,
        };
        let (timezone, timezone_name) = match &raw.timezone {
            None => (jiff::tz::TimeZone::UTC, "UTC".to_owned()),
            Some(tz) => (
                jiff::tz::TimeZone::get(tz.get_ref()).map_err(|_| {
                    src.error(
                        tz.span().start,
                        format!("unknown time zone {:?}; use an IANA name", tz.get_ref()),
                    )
                })?,
                tz.get_ref().clone(),
            ),
        };
        let sets: BTreeMap<&str, &Vec<Spanned<String>>> = raw
            .sets
            .iter()
            .map(|(k, v)| (k.as_str(), v.get_ref()))
            .collect();

        let mut ids = HashSet::new();
        let mut rules = Vec::with_capacity(raw.rules.len());
        for r in &raw.rules {
            let id = r.id.get_ref();
            let valid_id = !id.is_empty()
                && id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid_id {
                return Err(src.error(r.id.span().start, "rule ids are kebab-case: a-z, 0-9, -"));
            }
            if !ids.insert(id.clone()) {
                return Err(src.error(r.id.span().start, format!("duplicate rule id {id:?}")));
            }
            let effect = Effect::parse(r.effect.get_ref()).ok_or_else(|| {
                src.error(r.effect.span().start, "effect must be permit, otp or deny")
            })?;
            let unenrolled = match &r.unenrolled {
                None => Unenrolled::Deny,
                Some(u) if effect != Effect::Otp => {
                    return Err(src.error(u.span().start, "unenrolled applies only to otp rules"))
                }
                Some(u) => match u.get_ref().as_str() {
                    "deny" => Unenrolled::Deny,
                    "permit" => Unenrolled::Permit,
                    _ => return Err(src.error(u.span().start, "unenrolled must be deny or permit")),
                },
            };
            if let Some(m) = &r.message {
                if effect != Effect::Deny {
                    return Err(src.error(m.span().start, "message applies only to deny rules"));
                }
            }
            rules.push(Rule {
                id: id.clone(),
                line: src.line(r.id.span().start),
                effect,
                unenrolled,
                message: r.message.as_ref().map(|m| m.get_ref().clone()),
                target: compile_target(&src, &sets, r.target.as_ref())?,
                except: compile_target(&src, &sets, r.except.as_ref())?,
            });
        }
        let mut warnings = Vec::new();
        if algorithm == Algorithm::FirstApplicable {
            if let Some(pos) = rules
                .iter()
                .position(|r| r.target.is_empty() && r.except.is_empty())
            {
                for later in &rules[pos + 1..] {
                    warnings.push(format!(
                        "{file}:{}: rule {} can never apply: rule {} before it matches every request",
                        later.line, later.id, rules[pos].id
                    ));
                }
            }
        }
        let digest = Sha256::digest(text.as_bytes());
        Ok(Policy {
            file: file.to_owned(),
            digest: format!("sha256:{}", data_encoding::HEXLOWER.encode(&digest)),
            algorithm,
            default,
            timezone,
            timezone_name,
            rules,
            warnings,
        })
    }

    /// `sha256:…` of the file, for audit lines: which rules decided.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn file(&self) -> &str {
        &self.file
    }

    /// Load-time warnings (rules that can never apply).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

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
        Decision {
            verdict,
            rules: deciding.iter().map(|&i| self.rules[i].id.clone()).collect(),
            indeterminate,
            trace,
        }
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
struct Ctx<'a> {
    request: &'a Request,
    facts: &'a dyn Facts,
    /// Local weekday (Monday = 0) and minute of the day, in the policy's time zone.
    clock: Option<(usize, u16)>,
    explain: bool,
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
                Err(LookupError(cause)) => Err(format!("enrolled: {cause}")),
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
            Err(LookupError(cause)) => unknown = Some(format!("{}: {cause}", c.key())),
        }
    }
    match unknown {
        Some(cause) => Holds::Unknown(cause),
        None if reasons.is_empty() && ctx.explain => Holds::Yes("matches every request".into()),
        None => Holds::Yes(reasons.join(", ")),
    }
}

impl Condition {
    fn key(&self) -> &'static str {
        match self {
            Condition::User(_) => "user",
            Condition::Group(_) => "group",
            Condition::Service(_) => "service",
            Condition::Host(_) => "host",
            Condition::Rhost(_) => "rhost",
            Condition::Tty(_) => "tty",
            Condition::Command(_) => "command",
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

    /// Words for an explanation.
    fn describe(&self, ctx: &Ctx<'_>, held: bool) -> String {
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

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn compile_target(
    src: &Text<'_>,
    sets: &BTreeMap<&str, &Vec<Spanned<String>>>,
    raw: Option<&RawTarget>,
) -> Result<Vec<Condition>, PolicyError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    // Expands `@set` references; each value keeps the offset of where it was written.
    let expand = |values: &Vec<Spanned<String>>| -> Result<Vec<(String, usize)>, PolicyError> {
        let mut out = Vec::new();
        for v in values {
            match v.get_ref().strip_prefix('@') {
                Some(name) => {
                    let set = sets.get(name).ok_or_else(|| {
                        src.error(v.span().start, format!("undefined set @{name}"))
                    })?;
                    for item in set.iter() {
                        if item.get_ref().starts_with('@') {
                            return Err(src.error(item.span().start, "sets cannot contain sets"));
                        }
                        out.push((item.get_ref().clone(), item.span().start));
                    }
                }
                None => out.push((v.get_ref().clone(), v.span().start)),
            }
        }
        Ok(out)
    };
    let names = |values: &Vec<Spanned<String>>| -> Result<Vec<Name>, PolicyError> {
        Ok(expand(values)?.iter().map(|(v, _)| Name::new(v)).collect())
    };
    let mut out = Vec::new();
    if let Some(v) = &raw.user {
        out.push(Condition::User(names(v)?));
    }
    if let Some(v) = &raw.group {
        out.push(Condition::Group(names(v)?));
    }
    if let Some(v) = &raw.service {
        out.push(Condition::Service(names(v)?));
    }
    if let Some(v) = &raw.host {
        out.push(Condition::Host(names(v)?));
    }
    if let Some(v) = &raw.rhost {
        let mut sources = Vec::new();
        for (value, at) in expand(v)? {
            sources.push(if value == "local" {
                Source::Local
            } else if value.contains('/') {
                Source::Net(value.parse::<IpNet>().map_err(|_| {
                    src.error(
                        at,
                        format!("{value:?} is not a CIDR network such as 10.0.0.0/8"),
                    )
                })?)
            } else if let Ok(ip) = value.parse::<IpAddr>() {
                Source::Net(IpNet::from(ip))
            } else {
                Source::Name(Name::new(&value))
            });
        }
        out.push(Condition::Rhost(sources));
    }
    if let Some(v) = &raw.tty {
        out.push(Condition::Tty(names(v)?));
    }
    if let Some(v) = &raw.command {
        out.push(Condition::Command(names(v)?));
    }
    if let Some(v) = &raw.time {
        let mut windows = Vec::new();
        for (value, at) in expand(v)? {
            windows.push(parse_window(&value).map_err(|m| src.error(at, m))?);
        }
        out.push(Condition::Time(windows));
    }
    if let Some(v) = &raw.enrolled {
        out.push(Condition::Enrolled(*v.get_ref()));
    }
    Ok(out)
}

/// Parses `"mon-fri 08:00-19:00"`, `"sat,sun 10:00-12:00"`, `"fri 22:00-02:00"` (past midnight)
/// or `"08:00-19:00"` (every day).
fn parse_window(s: &str) -> Result<Window, String> {
    let bad = || format!("{s:?} is not a time window such as \"mon-fri 08:00-19:00\"");
    let (days_part, hours) = match s.trim().rsplit_once(' ') {
        Some((d, h)) => (Some(d.trim()), h),
        None => (None, s.trim()),
    };
    let mut days = [days_part.is_none(); 7];
    if let Some(spec) = days_part {
        for part in spec.split(',') {
            let day = |d: &str| {
                DAYS.iter()
                    .position(|x| *x == d.trim().to_ascii_lowercase())
            };
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (day(a).ok_or_else(bad)?, day(b).ok_or_else(bad)?);
                    let mut d = a;
                    loop {
                        days[d] = true;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
                None => days[day(part).ok_or_else(bad)?] = true,
            }
        }
    }
    let (start, end) = hours.split_once('-').ok_or_else(bad)?;
    let minutes = |t: &str| -> Option<u16> {
        let (h, m) = t.split_once(':')?;
        let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
        (h <= 24 && m < 60 && h * 60 + m <= 1440).then_some(h * 60 + m)
    };
    let (start, end) = (
        minutes(start).ok_or_else(bad)?,
        minutes(end).ok_or_else(bad)?,
    );
    if start == end {
        return Err(format!("{s:?} is an empty time window"));
    }
    Ok(Window { days, start, end })
}

#[cfg(test)]
mod tests;
