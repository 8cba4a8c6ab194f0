use std::io::{IsTerminal, Write};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

/// Sends logs to journald when it is there (each field a journald field); else to stderr, as
/// one JSON object per line (files, pipes, containers, tests: docs/operating.md#audit-events),
/// or as text for a person when stderr is a terminal. `RUST_LOG` tunes the level; the default
/// is info.
pub fn init(identifier: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let journald = std::env::var_os("JOURNAL_STREAM")
        .is_some()
        .then(|| tracing_journald::layer().ok())
        .flatten()
        .map(|l| l.with_syslog_identifier(identifier.to_owned()));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match journald {
        Some(layer) => registry.with(layer).try_init(),
        None if std::io::stderr().is_terminal() => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        None => registry.with(JsonLines).try_init(),
    };
    // Already initialised (tests): keep the existing subscriber.
    let _ = result;
}

/// Writes every event to stderr as one JSON object on one line: `timestamp` (RFC 3339, UTC),
/// `level`, `target` (`audit` for the audit trail), `message` when there is one, then the
/// event's own fields by name, numbers as numbers. One `write` per line, so lines from several
/// threads never interleave.
struct JsonLines;

impl<S: tracing::Subscriber> Layer<S> for JsonLines {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let line = json_line(
            &jiff::Timestamp::now().to_string(),
            event.metadata().level().as_str(),
            event.metadata().target(),
            fields.0,
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// One log line: the event's fields and, over any field of the same name, the fixed ones.
fn json_line(timestamp: &str, level: &str, target: &str, mut fields: Map<String, Value>) -> String {
    fields.insert("timestamp".into(), timestamp.into());
    fields.insert("level".into(), level.into());
    fields.insert("target".into(), target.into());
    let mut line = Value::Object(fields).to_string();
    line.push('\n');
    line
}

/// Collects an event's fields as JSON values.
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_one_json_object_with_the_fixed_fields_last_word() {
        let mut fields = Map::new();
        fields.insert("action".into(), "begin".into());
        fields.insert("caller_uid".into(), 0.into());
        fields.insert("level".into(), "forged".into());
        fields.insert("message".into(), "a \"quoted\"\nline".into());
        let line = json_line("2026-01-01T00:00:00Z", "INFO", "audit", fields);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "audit");
        assert_eq!(v["caller_uid"], 0);
        assert_eq!(v["message"], "a \"quoted\"\nline");
    }
}
