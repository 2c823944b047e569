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
    /// Lists, shows and redrives the dead letters on dlq.v1.
    Dlq {
        #[command(subcommand)]
        action: DlqCmd,
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

/// Where the dead-letter tools find the bus.
#[derive(clap::Args)]
struct DlqTarget {
    /// Configuration file; without it, the built-in defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory, overriding data_dir (the embedded log).
    #[arg(long)]
    data_dir: Option<String>,
}

/// Which dead letters.
#[derive(clap::Args)]
struct DlqFilter {
    /// Only those from this topic (`inbound.v1`, or the full name).
    #[arg(long)]
    topic: Option<String>,
    /// Only those the consumer group gave up on.
    #[arg(long)]
    group: Option<String>,
    /// Only those whose reason contains this (case-insensitive).
    #[arg(long)]
    reason: Option<String>,
    /// Only this dead letter (PARTITION:OFFSET); repeatable.
    #[arg(long = "id")]
    ids: Vec<String>,
}

impl DlqFilter {
    fn checked(self) -> Result<switchboard::dlq::Filter, String> {
        Ok(switchboard::dlq::Filter {
            topic: self.topic,
            group: self.group,
            reason: self.reason,
            ids: self
                .ids
                .iter()
                .map(|s| s.parse())
                .collect::<Result<_, _>>()?,
        })
    }
}

#[derive(Subcommand)]
enum DlqCmd {
    /// Lists dead letters: id (PARTITION:OFFSET), time, origin, group, reason.
    List {
        #[command(flatten)]
        target: DlqTarget,
        #[command(flatten)]
        filter: DlqFilter,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Shows one dead letter with its original record.
    Show {
        /// Its id, PARTITION:OFFSET.
        id: String,
        #[command(flatten)]
        target: DlqTarget,
    },
    /// Republishes the originals of the selected dead letters to their
    /// topics, once their cause is fixed. Needs a filter, or --all.
    Redrive {
        #[command(flatten)]
        target: DlqTarget,
        #[command(flatten)]
        filter: DlqFilter,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        /// Lists what would be redriven, sends nothing.
        #[arg(long)]
        dry_run: bool,
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
            let _log = daemon::init_tracing(&cfg);
            block_on(daemon::replay(&cfg), |summary| println!("{summary}"))
        }
        Cmd::Dlq { action } => dlq(action),
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
            let overrides = Overrides { listen, data_dir };
            let load = move || -> Result<(config::RawConfig, config::Config), String> {
                let raw = config::load(config.as_deref(), &process_env(), &overrides)
                    .map_err(|e| e.to_string())?;
                let cfg = raw.clone().validate().map_err(|e| e.to_string())?;
                Ok((raw, cfg))
            };
            let (raw, cfg) = match load() {
                Ok(both) => both,
                Err(problems) => {
                    eprintln!("{problems}");
                    return ExitCode::from(78);
                }
            };
            let log = daemon::init_tracing(&cfg);
            let reloader = switchboard::reload::Reloader {
                load: Box::new(load),
                started_with: raw,
                log: Some(log),
            };
            let run = async {
                let res = daemon::run(cfg, Some(reloader)).await;
                if let Err(e) = &res {
                    tracing::error!(error = format!("{e:#}"), "switchboard stopped");
                }
                res
            };
            block_on(run, |()| {})
        }
    }
}

fn dlq(action: DlqCmd) -> ExitCode {
    use switchboard::dlq::{self, DlqId};
    use switchboard_core::Topics;

    let target = match &action {
        DlqCmd::List { target, .. }
        | DlqCmd::Show { target, .. }
        | DlqCmd::Redrive { target, .. } => target,
    };
    let overrides = Overrides {
        listen: None,
        data_dir: target.data_dir.clone(),
    };
    let cfg = match checked_config(target.config.clone(), overrides) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    let topics = Topics::with_prefix(&cfg.topic_prefix);
    match action {
        DlqCmd::List { filter, limit, .. } => {
            let filter = match filter.checked() {
                Ok(f) => f,
                Err(e) => return usage(&e),
            };
            block_on(
                async {
                    let (source, _handle) = dlq::open(&cfg, false).await?;
                    dlq::scan(&source, &topics, &cfg.topic_prefix, &filter, limit).await
                },
                |entries| {
                    for e in &entries {
                        println!("{}", dlq::line(e));
                    }
                    eprintln!("{} dead letter(s)", entries.len());
                },
            )
        }
        DlqCmd::Show { id, .. } => {
            let id: DlqId = match id.parse() {
                Ok(id) => id,
                Err(e) => return usage(&e),
            };
            block_on(
                async {
                    let (source, _handle) = dlq::open(&cfg, false).await?;
                    dlq::show(&source, &topics, id).await
                },
                |entry| print!("{}", dlq::detail(&entry)),
            )
        }
        DlqCmd::Redrive {
            filter,
            all,
            dry_run,
            ..
        } => {
            let filter = match filter.checked() {
                Ok(f) => f,
                Err(e) => return usage(&e),
            };
            if filter.is_empty() && !all {
                return usage("redrive needs a filter (--topic, --group, --reason, --id) or --all");
            }
            block_on(
                async {
                    let (source, handle) = dlq::open(&cfg, !dry_run).await?;
                    let entries =
                        dlq::scan(&source, &topics, &cfg.topic_prefix, &filter, usize::MAX).await?;
                    let sent = match (&source, dry_run) {
                        (dlq::Source::Bus(bus), false) => dlq::redrive(&**bus, &entries).await?,
                        _ => 0,
                    };
                    if let Some(h) = handle {
                        h.close().await;
                    }
                    Ok((entries, sent))
                },
                |(entries, sent)| {
                    for e in &entries {
                        println!("{}", dlq::line(e));
                    }
                    if dry_run {
                        eprintln!("{} dead letter(s) would be redriven", entries.len());
                    } else {
                        eprintln!("redrove {sent} dead letter(s) to their topics");
                    }
                },
            )
        }
    }
}

/// A usage error: the message, exit code 64 (EX_USAGE).
fn usage(msg: &str) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(64)
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
