//! The rules: who needs an OTP, for which service, on which server, from where, when.
//!
//! XACML's useful core without its XML (the reference: docs/rules.md): ordered rules with
//! AND-of-OR targets and `except`, NotApplicable vs Indeterminate, the first-applicable,
//! deny-overrides and permit-overrides algorithms, and the "verify an OTP" obligation.
//! A file is parsed and validated once; a decision is a walk over compiled matchers, and the
//! costly facts (NSS groups, "enrolled?") are looked up lazily, once per request.
//!
//! This file holds the public types and the compiled form of a policy; the work is in:
//! - `parse`: the file format, its compilation and validation (errors with line and column);
//! - `window`: weekly time windows (`"mon-fri 08:00-19:00"`);
//! - `eval`: deciding a request, and the combining algorithms;
//! - `explain`: the words of an explanation.

use ipnet::IpNet;
use wildmatch::WildMatch;

use window::Window;

mod eval;
mod explain;
mod parse;
mod window;

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
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Permit => "permit",
            Effect::Otp => "otp",
            Effect::Deny => "deny",
        }
    }
}

/// How results of several rules combine (docs/rules.md, Combining).
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
    /// For an `otp` verdict whose every deciding rule has a `reuse` obligation: those
    /// obligations. A live grant of each lets the login in without a code. Empty otherwise.
    pub reuse: Vec<Reuse>,
}

/// A rule's `reuse` obligation: an OTP proven under this rule lets later logins of the same
/// user in without a code for `window` seconds, when the attributes in `scope` are equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reuse {
    pub rule: String,
    /// The rule's content digest: a reload that changes the rule (or a set it uses) ends the
    /// grants made under its old form.
    pub digest: String,
    pub window: u64,
    pub scope: Vec<Scope>,
}

/// An attribute a reused login must share with the login that proved the OTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Host,
    Service,
    Rhost,
    Tty,
    SshKey,
    Session,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Scope::Host,
        Scope::Service,
        Scope::Rhost,
        Scope::Tty,
        Scope::SshKey,
        Scope::Session,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Host => "host",
            Scope::Service => "service",
            Scope::Rhost => "rhost",
            Scope::Tty => "tty",
            Scope::SshKey => "ssh_key",
            Scope::Session => "session",
        }
    }
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

/// A look-up that could not be done: a rule that needs it becomes Indeterminate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// NSS (passwd, group) failed.
    #[error("NSS look-up failed: {0}")]
    Nss(nix::Error),
    /// The name cannot be an account name (it holds a NUL byte).
    #[error("not a valid user name")]
    BadName,
    /// The fact was not fetched yet: the caller fetches it when a rule asks, and decides again.
    #[error("{0} not looked up yet")]
    NotYet(&'static str),
}

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
    /// The SHA256 fingerprints of the ssh keys that authenticated (sshd only); empty: none.
    pub ssh_keys: Vec<String>,
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
    reuse: Option<Reuse>,
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
    /// Fingerprints (`SHA256:…`) or `*`: every key that authenticated must be listed.
    SshKey(Vec<Name>),
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

impl Policy {
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
}

#[cfg(test)]
mod tests;
