//! The operator's commands of guardctl: `status` and `list --stale` (docs/operating.md).

use proto::v1::{StatusReply, Token};

use super::{format_time, json, CliError};

/// `guardctl status` exits with this when guardd answers but is degraded (its store does not
/// answer, or its rules file no longer loads); 1 stays "refused or unreachable", 2 "usage".
pub const EXIT_DEGRADED: u8 = 3;

/// Prints the status (as JSON with `as_json`) and says whether guardd is degraded.
pub fn print_status(reply: &StatusReply, as_json: bool) -> Result<(), CliError> {
    if as_json {
        json::print(&json::StatusJson::from(reply))?;
    } else {
        print_status_text(reply);
    }
    if reply.problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::Degraded(reply.problems.join("; ")))
    }
}

fn print_status_text(r: &StatusReply) {
    println!(
        "guardd   : {}, up {} (since {})",
        r.version,
        format_duration((r.now - r.started).max(0)),
        format_time(r.started)
    );
    let schema = r
        .counts
        .as_ref()
        .map_or("?".to_owned(), |c| c.schema_version.to_string());
    println!(
        "store    : {} {}, schema {schema}, {}",
        r.store_kind,
        r.store_location,
        if r.store_ok {
            format!("answered in {:.1} ms", r.store_latency_us as f64 / 1000.0)
        } else {
            format!("NOT ANSWERING: {}", r.store_error)
        }
    );
    if !r.store_last_error.is_empty() {
        println!(
            "           last failure {}: {}",
            format_time(r.store_last_error_at),
            r.store_last_error
        );
    }
    println!(
        "rules    : {} {}, loaded {}",
        r.policy_file,
        r.policy_digest,
        format_time(r.policy_loaded)
    );
    if !r.policy_reload_error.is_empty() {
        println!("           last reload FAILED: {}", r.policy_reload_error);
    }
    if let Some(c) = &r.counts {
        println!(
            "tokens   : {} users; {} active, {} pending, {} disabled",
            c.users, c.tokens_active, c.tokens_pending, c.tokens_disabled
        );
        println!("locked   : {}", c.locked_total);
        for l in &c.locked {
            println!(
                "           {} ({} failures) until {}",
                l.user,
                l.failures,
                format_time(l.until)
            );
        }
        println!(
            "backup   : {} users below {} unused codes",
            c.backup_codes_low_total, r.backup_codes_below
        );
        for b in &c.backup_codes_low {
            println!("           {} ({} left)", b.user, b.left);
        }
    }
    if !r.metrics_file.is_empty() {
        println!("metrics  : {}", r.metrics_file);
    }
    if r.problems.is_empty() {
        println!("health   : OK");
    } else {
        for p in &r.problems {
            println!("health   : DEGRADED: {p}");
        }
    }
}

/// Seconds as `3d 4h 5m 6s`, leading zero units left out.
fn format_duration(secs: i64) -> String {
    let parts = [
        (secs / 86_400, "d"),
        (secs / 3600 % 24, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
    ];
    let shown: Vec<String> = parts
        .iter()
        .skip_while(|(n, unit)| *n == 0 && *unit != "s")
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    shown.join(" ")
}

/// An age like `90d`, `12h`, `30m`, `2w` or `3600s` (a bare number is days), in seconds.
pub fn parse_age(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &text[digits.len()..];
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not an age like 90d, 12h, 2w"))?;
    let scale = match unit {
        "" | "d" => 86_400,
        "w" => 7 * 86_400,
        "h" => 3600,
        "m" => 60,
        "s" => 1,
        _ => return Err(format!("{text:?}: the unit must be s, m, h, d or w")),
    };
    n.checked_mul(scale)
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("{text:?} is out of range"))
}

/// Whether `token` was last used (or, never used, created) before `cutoff`.
pub fn is_stale(token: &Token, cutoff: i64) -> bool {
    let last = if token.last_used > 0 {
        token.last_used
    } else {
        token.created
    };
    last < cutoff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_durations() {
        assert_eq!(parse_age("90d"), Ok(90 * 86_400));
        assert_eq!(parse_age("90"), Ok(90 * 86_400));
        assert_eq!(parse_age("2w"), Ok(14 * 86_400));
        assert_eq!(parse_age("12h"), Ok(43_200));
        assert_eq!(parse_age("30m"), Ok(1800));
        assert_eq!(parse_age("5s"), Ok(5));
        assert!(parse_age("0d").is_err());
        assert!(parse_age("d").is_err());
        assert!(parse_age("3y").is_err());
        assert!(parse_age("99999999999999999w").is_err());
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(93_784), "1d 2h 3m 4s");
        assert_eq!(format_duration(3600), "1h 0m 0s");
    }

    #[test]
    fn a_token_never_used_is_as_old_as_its_enrolment() {
        let t = |created, last_used| Token {
            created,
            last_used,
            ..Token::default()
        };
        assert!(is_stale(&t(10, 0), 20));
        assert!(!is_stale(&t(10, 30), 20));
        assert!(is_stale(&t(5, 10), 20));
        assert!(!is_stale(&t(25, 0), 20));
    }
}
