//! `guardctl`: enrol, confirm, list and delete tokens through guardd's socket.
//!
//! Exit status: 0 on success, 1 when guardd refuses or cannot be reached, 2 on a usage error,
//! 3 when `status` finds guardd degraded (docs/operating.md#exit-status).

mod json;
mod ops;

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use proto::v1::guard_client::GuardClient;
use proto::v1::{
    step, AnswerRequest, BackupCodesRequest, ConfirmRequest, DeleteRequest, EnrollRequest,
    ExplainReply, ExplainRequest, ForgetRequest, ListRequest, LoginContext, RecoverRequest,
    ReloadRequest, ResyncRequest, SetEnabledRequest, StatusRequest, Step, Token, UnlockRequest,
};
use proto::Connection;
use qrcode::render::unicode::Dense1x2;
use qrcode::QrCode;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "guardctl",
    version,
    about = "Manage soffid-otp tokens",
    after_help = "Exit status: 0 success; 1 refused by guardd or guardd unreachable; 2 usage error; \
3 `status` found guardd degraded (its store does not answer, or its rules file no longer loads)."
)]
pub struct Cli {
    /// guardd's socket [default: the `socket` of guardd.toml, else /run/soffid-otp/guardd.sock]
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// guardd.toml to read the socket path from
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Seconds to wait for guardd
    #[arg(long, global = true, default_value_t = 10)]
    timeout: u64,
    /// Print one JSON object instead of text, for scripts (every command that prints data;
    /// the shapes are in /usr/share/doc/soffid-otp/operating.md)
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a pending TOTP token and show its otpauth:// URI and QR code. A user enrolling
    /// their own token proves the account's password (asked), or types an admin's invitation
    Enroll {
        /// Whose token [default: yours]
        user: Option<String>,
        /// Admins: issue USER a single-use invitation to enrol from their own session instead
        /// (for accounts without a password; the admin never sees the user's secret)
        #[arg(long)]
        invite: bool,
        /// Prove yourself with the invitation your administrator gave you (asked) instead of
        /// your password
        #[arg(long, conflicts_with = "invite")]
        invitation: bool,
        /// Also type a code of your active token (where the rules ask for one before another)
        #[arg(long, conflicts_with = "invite")]
        code: bool,
        /// A name for the device, e.g. "work phone"
        #[arg(long, default_value = "")]
        label: String,
        /// A counter-based HOTP token (RFC 4226) instead of TOTP
        #[arg(long)]
        hotp: bool,
        /// HMAC hash: SHA1 (what every app supports), SHA256 or SHA512
        #[arg(long, default_value = "SHA1")]
        algorithm: String,
        /// Code length: 6, 7 or 8
        #[arg(long, default_value_t = 6)]
        digits: u32,
        /// TOTP step in seconds (15 to 120)
        #[arg(long, default_value_t = 30)]
        period: u32,
    },
    /// Activate USER's pending token with the code it shows now (read from stdin when omitted)
    Confirm { user: String, code: Option<String> },
    /// List tokens (all users when USER is omitted: admins only)
    List {
        user: Option<String>,
        /// Only tokens not used for AGE (never used: since enrolled), e.g. 90d, 12h, 2w
        #[arg(long, value_name = "AGE", value_parser = ops::parse_age)]
        stale: Option<i64>,
    },
    /// Delete one of USER's tokens
    Delete { user: String, token_id: String },
    /// Disable one of USER's active tokens (it stops accepting codes)
    Disable { user: String, token_id: String },
    /// Re-enable one of USER's disabled tokens
    Enable { user: String, token_id: String },
    /// Move an HOTP token's counter forward with two consecutive codes
    Resync {
        user: String,
        token_id: String,
        first: String,
        second: String,
    },
    /// Lift USER's back-off after repeated failures
    Unlock { user: String },
    /// End USER's reuse grants at once: their next login that the rules ask a code of asks it
    Forget { user: String },
    /// Issue USER a new set of 10 one-time backup codes (replacing the old set)
    BackupCodes { user: String },
    /// Show how the rules decide a hypothetical login, rule by rule (changes nothing)
    Explain {
        #[arg(long)]
        user: String,
        #[arg(long)]
        service: String,
        /// Source address or name; omitted means a local login
        #[arg(long, default_value = "")]
        rhost: String,
        /// Server name for `host` rules [default: guardd's own]
        #[arg(long, default_value = "")]
        host: String,
        #[arg(long, default_value = "")]
        tty: String,
        /// The public key (a .pub file, or a certificate) the ssh login authenticated with,
        /// for `ssh_key` rules and reuse grants
        #[arg(long)]
        ssh_key: Option<PathBuf>,
        /// When, as RFC 3339 (e.g. 2026-11-27T23:30:00+01:00) [default: now]
        #[arg(long)]
        time: Option<String>,
    },
    /// Re-read the rules file (a broken file is refused; the rules in force stay)
    Reload,
    /// Show guardd's state: version, uptime, store and its health, rules in force, token
    /// counts, locked-out users, users short of backup codes (admins). Exits 3 when degraded
    Status {
        /// List users holding fewer unused backup codes than this
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
        backup_codes_below: u32,
    },
    /// Print a shell completion script (bash, zsh, fish, ...)
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Set a forgotten password after proving an OTP (your own; root: --user NAME)
    Recover {
        /// Whose password (root only) [default: yours]
        #[arg(long)]
        user: Option<String>,
    },
}

/// A failure worth one line on stderr and exit status 1.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("cannot reach guardd: {0}")]
    Connect(#[from] proto::ConnectError),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Local(String),
    /// guardd answered `status` but is degraded: exit status 3.
    #[error("guardd is degraded: {0}")]
    Degraded(String),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Refused(match s.code() {
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                "guardd did not answer in time".into()
            }
            _ => s.message().to_owned(),
        })
    }
}

/// Parses the command line (usage errors exit 2 through clap) and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guardctl: {e}");
            match e {
                CliError::Degraded(_) => ExitCode::from(ops::EXIT_DEGRADED),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    if let Command::Completions { shell } = cli.command {
        use clap::CommandFactory;
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "guardctl",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    let socket = match cli.socket {
        Some(s) => s,
        None => {
            Config::load(cli.config.as_deref())
                .map_err(|e| CliError::Local(e.to_string()))?
                .socket
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Local(format!("cannot start the async runtime: {e}")))?;
    // Read a code from stdin before connecting, so a slow typist does not hold a connection.
    let code = match &cli.command {
        Command::Confirm { code, .. } => Some(match code.as_deref() {
            Some("-") | None => read_secret("Code shown by the app: ")?,
            Some(c) => Zeroizing::new(c.as_bytes().to_vec()),
        }),
        _ => None,
    };
    let proof = match &cli.command {
        Command::Enroll {
            user,
            invite: false,
            invitation,
            code,
            ..
        } if own_enrolment(user.as_deref()) => Some(OwnProof {
            password: if *invitation {
                Zeroizing::default()
            } else {
                read_secret("Your password: ")?
            },
            invitation: if *invitation {
                read_secret("Invitation: ")?
            } else {
                Zeroizing::default()
            },
            code: if *code {
                read_secret("Code of your active token: ")?
            } else {
                Zeroizing::default()
            },
        }),
        _ => None,
    };
    runtime.block_on(async move {
        let mut guardd = Connection::open(&socket, Duration::from_secs(cli.timeout)).await?;
        execute(&mut guardd, cli.command, cli.json, code, proof).await
    })
}

/// A client for the next call. A person may answer a prompt slowly, while guardd closes each
/// connection after `proto::MAX_CONNECTION_AGE`: an old connection is replaced first.
async fn client(guardd: &mut Connection) -> Result<GuardClient<Channel>, CliError> {
    Ok(GuardClient::new(guardd.channel().await?))
}

/// What a user enrolling their own token typed.
struct OwnProof {
    password: Zeroizing<Vec<u8>>,
    invitation: Zeroizing<Vec<u8>>,
    code: Zeroizing<Vec<u8>>,
}

/// Whether `user` (None: oneself) is the caller's own account and the caller is not root.
fn own_enrolment(user: Option<&str>) -> bool {
    let uid = nix::unistd::getuid();
    if uid.is_root() {
        return false;
    }
    match user {
        None => true,
        Some(name) => nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .is_some_and(|me| me.name == name),
    }
}

/// The caller's own login name.
fn own_name() -> Result<String, CliError> {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .ok_or_else(|| CliError::Local("your uid has no user name; name the user".into()))
}

async fn execute(
    guardd: &mut Connection,
    command: Command,
    as_json: bool,
    code: Option<Zeroizing<Vec<u8>>>,
    proof: Option<OwnProof>,
) -> Result<(), CliError> {
    match command {
        Command::Enroll {
            user,
            label,
            hotp,
            algorithm,
            digits,
            period,
            invite,
            ..
        } => {
            let user = match user {
                Some(u) => u,
                None => own_name()?,
            };
            let proof = proof.unwrap_or(OwnProof {
                password: Zeroizing::default(),
                invitation: Zeroizing::default(),
                code: Zeroizing::default(),
            });
            let reply = client(guardd)
                .await?
                .enroll(EnrollRequest {
                    user: user.clone(),
                    label,
                    kind: if hotp { "hotp" } else { "totp" }.into(),
                    algorithm,
                    digits,
                    period,
                    invite,
                    password: proof.password.to_vec(),
                    invitation: proof.invitation.to_vec(),
                    code: proof.code.to_vec(),
                })
                .await?
                .into_inner();
            if invite && as_json {
                return json::print(&json::InviteJson {
                    user: &user,
                    invitation: &reply.invitation,
                    expires: reply.invitation_expires,
                });
            }
            if invite {
                println!(
                    "Invitation {} (single use, valid until {}). Give it to the user in person; \nthey run `guardctl enroll --invitation` from their own session.",
                    reply.invitation,
                    format_time(reply.invitation_expires)
                );
                return Ok(());
            }
            let uri = Zeroizing::new(reply.uri);
            let token = reply.token.unwrap_or_default();
            if as_json {
                return json::print(&json::EnrollJson {
                    token: (&token).into(),
                    uri: &uri,
                });
            }
            println!(
                "Pending token {} for {}. Scan the QR code or add this URI in an authenticator app:",
                token.id, token.user
            );
            println!("{}", uri.as_str());
            if let Ok(qr) = QrCode::new(uri.as_bytes()) {
                println!(
                    "{}",
                    qr.render::<Dense1x2>()
                        .dark_color(Dense1x2::Light)
                        .light_color(Dense1x2::Dark)
                        .build()
                );
            }
            println!(
                "Then activate it with: guardctl confirm {} (and type the code the app shows)",
                token.user
            );
        }
        Command::Confirm { user, .. } => {
            let code = code.unwrap_or_default();
            let token = client(guardd)
                .await?
                .confirm(ConfirmRequest {
                    user,
                    code: code.to_vec(),
                })
                .await?
                .into_inner()
                .token
                .unwrap_or_default();
            if as_json {
                return json::print(&json::OneToken {
                    token: (&token).into(),
                });
            }
            println!("Token {} of {} is active.", token.id, token.user);
        }
        Command::List { user, stale } => {
            let mut tokens = client(guardd)
                .await?
                .list(ListRequest {
                    user: user.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .tokens;
            let stale_before = stale.map(|age| jiff::Timestamp::now().as_second() - age);
            if let Some(cutoff) = stale_before {
                tokens.retain(|t| ops::is_stale(t, cutoff));
            }
            if as_json {
                return json::print(&json::ListJson {
                    tokens: tokens.iter().map(Into::into).collect(),
                    stale_before,
                });
            }
            print_tokens(&tokens);
        }
        Command::Delete { user, token_id } => {
            client(guardd)
                .await?
                .delete(DeleteRequest {
                    user: user.clone(),
                    token_id: token_id.clone(),
                })
                .await?;
            if as_json {
                return json::print(&json::DeleteJson {
                    user: &user,
                    deleted: &token_id,
                });
            }
            println!("Deleted token {token_id} of {user}.");
        }
        Command::Disable { user, token_id } => {
            set_enabled(guardd, user, token_id, false, as_json).await?
        }
        Command::Enable { user, token_id } => {
            set_enabled(guardd, user, token_id, true, as_json).await?
        }
        Command::Resync {
            user,
            token_id,
            first,
            second,
        } => {
            let token = client(guardd)
                .await?
                .resync(ResyncRequest {
                    user,
                    token_id,
                    first: first.into_bytes(),
                    second: second.into_bytes(),
                })
                .await?
                .into_inner()
                .token
                .unwrap_or_default();
            if as_json {
                return json::print(&json::OneToken {
                    token: (&token).into(),
                });
            }
            println!("Token {} of {} is in step again.", token.id, token.user);
        }
        Command::Unlock { user } => {
            let reply = client(guardd)
                .await?
                .unlock(UnlockRequest { user: user.clone() })
                .await?
                .into_inner();
            if as_json {
                return json::print(&json::UnlockJson {
                    user: &user,
                    was_locked: reply.was_locked,
                });
            }
            if reply.was_locked {
                println!("Cleared the failed attempts of {user}.");
            } else {
                println!("{user} had no failed attempts.");
            }
        }
        Command::Forget { user } => {
            let reply = client(guardd)
                .await?
                .forget(ForgetRequest { user: user.clone() })
                .await?
                .into_inner();
            if as_json {
                return json::print(&json::ForgetJson {
                    user: &user,
                    forgotten: reply.forgotten,
                });
            }
            println!("Ended {} reuse grant(s) of {user}.", reply.forgotten);
        }
        Command::Explain {
            user,
            service,
            rhost,
            host,
            tty,
            ssh_key,
            time,
        } => {
            let ssh_auth_info = match ssh_key {
                None => String::new(),
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| CliError::Local(format!("{}: {e}", path.display())))?;
                    // sshd's words for a key that authenticated: "publickey TYPE BASE64".
                    let key: Vec<&str> = text.split_whitespace().take(2).collect();
                    format!("publickey {}\n", key.join(" "))
                }
            };
            let time = match time {
                None => 0,
                Some(t) => t
                    .parse::<jiff::Timestamp>()
                    .map_err(|e| CliError::Local(format!("--time {t:?}: {e}")))?
                    .as_second(),
            };
            let reply = client(guardd)
                .await?
                .explain(ExplainRequest {
                    context: Some(LoginContext {
                        user,
                        service,
                        rhost,
                        host,
                        tty,
                        ssh_auth_info,
                        ..LoginContext::default()
                    }),
                    time,
                })
                .await?
                .into_inner();
            if as_json {
                json::print(&json::ExplainJson::from(&reply))?;
            } else {
                print_explain(&reply);
            }
        }
        // Printed before connecting: completions need no daemon.
        Command::Completions { .. } => {}
        Command::Recover { user } => {
            let first = client(guardd)
                .await?
                .recover(RecoverRequest {
                    user: user.unwrap_or_default(),
                })
                .await?
                .into_inner();
            converse(guardd, first).await?;
        }
        Command::Reload => {
            let reply = client(guardd)
                .await?
                .reload(ReloadRequest {})
                .await?
                .into_inner();
            if as_json {
                return json::print(&json::ReloadJson {
                    digest: &reply.digest,
                    warnings: &reply.warnings,
                });
            }
            for w in &reply.warnings {
                eprintln!("warning: {w}");
            }
            println!("Rules reloaded: {}", reply.digest);
        }
        Command::Status { backup_codes_below } => {
            let reply = client(guardd)
                .await?
                .status(StatusRequest { backup_codes_below })
                .await?
                .into_inner();
            ops::print_status(&reply, as_json)?;
        }
        Command::BackupCodes { user } => {
            let codes = client(guardd)
                .await?
                .issue_backup_codes(BackupCodesRequest { user: user.clone() })
                .await?
                .into_inner()
                .codes;
            let codes: Vec<Zeroizing<String>> = codes.into_iter().map(Zeroizing::new).collect();
            if as_json {
                return json::print(&json::BackupCodesJson {
                    user: &user,
                    codes: codes.iter().map(|c| c.as_str()).collect(),
                });
            }
            println!("Backup codes for {user} (each works once; they replace any earlier set;");
            println!("keep them somewhere safe: they are not shown again):");
            for code in &codes {
                println!("  {}", code.as_str());
            }
        }
    }
    Ok(())
}

/// Relays a guardd conversation on the terminal: each prompt is read without echo (from stdin
/// when it is not a terminal), until guardd permits or denies.
async fn converse(guardd: &mut Connection, mut step: Step) -> Result<(), CliError> {
    loop {
        match step.kind {
            Some(step::Kind::Prompt(p)) => {
                if !p.info.is_empty() {
                    eprintln!("{}", p.info);
                }
                let answer = read_secret(&p.text)?;
                step = client(guardd)
                    .await?
                    .answer(AnswerRequest {
                        challenge: p.challenge,
                        response: answer.to_vec(),
                    })
                    .await?
                    .into_inner();
            }
            Some(step::Kind::Permit(p)) => {
                if !p.message.is_empty() {
                    println!("{}", p.message);
                }
                return Ok(());
            }
            Some(step::Kind::Deny(d)) => return Err(CliError::Refused(d.message)),
            None => return Err(CliError::Refused("guardd sent an empty step".into())),
        }
    }
}

async fn set_enabled(
    guardd: &mut Connection,
    user: String,
    token_id: String,
    enabled: bool,
    as_json: bool,
) -> Result<(), CliError> {
    let token = client(guardd)
        .await?
        .set_enabled(SetEnabledRequest {
            user,
            token_id,
            enabled,
        })
        .await?
        .into_inner()
        .token
        .unwrap_or_default();
    if as_json {
        return json::print(&json::OneToken {
            token: (&token).into(),
        });
    }
    println!("Token {} of {} is {}.", token.id, token.user, token.state);
    Ok(())
}

fn print_explain(reply: &ExplainReply) {
    println!("request : {}", reply.request);
    println!("policy  : {}", reply.policy);
    let width = reply.rules.iter().map(|r| r.id.len()).max().unwrap_or(0);
    for r in &reply.rules {
        println!(
            "  {:>2} {:<width$}  {:<13}  {}{}",
            r.index,
            r.id,
            r.outcome,
            r.why,
            if r.decides { "   <- decides" } else { "" }
        );
    }
    println!("decision: {}", reply.decision);
    if !reply.reuse.is_empty() {
        println!("reuse   : {}", reply.reuse);
    }
}

fn print_tokens(tokens: &[Token]) {
    println!(
        "{:<12} {:<16} {:<5} {:<9} {:<20} {:<20} LABEL",
        "ID", "USER", "KIND", "STATE", "CREATED", "LAST USED"
    );
    for t in tokens {
        println!(
            "{:<12} {:<16} {:<5} {:<9} {:<20} {:<20} {}",
            t.id,
            t.user,
            t.kind,
            t.state,
            format_time(t.created),
            format_time(t.last_used),
            t.label
        );
    }
}

/// Unix seconds as UTC RFC 3339, or `-` for never.
fn format_time(secs: i64) -> String {
    match jiff::Timestamp::from_second(secs) {
        Ok(t) if secs > 0 => t.to_string(),
        _ => "-".into(),
    }
}

/// Reads one secret answer after `prompt` (on stderr): without echo from a terminal, else one
/// line of stdin (scripts, tests). The line break is not part of the answer.
fn read_secret(prompt: &str) -> Result<Zeroizing<Vec<u8>>, CliError> {
    eprint!("{prompt}");
    let answer = if std::io::stdin().is_terminal() {
        Zeroizing::new(
            rpassword::read_password()
                .map_err(|e| CliError::Local(format!("cannot read the answer: {e}")))?,
        )
    } else {
        let mut line = Zeroizing::new(String::new());
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| CliError::Local(format!("cannot read the answer from stdin: {e}")))?;
        eprintln!();
        Zeroizing::new(line.trim_end_matches(['\n', '\r']).to_owned())
    };
    Ok(Zeroizing::new(answer.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::format_time;

    #[test]
    fn formats_utc_times() {
        assert_eq!(format_time(0), "-");
        assert_eq!(format_time(1_111_111_111), "2005-03-18T01:58:31Z");
        assert_eq!(format_time(951_825_600), "2000-02-29T12:00:00Z");
    }
}
