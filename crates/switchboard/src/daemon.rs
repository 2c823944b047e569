//! Wiring: opens the bus and the store, starts the router loops and the
//! HTTP listener, and drains on a signal.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use prometheus::Registry;
use switchboard_bus::{EmbeddedBus, EmbeddedConfig};
use switchboard_core::{Bus, Topics};

use crate::config::{BusBackend, StoreBackend};

use switchboard_api::{ApiAccount, ApiChannel};
use switchboard_core::Outbound;
use switchboard_router::{DispatchMetrics, Dispatcher, Pipeline, Router, RouterMetrics};
use switchboard_store::{SqliteStore, Store};
use tokio::sync::watch;

use crate::config::{Config, LogFormat};
use crate::http;

/// Sets up logging as configured; `RUST_LOG` wins over `log.level`.
pub fn init_tracing(cfg: &Config) -> crate::reload::LogHandle {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log_level));
    // The filter can be swapped on SIGHUP (`log.level`).
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt: Box<dyn tracing_subscriber::Layer<_> + Send + Sync> = match cfg.log_format {
        LogFormat::Json => Box::new(fmt.json()),
        LogFormat::Text => Box::new(fmt),
    };
    tracing_subscriber::registry().with(filter).with(fmt).init();
    handle
}

/// The api channel's sending side from the configuration.
pub fn api_channel(cfg: &Config) -> anyhow::Result<ApiChannel> {
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
    Ok(ApiChannel::new(
        api_accounts,
        cfg.api_default_account.clone(),
    )?)
}

/// Runs the daemon until SIGTERM or SIGINT, then drains. With a reloader,
/// SIGHUP reloads what is safe to reload (see [`crate::reload`]).
pub async fn run(cfg: Config, reloader: Option<crate::reload::Reloader>) -> anyhow::Result<()> {
    let topics = Topics::with_prefix(&cfg.topic_prefix);
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;

    let (bus, bus_handle) = open_bus(&cfg, &topics).await?;
    let store = open_store(&cfg).await?;

    let registry = Registry::new();
    let router_metrics = RouterMetrics::register(&registry)?;
    let store_latency = router_metrics.store_latency();
    let http_metrics = http::HttpMetrics::register(&registry)?;
    let router = Router::new(cfg.policy.clone(), topics.events.clone())
        .with_delivery_topic(topics.delivery.clone())
        .with_sla_metrics(switchboard_router::SlaMetrics::register(&registry)?);
    let pipeline = Arc::new(
        Pipeline::new(
            Arc::clone(&bus),
            Arc::clone(&store),
            router.clone(),
            topics.clone(),
            router_metrics,
            cfg.router_batch,
        )
        // Several instances share the work only on Kafka; there, threading is
        // re-keyed by customer so no two instances thread one customer at once.
        .with_rekey(matches!(cfg.bus, BusBackend::Kafka { .. })),
    );
    let api = api_channel(&cfg)?;
    let mut adapters: Vec<Arc<dyn Outbound>> = vec![Arc::new(api)];
    // The SMS channel (Twilio, Vonage), when an account is configured.
    let sms_intake: Arc<dyn switchboard_core::Intake> = Arc::new(crate::intake::BusIntake::new(
        Arc::clone(&bus),
        topics.clone(),
        cfg.publish_timeout,
    ));
    let sms = if cfg.sms.accounts.is_empty() {
        None
    } else {
        let sms = switchboard_sms::SmsChannel::open(cfg.sms.clone(), &registry)?;
        adapters.push(Arc::new(sms.outbound()));
        Some(sms)
    };
    // The social channel (WhatsApp, Messenger, Instagram, Telegram), when an
    // account is configured: webhooks at /webhooks/social, one sending
    // adapter per configured channel, Telegram pollers.
    let social_intake: Arc<dyn switchboard_core::Intake> = Arc::new(crate::intake::BusIntake::new(
        Arc::clone(&bus),
        topics.clone(),
        cfg.publish_timeout,
    ));
    let social = match &cfg.social {
        Some(social_cfg) => {
            let social = switchboard_social::SocialChannel::open(social_cfg.clone(), &registry)?;
            adapters.extend(social.outbounds());
            Some(social)
        }
        None => None,
    };
    // The email channel: SMTP out, and one IMAP poller per mailbox (started
    // with the loops below), checkpointing in the history store.
    if let Some(smtp) =
        switchboard_email::SmtpOutbound::from_config(&cfg.email).context("channels.email")?
    {
        adapters.push(Arc::new(smtp));
    }
    let email_pollers = switchboard_email::imap::pollers(
        &cfg.email,
        Arc::new(crate::intake::BusIntake::new(
            Arc::clone(&bus),
            topics.clone(),
            cfg.publish_timeout,
        )),
        Arc::new(switchboard_email::StoreCheckpoints(Arc::clone(&store))),
    )
    .context("channels.email")?;
    let dispatcher = Arc::new(Dispatcher::new(
        Arc::clone(&bus),
        Arc::clone(&store),
        router.clone(),
        topics.clone(),
        adapters,
        cfg.dispatch.clone(),
        DispatchMetrics::register(&registry)?.with_store_latency(store_latency),
        pipeline.outbox(),
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let inbound = tokio::spawn(Arc::clone(&pipeline).run_inbound(stop_rx.clone()));
    let commands = tokio::spawn(Arc::clone(&pipeline).run_commands(stop_rx.clone()));
    let dispatch = tokio::spawn(Arc::clone(&dispatcher).run(stop_rx.clone()));
    registry.register(Box::new(crate::imap_metrics::ImapCollector::new(
        email_pollers
            .iter()
            .map(|p| (p.account().to_owned(), p.mailbox().to_owned(), p.stats()))
            .collect(),
    )?))?;
    let imap_credentials: Vec<_> = email_pollers
        .iter()
        .map(|p| (p.account_name().to_owned(), p.credentials()))
        .collect();
    let email_tasks: Vec<_> = email_pollers
        .into_iter()
        .map(|p| tokio::spawn(p.run(stop_rx.clone())))
        .collect();
    if let Some(sms) = &sms {
        tokio::spawn(Arc::clone(sms).run_concat_timer(Arc::clone(&sms_intake), stop_rx.clone()));
    }
    if let Some(social) = &social {
        tokio::spawn(
            Arc::clone(social).run_telegram_polling(Arc::clone(&social_intake), stop_rx.clone()),
        );
    }
    let identity = if pipeline.rekeys() {
        tokio::spawn(Arc::clone(&pipeline).run_identity(stop_rx.clone()))
    } else {
        tokio::spawn(async { Ok(()) })
    };

    let state = Arc::new(http::AppState {
        bus: Arc::clone(&bus),
        store: Arc::clone(&store),
        topics: topics.clone(),
        tokens: std::sync::RwLock::new(cfg.tokens.clone()),
        registry,
        metrics: http_metrics,
        draining: AtomicBool::new(false),
        publish_timeout: cfg.publish_timeout,
        lag_groups: consumed(&topics, pipeline.rekeys()),
        first_response_target: cfg.first_response_target,
    });
    if cfg.tokens.is_empty() {
        tracing::warn!("no api tokens configured: every /v1 request will be refused with 401");
    }
    let mut app = http::router(Arc::clone(&state), cfg.max_body_bytes);
    if let Some(social) = &social {
        app = app.nest(
            "/webhooks/social",
            social
                .router(Arc::clone(&social_intake))
                .layer(axum::extract::DefaultBodyLimit::max(cfg.max_body_bytes)),
        );
    }
    if let Some(sms) = &sms {
        app = app.nest(
            "/webhooks/sms",
            sms.router(Arc::clone(&sms_intake))
                .layer(axum::extract::DefaultBodyLimit::max(cfg.max_body_bytes)),
        );
    }
    // Channels' webhooks are nested above this line, so they are observed.
    let app = http::observed(app, Arc::clone(&state));
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
    let unready_delay = cfg.unready_delay;
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        drain_state.draining.store(true, Ordering::SeqCst);
        crate::notify::stopping();
        if !unready_delay.is_zero() {
            tracing::info!(
                delay_ms = unready_delay.as_millis() as u64,
                "shutdown requested: /readyz answers 503 before intake stops"
            );
            tokio::time::sleep(unready_delay).await;
        }
        tracing::info!("shutdown requested: stopping intake and draining");
    });
    let watchdog = crate::notify::spawn_watchdog();
    let hup = reloader.map(|r| {
        tokio::spawn(reload_on_sighup(
            r,
            crate::reload::Running {
                state: Arc::clone(&state),
                router: router.clone(),
                dispatcher: Arc::clone(&dispatcher),
                sms: sms.clone(),
                social: social.clone(),
                imap: imap_credentials,
            },
        ))
    });
    crate::notify::ready();
    let mut inbound = inbound;
    let mut commands = commands;
    let mut dispatch = dispatch;
    let mut identity = identity;
    // The server returns once a signal arrived and in-flight requests are
    // answered; a router loop that dies first is fatal.
    tokio::select! {
        res = server => res.context("http server failed")?,
        res = &mut inbound => return Err(loop_failed("inbound router", res)),
        res = &mut commands => return Err(loop_failed("command", res)),
        res = &mut dispatch => return Err(loop_failed("dispatch", res)),
        res = &mut identity, if pipeline.rekeys() => return Err(loop_failed("identity", res)),
    }

    stop_tx.send_replace(true);
    let drained = tokio::time::timeout(cfg.drain_timeout, async {
        // IMAP pollers first: they stop after the batch in hand, whose
        // envelopes the router may still thread.
        for task in email_tasks {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "imap poller panicked during drain");
            }
        }
        let a = inbound.await;
        let b = commands.await;
        let c = dispatch.await;
        let d = identity.await;
        (a, b, c, d)
    })
    .await;
    match drained {
        Ok((a, b, c, d)) => {
            for (name, res) in [
                ("inbound router", a),
                ("command", b),
                ("dispatch", c),
                ("identity", d),
            ] {
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
    if let Some(w) = watchdog {
        w.abort();
    }
    if let Some(h) = hup {
        h.abort();
    }
    bus_handle.close().await;
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

/// What to close at shutdown, by backend.
pub enum BusHandle {
    /// The embedded log: flush its writer and release the directory.
    Embedded(Arc<EmbeddedBus>),
    /// Kafka: wait for queued records to be acknowledged.
    #[cfg(feature = "kafka")]
    Kafka(switchboard_bus::KafkaBus),
}

impl BusHandle {
    /// Closes the bus cleanly.
    pub async fn close(&self) {
        match self {
            BusHandle::Embedded(e) => e.close().await,
            #[cfg(feature = "kafka")]
            BusHandle::Kafka(k) => k.flush(Duration::from_secs(10)).await,
        }
    }
}

/// Opens the configured bus. On Kafka, checks that every topic exists and
/// names the missing ones.
pub async fn open_bus(cfg: &Config, topics: &Topics) -> anyhow::Result<(Arc<dyn Bus>, BusHandle)> {
    match &cfg.bus {
        BusBackend::Embedded => {
            let mut bus_cfg = EmbeddedConfig::new(cfg.data_dir.join("bus"));
            bus_cfg.partitions = cfg.partitions;
            bus_cfg.max_batch = cfg.bus_max_batch;
            bus_cfg.retention = cfg.bus_retention.map(|max_age| switchboard_bus::Retention {
                max_age,
                unconsumed: vec![topics.events.clone(), topics.delivery.clone()],
                check_every: Duration::from_secs(60),
            });
            let embedded = Arc::new(
                EmbeddedBus::open(bus_cfg, &topics.all())
                    .context("cannot open the embedded log")?,
            );
            Ok((embedded.clone(), BusHandle::Embedded(embedded)))
        }
        #[cfg(feature = "kafka")]
        BusBackend::Kafka { .. } => {
            let kafka = connect_kafka(cfg)?;
            kafka
                .check_topics(&topics.all())
                .await
                .context("kafka is not ready for switchboard")?;
            Ok((Arc::new(kafka.clone()), BusHandle::Kafka(kafka)))
        }
        #[cfg(not(feature = "kafka"))]
        BusBackend::Kafka { .. } => {
            anyhow::bail!("bus.backend = \"kafka\" needs a build with the kafka feature")
        }
    }
}

/// A Kafka client from the configuration.
#[cfg(feature = "kafka")]
pub fn connect_kafka(cfg: &Config) -> anyhow::Result<switchboard_bus::KafkaBus> {
    let BusBackend::Kafka {
        brokers,
        publish_timeout,
        options,
        ..
    } = &cfg.bus
    else {
        anyhow::bail!("bus.backend is not \"kafka\"");
    };
    let mut kc = switchboard_bus::KafkaConfig::new(brokers.clone());
    kc.publish_timeout = *publish_timeout;
    kc.options = options.clone();
    Ok(switchboard_bus::KafkaBus::connect(kc)?)
}

/// Opens the configured store, applying migrations.
pub async fn open_store(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    match cfg.store.clone() {
        StoreBackend::Sqlite(path) => {
            let shown = path.display().to_string();
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                .await?
                .with_context(|| format!("cannot open the history {shown}"))?;
            Ok(Arc::new(store))
        }
        #[cfg(feature = "postgres")]
        StoreBackend::Postgres { url, pool_size } => {
            let store = tokio::task::spawn_blocking(move || {
                switchboard_store::PgStore::open(&url, pool_size)
            })
            .await?
            .context("cannot open the postgresql history")?;
            Ok(Arc::new(store))
        }
        #[cfg(not(feature = "postgres"))]
        StoreBackend::Postgres { .. } => {
            anyhow::bail!("store.backend = \"postgres\" needs a build with the postgres feature")
        }
    }
}

/// `switchboard topics create`: what was done, one line each.
pub async fn create_topics(cfg: &Config) -> anyhow::Result<Vec<String>> {
    let topics = Topics::with_prefix(&cfg.topic_prefix);
    match &cfg.bus {
        BusBackend::Embedded => Ok(vec![
            "bus.backend is \"embedded\": the embedded log creates its topics at start; nothing to do".into(),
        ]),
        #[cfg(feature = "kafka")]
        BusBackend::Kafka { replication, .. } => {
            let kafka = connect_kafka(cfg)?;
            let partitions = i32::try_from(cfg.partitions).unwrap_or(i32::MAX);
            let created = kafka.create_topics(&topics.all(), partitions, *replication).await?;
            let mut lines: Vec<String> = topics
                .all()
                .iter()
                .map(|t| {
                    if created.iter().any(|c| c == t) {
                        format!("created {t} ({partitions} partitions, replication {replication})")
                    } else {
                        format!("exists  {t}")
                    }
                })
                .collect();
            kafka.check_topics(&topics.all()).await?;
            lines.push("every topic is present".into());
            Ok(lines)
        }
        #[cfg(not(feature = "kafka"))]
        BusBackend::Kafka { .. } => {
            anyhow::bail!("bus.backend = \"kafka\" needs a build with the kafka feature")
        }
    }
}

/// `switchboard replay`: rebuilds the history from the retained
/// `inbound.v1` and `commands.v1` records into the configured store, which
/// must be empty. Records are applied in append-time order (commands before
/// messages at equal times are not reordered: the tie goes to the topic
/// order inbound, commands). Threading uses the messages' own times, so the
/// result equals what live routing produced. Outbound messages are not
/// rebuilt (replaying their requests would send them again); events
/// produced while replaying are discarded, not published.
pub async fn replay(cfg: &Config) -> anyhow::Result<String> {
    let topics = Topics::with_prefix(&cfg.topic_prefix);
    let (bus, handle) = open_bus(cfg, &topics).await?;
    let store = open_store(cfg).await?;
    let probe = Arc::clone(&store);
    let empty = tokio::task::spawn_blocking(move || probe.is_empty()).await??;
    anyhow::ensure!(
        empty,
        "replay rebuilds into an empty store; this one holds a history already (point the store at an empty database)"
    );
    let group = format!("switchboard-replay-{}", uuid::Uuid::now_v7());
    let mut records = Vec::new();
    for topic in [&topics.inbound, &topics.commands] {
        let total: u64 = bus.lag(topic, &group).await?.iter().map(|(_, n)| n).sum();
        let mut consumer = bus.subscribe(topic, &group).await?;
        let mut got = 0u64;
        let mut idle = 0;
        while got < total && idle < 60 {
            let batch = consumer.poll(4096, Duration::from_millis(500)).await?;
            if batch.is_empty() {
                idle += 1;
            }
            got += batch.len() as u64;
            records.extend(batch);
        }
        anyhow::ensure!(got >= total, "read {got} of {total} records of {topic}");
    }
    records.sort_by_key(|r| {
        (
            r.timestamp_ms,
            r.topic != topics.inbound,
            r.partition,
            r.offset,
        )
    });
    let router = Router::new(cfg.policy.clone(), topics.events.clone())
        .with_delivery_topic(topics.delivery.clone());
    let inbound_topic = topics.inbound.clone();
    let total = records.len();
    let summary = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let (mut stored, mut applied, mut skipped) = (0usize, 0usize, 0usize);
        for chunk in records.chunks(512) {
            let mut tx = store.begin()?;
            for r in chunk {
                tx.savepoint()?;
                let res = if r.topic == inbound_topic {
                    switchboard_core::decode_envelope(&r.payload)
                        .map_err(|e| e.to_string())
                        .and_then(|env| router.route(&mut *tx, &env).map_err(|e| e.to_string()))
                        .map(|routed| matches!(routed, switchboard_router::Routed::Stored { .. }))
                } else {
                    switchboard_core::decode_command(&r.payload)
                        .map_err(|e| e.to_string())
                        .and_then(|cmd| router.apply(&mut *tx, &cmd).map_err(|e| e.to_string()))
                        .map(|_| false)
                };
                match res {
                    Ok(true) => {
                        stored += 1;
                        tx.release_savepoint()?;
                    }
                    Ok(false) => {
                        applied += usize::from(r.topic != inbound_topic);
                        tx.release_savepoint()?;
                    }
                    Err(reason) => {
                        skipped += 1;
                        tracing::warn!(topic = %r.topic, partition = r.partition, offset = r.offset, %reason, "skipped");
                        tx.rollback_to_savepoint()?;
                    }
                }
            }
            tx.commit()?;
        }
        // The events of the first run were published then; these are not.
        while let Some(last) = store.outbox(10_000)?.last().map(|r| r.seq) {
            store.outbox_done(last)?;
        }
        Ok(format!(
            "replayed {total} records: {stored} messages stored, {applied} commands applied, {skipped} skipped (dead letters of the first run)"
        ))
    })
    .await??;
    handle.close().await;
    Ok(summary)
}

/// The (topic, consumer group) pairs the daemon consumes: routing (from
/// `routed.v1` behind the identity stage when re-keying), commands and the
/// dispatcher.
fn consumed(topics: &switchboard_core::Topics, rekey: bool) -> Vec<(String, String)> {
    let g = &topics.groups;
    let mut pairs = vec![(topics.inbound.clone(), g.router.clone())];
    if rekey {
        pairs = vec![
            (topics.inbound.clone(), g.identity.clone()),
            (topics.routed.clone(), g.router.clone()),
        ];
    }
    pairs.push((topics.commands.clone(), g.commands.clone()));
    pairs.push((topics.outbound.clone(), g.dispatcher.clone()));
    pairs
}

/// Reloads on every SIGHUP, logging what was applied or why nothing was.
async fn reload_on_sighup(mut reloader: crate::reload::Reloader, running: crate::reload::Running) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP: reloading is off");
            return;
        }
    };
    while hup.recv().await.is_some() {
        match reloader.reload(&running) {
            Ok(applied) => tracing::info!(%applied, "configuration reloaded"),
            Err(reason) => tracing::error!(%reason, "configuration reload refused"),
        }
    }
}
