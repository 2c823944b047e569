//! `switchboard`: the daemon and its command-line tools (see the library
//! crate for the contract).

use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use switchboard::config::{self, ConfigError, Overrides};
use switchboard::{daemon, schemas};

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "omnichannel message-routing daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the daemon.
    Run {
        /// Configuration file; without it, the built-in defaults
        /// (config/switchboard.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address, overriding http.listen.
        #[arg(long)]
        listen: Option<String>,
        /// Data directory, overriding data_dir.
        #[arg(long)]
        data_dir: Option<String>,
    },
    /// Checks a configuration file (and the environment), printing every
    /// problem; exits non-zero if there is one.
    CheckConfig {
        /// The file; without it, the built-in defaults.
        path: Option<PathBuf>,
    },
    /// Rebuilds the history from the retained topics into an empty store
    /// (stop the daemon first).
    Replay {
        /// Configuration file; without it, the built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory, overriding data_dir.
        #[arg(long)]
        data_dir: Option<String>,
    },
    /// Manages the Kafka topics.
    Topics {
        #[command(subcommand)]
        action: TopicsCmd,
    },
    /// Writes the JSON Schemas and examples of every record to a directory.
    Schemas {
        /// Output directory.
        #[arg(long, default_value = "docs/schemas")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum TopicsCmd {
    /// Creates every topic that does not exist yet, with bus.partitions
    /// partitions and bus.kafka.replication replicas.
    Create {
        /// Configuration file; without it, the built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn process_env() -> HashMap<String, String> {
    std::env::vars().collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::CheckConfig { path } => match checked_config(path, Overrides::default()) {
            Ok(cfg) => {
                println!(
                    "configuration ok: listen {}, data_dir {}, {} api token(s)",
                    cfg.listen,
                    cfg.data_dir.display(),
                    cfg.tokens.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Cmd::Topics {
            action: TopicsCmd::Create { config },
        } => {
            let cfg = match checked_config(config, Overrides::default()) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            block_on(daemon::create_topics(&cfg), |lines| {
                for line in lines {
                    println!("{line}");
                }
            })
        }
        Cmd::Replay { config, data_dir } => {
            let overrides = Overrides {
                listen: None,
                data_dir,
            };
            let cfg = match checked_config(config, overrides) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            daemon::init_tracing(&cfg);
            block_on(daemon::replay(&cfg), |summary| println!("{summary}"))
        }
        Cmd::Schemas { out } => match schemas::write(&out) {
            Ok(n) => {
                println!("wrote {n} files to {}", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Run {
            config,
            listen,
            data_dir,
        } => {
            let cfg = match checked_config(config, Overrides { listen, data_dir }) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            daemon::init_tracing(&cfg);
            let run = async {
                let res = daemon::run(cfg).await;
                if let Err(e) = &res {
                    tracing::error!(error = format!("{e:#}"), "switchboard stopped");
                }
                res
            };
            block_on(run, |()| {})
        }
    }
}

/// Loads and checks the configuration; on a problem, prints every one and
/// gives the exit code (EX_CONFIG).
fn checked_config(file: Option<PathBuf>, overrides: Overrides) -> Result<config::Config, ExitCode> {
    config::load(file.as_deref(), &process_env(), &overrides)
        .and_then(|raw| raw.validate())
        .map_err(|e: ConfigError| {
            eprintln!("{e}");
            ExitCode::from(78)
        })
}

/// Runs `work` on a multi-threaded runtime; success goes to `report`, an
/// error to stderr with exit code 1.
fn block_on<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
    report: impl FnOnce(T),
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(v) => {
            report(v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
