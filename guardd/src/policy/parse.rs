//! The rules file: its schema, and its compilation into a [`Policy`] with every fault reported
//! at its line and column.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use super::window::parse_window;
use super::{
    Algorithm, Condition, Effect, Name, Policy, PolicyError, Reuse, Rule, Scope, Source, Unenrolled,
};

/// The shortest and longest `reuse` window: seconds are for tests; a grant that outlives a
/// working day outlives the reason for asking.
pub const MIN_REUSE: u64 = 1;
pub const MAX_REUSE: u64 = 24 * 3600;

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
    reuse: Option<Spanned<String>>,
    reuse_scope: Option<Spanned<Vec<Spanned<String>>>>,
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
    ssh_key: Option<Vec<Spanned<String>>>,
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

impl Effect {
    fn parse(s: &str) -> Option<Effect> {
        match s {
            "permit" => Some(Effect::Permit),
            "otp" => Some(Effect::Otp),
            "deny" => Some(Effect::Deny),
            _ => None,
        }
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

        let digests = rule_digests(text);
        let mut ids = HashSet::new();
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, r) in raw.rules.iter().enumerate() {
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
            let reuse = compile_reuse(&src, r, effect)?.map(|(window, scope)| Reuse {
                rule: id.clone(),
                digest: digests.get(i).cloned().unwrap_or_default(),
                window,
                scope,
            });
            rules.push(Rule {
                id: id.clone(),
                line: src.line(r.id.span().start),
                effect,
                unenrolled,
                message: r.message.as_ref().map(|m| m.get_ref().clone()),
                reuse,
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
        for r in &rules {
            let Some(reuse) = &r.reuse else { continue };
            let origin = [Scope::Rhost, Scope::SshKey, Scope::Session];
            if !reuse.scope.iter().any(|s| origin.contains(s)) {
                warnings.push(format!(
                    "{file}:{}: rule {}: reuse_scope names none of rhost, ssh_key, session: host and \
                     service are the same for every login the rule sees here, and sshd's tty is \
                     \"ssh\" for all of them, so any login of the user under this rule (from \
                     anywhere, with any key) reuses the grant",
                    r.line, r.id
                ));
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
}

/// A rule's `reuse` and `reuse_scope`: the window in seconds and the attributes.
fn compile_reuse(
    src: &Text<'_>,
    r: &RawRule,
    effect: Effect,
) -> Result<Option<(u64, Vec<Scope>)>, PolicyError> {
    let (reuse, scope) =
        match (&r.reuse, &r.reuse_scope) {
            (None, None) => return Ok(None),
            (None, Some(scope)) => {
                return Err(src.error(scope.span().start, "reuse_scope needs reuse (a duration)"))
            }
            (Some(reuse), None) => return Err(src.error(
                reuse.span().start,
                "reuse needs reuse_scope: the attributes a later login must share with the one \
                 that proved the OTP (host, service, rhost, tty, ssh_key, session)",
            )),
            (Some(reuse), Some(scope)) => (reuse, scope),
        };
    if effect != Effect::Otp {
        return Err(src.error(reuse.span().start, "reuse applies only to otp rules"));
    }
    let window = reuse
        .get_ref()
        .parse::<jiff::SignedDuration>()
        .ok()
        .and_then(|d| u64::try_from(d.as_secs()).ok().filter(|_| d.subsec_nanos() == 0))
        .filter(|s| (MIN_REUSE..=MAX_REUSE).contains(s))
        .ok_or_else(|| {
            src.error(
                reuse.span().start,
                format!(
                    "reuse must be a whole number of seconds from {MIN_REUSE}s to {}h, such as \"15m\"",
                    MAX_REUSE / 3600
                ),
            )
        })?;
    if scope.get_ref().is_empty() {
        return Err(src.error(
            scope.span().start,
            "reuse_scope must name at least one attribute: a grant bound to the user alone \
             would let any of their logins in",
        ));
    }
    let mut scopes = Vec::new();
    for s in scope.get_ref() {
        let found = Scope::ALL.into_iter().find(|a| a.as_str() == s.get_ref());
        match found {
            Some(a) if !scopes.contains(&a) => scopes.push(a),
            Some(_) => {
                return Err(src.error(s.span().start, format!("{:?} is listed twice", s.get_ref())))
            }
            None => {
                return Err(src.error(
                    s.span().start,
                    format!(
                    "unknown reuse_scope {:?}; use host, service, rhost, tty, ssh_key or session",
                    s.get_ref()
                ),
                ))
            }
        }
    }
    scopes.sort();
    Ok(Some((window, scopes)))
}

/// The digest of each `[[rule]]` table with the sets it refers to, by position: a grant made
/// under a rule holds only while that rule (and its sets) read the same.
fn rule_digests(text: &str) -> Vec<String> {
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        return Vec::new();
    };
    let sets = table.get("sets").and_then(toml::Value::as_table);
    let rules = table.get("rule").and_then(toml::Value::as_array);
    rules
        .map(|rules| {
            rules
                .iter()
                .map(|rule| {
                    let mut hash = Sha256::new();
                    hash.update(rule.to_string().as_bytes());
                    let mut used = Vec::new();
                    set_references(rule, &mut used);
                    used.sort();
                    used.dedup();
                    for name in used {
                        if let Some(set) = sets.and_then(|s| s.get(&name)) {
                            hash.update(format!("\n@{name}={set}").as_bytes());
                        }
                    }
                    data_encoding::HEXLOWER.encode(&hash.finalize()[..16])
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The names of the sets (`@name`) that `value` refers to.
fn set_references(value: &toml::Value, out: &mut Vec<String>) {
    match value {
        toml::Value::String(s) => {
            if let Some(name) = s.strip_prefix('@') {
                out.push(name.to_owned());
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| set_references(v, out)),
        toml::Value::Table(t) => t.values().for_each(|v| set_references(v, out)),
        _ => {}
    }
}

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
    if let Some(v) = &raw.ssh_key {
        let mut keys = Vec::new();
        for (value, at) in expand(v)? {
            if value != "*" && !is_fingerprint(&value) {
                return Err(src.error(
                    at,
                    format!(
                        "{value:?} is not a key fingerprint such as SHA256:m03Gu4hX… (ssh-keygen -lf KEY.pub) or *"
                    ),
                ));
            }
            keys.push(Name::new(&value));
        }
        out.push(Condition::SshKey(keys));
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

/// `SHA256:` and 43 characters of unpadded base64, as `ssh-keygen -l` prints.
fn is_fingerprint(s: &str) -> bool {
    s.strip_prefix("SHA256:").is_some_and(|b| {
        b.len() == 43
            && b.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
    })
}
