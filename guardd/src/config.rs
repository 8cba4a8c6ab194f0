use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where guardd looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/soffid-otp/guardd.toml";

/// The daemon's settings. Every key is optional in the file; missing keys take the defaults.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The Unix socket guardd serves on.
    pub socket: PathBuf,
    /// The SQLite database holding the tokens.
    pub database: PathBuf,
    /// Members of this group may administer every user's tokens.
    pub admin_group: String,
    /// The issuer shown in authenticator apps; defaults to this host's name.
    pub issuer: Option<String>,
    /// Time steps accepted before and after the current one, for clock drift.
    pub skew: u8,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: PathBuf::from(proto::DEFAULT_SOCKET),
            database: PathBuf::from("/var/lib/soffid-otp/guardd.db"),
            admin_group: "soffid-otp-admin".into(),
            issuer: None,
            skew: 1,
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
    #[error("{path}: skew must be between 0 and 10 steps, not {skew}")]
    Skew { path: PathBuf, skew: u8 },
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
        if config.skew > 10 {
            return Err(ConfigError::Skew {
                path: path.into(),
                skew: config.skew,
            });
        }
        Ok(config)
    }

    /// Parses the TOML text; the error names the line and column of the fault.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            format!("line {line}, column {col}: {}", e.message())
        })
    }

    /// The issuer for otpauth:// URIs.
    pub fn issuer(&self) -> String {
        self.issuer.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "soffid-otp".into())
        })
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
