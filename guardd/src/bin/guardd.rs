//! guardd: the soffid-otp daemon. Runs in the foreground (systemd, or a terminal for tests).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use guardd::config::Config;

#[derive(Parser)]
#[command(
    version,
    about = "soffid-otp daemon: holds OTP tokens and decides logins"
)]
struct Args {
    /// Configuration file [default: /etc/soffid-otp/guardd.toml, if present]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Unix socket to serve on (overrides the file's `socket`)
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Token store: a SQLite file or a postgresql:// URL (overrides the file's `database`)
    #[arg(long, value_name = "FILE|URL")]
    database: Option<guardd::config::Database>,
    /// Key file sealing the token secrets (overrides the file's `key_file`)
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Rules file (overrides the file's `policy`)
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Validate a rules file and exit: 0 when valid, 1 with file:line:column otherwise
    #[arg(long, value_name = "FILE")]
    check_policy: Option<PathBuf>,
    /// Create the key file and the database if missing (never overwriting), then exit
    #[arg(long)]
    init: bool,
    /// Copy the token store (--database, with --key-file) into FILE|URL, verify it, print the
    /// rows per table, and exit. Offline: stop guardd on every host that uses either store
    /// first. The destination is created if missing and must be sealed with the same key file;
    /// copying again changes nothing, rows only there stay, and no token's counter moves back
    #[arg(long, value_name = "FILE|URL", conflicts_with_all = ["init", "check_policy"])]
    copy_to: Option<guardd::config::Database>,
}

fn main() -> ExitCode {
    // A password check guardd runs in a child process of its own (see `accounts`).
    let argv: Vec<String> = std::env::args().collect();
    if argv.len() == 4 && argv[1] == guardd::accounts::PAM_CHECK_FLAG {
        return guardd::accounts::pam_check_main(&argv[2], &argv[3]);
    }
    let args = Args::parse();
    if let Some(path) = &args.check_policy {
        return match guardd::policy::Policy::load(path) {
            Ok(policy) => {
                for w in policy.warnings() {
                    eprintln!("warning: {w}");
                }
                println!("{}: OK {}", path.display(), policy.digest());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    guardd::logging::init("guardd");
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("guardd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // Everything guardd creates is private unless it says otherwise (the socket does).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(socket) = args.socket {
        config.socket = socket;
    }
    if let Some(database) = args.database {
        config.database = database;
    }
    if let Some(key_file) = args.key_file {
        config.key_file = key_file;
    }
    if let Some(policy) = args.policy {
        config.policy = Some(policy);
    }
    if args.init {
        guardd::server::init(&config)?;
        return Ok(());
    }
    if let Some(dest) = &args.copy_to {
        let (from, to) = (config.target(&config.database), config.target(dest));
        let report = guardd::store::copy::copy(&from, &to, &config.key_file)
            .with_context(|| format!("copying {from} into {to}"))?;
        print!("{report}");
        return Ok(());
    }
    let runtime = guardd::server::runtime().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot watch SIGTERM")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down on signal");
        };
        guardd::server::run(config, shutdown).await?;
        Ok(())
    })
}
