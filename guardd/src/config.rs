use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::store::copy::Target;

/// Where guardd looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/soffid-otp/guardd.toml";
/// Where guardd looks for its rules when `policy` is not set.
pub const DEFAULT_RULES: &str = "/etc/soffid-otp/rules.toml";

/// The daemon's settings. Every key is optional in the file; missing keys take the defaults.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The Unix socket guardd serves on.
    pub socket: PathBuf,
    /// Where the tokens are: a SQLite file (the embedded default) or, for a fleet, a
    /// `postgresql://` URL of a shared database (no password in it).
    pub database: Database,
    /// For PostgreSQL: the file holding the role's password (owned by root, mode 0600).
    pub database_password_file: Option<PathBuf>,
    /// For PostgreSQL over the network: the CA that signed the server's certificate. TLS is
    /// then required, and the certificate and host name are verified.
    pub database_ca_file: Option<PathBuf>,
    /// For PostgreSQL: connections this guardd keeps open.
    pub database_connections: u16,
    /// Members of this group may administer every user's tokens.
    pub admin_group: String,
    /// The PAM service (a file in /etc/pam.d) guardd checks a user's password with before
    /// self-enrolment.
    pub password_service: String,
    /// The issuer shown in authenticator apps; defaults to this host's name.
    pub issuer: Option<String>,
    /// The rules file; when unset, /etc/soffid-otp/rules.toml if it exists, else the built-in
    /// default policy.
    pub policy: Option<PathBuf>,
    /// This server's name for `host` rules; defaults to the system host name.
    pub host: Option<String>,
    /// The 0600 file holding the key that seals token secrets; created on first start.
    pub key_file: PathBuf,
    /// Time steps accepted before and after the current one, for clock drift.
    pub skew: u8,
    /// HOTP counters tried ahead of the last accepted one.
    pub hotp_look_ahead: u16,
    /// Codes a user may try within one login before it is refused (PAM_MAXTRIES).
    pub max_tries: u32,
    /// Consecutive failures before a user must wait.
    pub max_failures: u32,
    /// The first wait after `max_failures`, in seconds; it doubles with each further failure.
    pub lockout_seconds: u64,
    /// The longest wait, in seconds.
    pub lockout_max_seconds: u64,
    /// The PAM services that are sshd (globs): only from a root caller under one of them are
    /// the ssh keys of SSH_AUTH_INFO_0 and the SSH_CONNECTION believed (`ssh_key` rules and
    /// reuse grants).
    pub ssh_services: Vec<String>,
    /// Where to write the metrics for node_exporter's textfile collector (a `.prom` file in
    /// the collector's directory); unset: no metrics file (docs/operating.md#metrics).
    pub metrics_file: Option<PathBuf>,
    /// How often the metrics file is rewritten, in seconds.
    pub metrics_interval: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: PathBuf::from(proto::DEFAULT_SOCKET),
            database: Database::Sqlite(PathBuf::from("/var/lib/soffid-otp/guardd.db")),
            database_password_file: None,
            database_ca_file: None,
            database_connections: 2,
            admin_group: "soffid-otp-admin".into(),
            password_service: crate::accounts::PASSWORD_SERVICE.into(),
            issuer: None,
            policy: None,
            host: None,
            key_file: PathBuf::from("/etc/soffid-otp/guardd.key"),
            skew: 1,
            hotp_look_ahead: 10,
            max_tries: 3,
            max_failures: 5,
            lockout_seconds: 30,
            lockout_max_seconds: 3600,
            ssh_services: vec!["sshd".into()],
            metrics_file: None,
            metrics_interval: 15,
        }
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Loads `path`, or the embedded defaults when no path was asked for and the default file is
    /// absent (a fresh install runs without any file). A file that was asked for must exist.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p, true),
            None => (Path::new(DEFAULT_CONFIG), false),
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        let config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.into(),
            message,
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.into(),
            message,
        })?;
        Ok(config)
    }

    /// Parses the TOML text; the error names the line and column of the fault.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            format!("line {line}, column {col}: {}", e.message())
        })
    }

    /// Checks the ranges the TOML types cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.skew > 10 {
            return Err(format!("skew must be 0 to 10 steps, not {}", self.skew));
        }
        if !(1..=1000).contains(&self.hotp_look_ahead) {
            return Err("hotp_look_ahead must be 1 to 1000".into());
        }
        if !(1..=10).contains(&self.max_tries) {
            return Err("max_tries must be 1 to 10".into());
        }
        if self.max_failures == 0 || self.lockout_seconds == 0 {
            return Err("max_failures and lockout_seconds must be at least 1".into());
        }
        if self.lockout_max_seconds < self.lockout_seconds {
            return Err("lockout_max_seconds must not be below lockout_seconds".into());
        }
        if !(1..=3600).contains(&self.metrics_interval) {
            return Err("metrics_interval must be 1 to 3600 seconds".into());
        }
        if self
            .metrics_file
            .as_deref()
            .is_some_and(|f| f.file_name().is_none() || !f.is_absolute())
        {
            return Err("metrics_file must be an absolute file path".into());
        }
        if !(1..=64).contains(&self.database_connections) {
            return Err("database_connections must be 1 to 64".into());
        }
        Ok(())
    }

    /// The brute-force back-off these settings describe.
    pub fn backoff(&self) -> crate::lockout::Backoff {
        crate::lockout::Backoff {
            free_failures: self.max_failures,
            first_delay: self.lockout_seconds,
            max_delay: self.lockout_max_seconds,
        }
    }

    /// The PostgreSQL settings, when `database` is a URL.
    pub fn pg_settings(&self) -> Option<crate::store::PgSettings> {
        match self.target(&self.database) {
            Target::Postgres(settings) => Some(settings),
            Target::Sqlite(_) => None,
        }
    }

    /// `database` (this configuration's, or another for a copy), reached with these settings.
    pub fn target(&self, database: &Database) -> Target {
        match database {
            Database::Postgres(url) => Target::Postgres(crate::store::PgSettings {
                url: url.clone(),
                password_file: self.database_password_file.clone(),
                ca_file: self.database_ca_file.clone(),
                host: self.host(),
            }),
            Database::Sqlite(path) => Target::Sqlite(path.clone()),
        }
    }

    /// The issuer for otpauth:// URIs.
    pub fn issuer(&self) -> String {
        self.issuer.clone().unwrap_or_else(|| self.host())
    }

    /// This server's name, as `host` rules see it.
    pub fn host(&self) -> String {
        self.host.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        })
    }

    /// Loads the policy: the configured file (which must exist and be valid), else
    /// /etc/soffid-otp/rules.toml if present, else the built-in default.
    pub fn load_policy(&self) -> Result<crate::policy::Policy, crate::policy::PolicyError> {
        use crate::policy::{Policy, DEFAULT_POLICY};
        match &self.policy {
            Some(path) => Policy::load(path),
            None if Path::new(DEFAULT_RULES).exists() => Policy::load(Path::new(DEFAULT_RULES)),
            None => Policy::parse("(built-in default policy)", DEFAULT_POLICY),
        }
    }
}

/// Where the tokens are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// The embedded store: a SQLite file.
    Sqlite(PathBuf),
    /// A shared PostgreSQL database, by its libpq-style URL.
    Postgres(String),
}

impl Database {
    /// A `postgres://` or `postgresql://` URL, else a file path.
    pub fn parse(text: &str) -> Database {
        if text.starts_with("postgresql://") || text.starts_with("postgres://") {
            Database::Postgres(text.to_owned())
        } else {
            Database::Sqlite(PathBuf::from(text))
        }
    }
}

impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(path) => write!(f, "{}", path.display()),
            Database::Postgres(url) => f.write_str(url),
        }
    }
}

impl From<PathBuf> for Database {
    fn from(path: PathBuf) -> Database {
        Database::Sqlite(path)
    }
}

impl std::str::FromStr for Database {
    type Err = std::convert::Infallible;
    fn from_str(text: &str) -> Result<Database, Self::Err> {
        Ok(Database::parse(text))
    }
}

impl<'de> Deserialize<'de> for Database {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Database, D::Error> {
        Ok(Database::parse(&String::deserialize(d)?))
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn keys_override_defaults() {
        let c = Config::parse("socket = \"/tmp/s\"\nadmin_group = \"wheel\"\n").unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/s"));
        assert_eq!(c.admin_group, "wheel");
        assert_eq!(c.database, Config::default().database);
    }

    #[test]
    fn unknown_key_is_rejected_with_position() {
        let err = Config::parse("socket = \"/tmp/s\"\nsokcet = 1\n").unwrap_err();
        assert!(err.starts_with("line 2, column 1:"), "{err}");
    }

    #[test]
    fn missing_default_file_is_not_an_error_but_missing_named_file_is() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        assert!(matches!(
            Config::load(Some(&missing)),
            Err(ConfigError::Read { .. })
        ));
    }
}
