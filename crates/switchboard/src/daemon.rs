//! Wiring: opens the bus and the store, starts the router loops and the
//! HTTP listener, and drains on a signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use prometheus::Registry;
use std::collections::HashMap;
use switchboard_bus::{EmbeddedBus, EmbeddedConfig};
use switchboard_core::{Bus, Topics};

use switchboard_api::{ApiAccount, ApiChannel};
use switchboard_core::Outbound;
use switchboard_router::{DispatchMetrics, Dispatcher, Pipeline, Router, RouterMetrics};
use switchboard_store::{SqliteStore, Store};
use tokio::sync::watch;

use crate::config::{Config, LogFormat};
use crate::http;

/// Sets up logging as configured; `RUST_LOG` wins over `log.level`.
pub fn init_tracing(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cfg.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Runs the daemon until SIGTERM or SIGINT, then drains.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let topics = Topics::with_prefix(&cfg.topic_prefix);
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;

    let mut bus_cfg = EmbeddedConfig::new(cfg.data_dir.join("bus"));
    bus_cfg.partitions = cfg.partitions;
    bus_cfg.max_batch = cfg.bus_max_batch;
    let embedded = Arc::new(
        EmbeddedBus::open(bus_cfg, &topics.all()).context("cannot open the embedded log")?,
    );
    let bus: Arc<dyn Bus> = embedded.clone();

    let path = cfg.sqlite_path.clone();
    let store: Arc<dyn Store> = Arc::new(
        tokio::task::spawn_blocking(move || SqliteStore::open(&path))
            .await?
            .with_context(|| format!("cannot open the history {}", cfg.sqlite_path.display()))?,
    );

    let registry = Registry::new();
    let router_metrics = RouterMetrics::register(&registry)?;
    let http_metrics = http::HttpMetrics::register(&registry)?;
    let router = Router::new(cfg.policy.clone(), topics.events.clone())
        .with_delivery_topic(topics.delivery.clone());
    let pipeline = Arc::new(Pipeline::new(
        Arc::clone(&bus),
        Arc::clone(&store),
        router.clone(),
        topics.clone(),
        router_metrics,
        cfg.router_batch,
    ));
    let mut api_accounts = HashMap::new();
    for (name, acct) in &cfg.api_accounts {
        let url = acct
            .url
            .parse()
            .with_context(|| format!("channels.api.accounts.{name}.url"))?;
        api_accounts.insert(
            name.clone(),
            ApiAccount {
                url,
                secret: acct.secret.clone(),
                timeout: acct.timeout,
            },
        );
    }
    let api = ApiChannel::new(api_accounts, cfg.api_default_account.clone())?;
    let adapters: Vec<Arc<dyn Outbound>> = vec![Arc::new(api)];
    let dispatcher = Arc::new(Dispatcher::new(
        Arc::clone(&bus),
        Arc::clone(&store),
        router,
        topics.clone(),
        adapters,
        cfg.dispatch.clone(),
        DispatchMetrics::register(&registry)?,
        pipeline.outbox(),
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let inbound = tokio::spawn(Arc::clone(&pipeline).run_inbound(stop_rx.clone()));
    let commands = tokio::spawn(Arc::clone(&pipeline).run_commands(stop_rx.clone()));
    let dispatch = tokio::spawn(Arc::clone(&dispatcher).run(stop_rx.clone()));

    let state = Arc::new(http::AppState {
        bus: Arc::clone(&bus),
        store: Arc::clone(&store),
        topics: topics.clone(),
        tokens: cfg.tokens.clone(),
        registry,
        metrics: http_metrics,
        draining: AtomicBool::new(false),
    });
    if cfg.tokens.is_empty() {
        tracing::warn!("no api tokens configured: every /v1 request will be refused with 401");
    }
    let app = http::router(Arc::clone(&state), cfg.max_body_bytes);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        data_dir = %cfg.data_dir.display(),
        partitions = cfg.partitions,
        "switchboard started"
    );

    let drain_state = Arc::clone(&state);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        drain_state.draining.store(true, Ordering::SeqCst);
        tracing::info!("shutdown requested: stopping intake and draining");
    });
    let mut inbound = inbound;
    let mut commands = commands;
    let mut dispatch = dispatch;
    // The server returns once a signal arrived and in-flight requests are
    // answered; a router loop that dies first is fatal.
    tokio::select! {
        res = server => res.context("http server failed")?,
        res = &mut inbound => return Err(loop_failed("inbound router", res)),
        res = &mut commands => return Err(loop_failed("command", res)),
        res = &mut dispatch => return Err(loop_failed("dispatch", res)),
    }

    stop_tx.send_replace(true);
    let drained = tokio::time::timeout(cfg.drain_timeout, async {
        let a = inbound.await;
        let b = commands.await;
        let c = dispatch.await;
        (a, b, c)
    })
    .await;
    match drained {
        Ok((a, b, c)) => {
            for (name, res) in [("inbound router", a), ("command", b), ("dispatch", c)] {
                match res {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, loop_name = name, "loop failed during drain")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, loop_name = name, "loop panicked during drain")
                    }
                }
            }
            tracing::info!("drained");
        }
        Err(_) => tracing::warn!(
            timeout_s = cfg.drain_timeout.as_secs(),
            "drain deadline passed; unfinished work will be redelivered at the next start"
        ),
    }
    embedded.close().await;
    tracing::info!("switchboard stopped");
    Ok(())
}

fn loop_failed(
    name: &str,
    res: Result<Result<(), switchboard_router::PipelineError>, tokio::task::JoinError>,
) -> anyhow::Error {
    match res {
        Ok(Ok(())) => anyhow::anyhow!("{name} loop stopped unexpectedly"),
        Ok(Err(e)) => anyhow::Error::from(e).context(format!("{name} loop failed")),
        Err(e) => anyhow::Error::from(e).context(format!("{name} loop panicked")),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
