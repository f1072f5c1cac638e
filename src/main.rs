//! `cyrneld`: parses the command line, loads the configuration, sets up
//! logging and the daemon's own signals (SIGTERM/SIGINT stop it gracefully,
//! SIGHUP is logged), and hands over to `app::run`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;

use cyrnel::config::{self, Flags};

/// Supervises OS processes behind the Cyrnel Processes HTTP API.
///
/// Every setting can also come from a `CYRNEL_<KEY>` environment variable
/// or the config file; flags win over the environment, which wins over the
/// file.
#[derive(Parser, Debug)]
#[command(name = "cyrneld", version, about)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address and port to listen on (default 127.0.0.1:9371).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// Directory for the database and staged code (default ./cyrnel-data).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let flags = Flags {
        config: cli.config,
        listen: cli.listen,
        data_dir: cli.data_dir,
    };
    let config = match config::load(&flags, |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cyrneld: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    tracing::debug!(?config, "configuration");

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cyrneld: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cyrneld: cannot install signal handlers: {e}");
                return Err(());
            }
        };
        let shutdown = async move {
            while let Some(sig) = signals.next().await {
                if sig == SIGHUP {
                    tracing::info!(
                        "SIGHUP received; configuration reload is not supported yet, ignoring"
                    );
                    continue;
                }
                tracing::info!(signal = sig, "stop requested");
                return;
            }
        };
        cyrnel::app::run(config, shutdown).await.map_err(|e| {
            tracing::error!(error = %e, "cyrneld failed");
            eprintln!("cyrneld: {e}");
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(()) => ExitCode::FAILURE,
    }
}
