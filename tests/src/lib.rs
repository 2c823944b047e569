//! Helpers for the whole-daemon tests: they locate (and if need be build) the
//! real `switchboard` binary, start it on a free loopback port with its own
//! data directory, and talk to its HTTP API.
//!
//! A [`Daemon`] kills its process when dropped, so no daemon outlives a test,
//! and prints the daemon's stderr when the test is failing.
//!
//! Backends: a [`TestDir`] runs its daemons on the embedded log and SQLite
//! ([`TestDir::new`]) or on Kafka and PostgreSQL
//! ([`TestDir::with_backend`] with [`Backend::KafkaPg`]; see the `services`
//! module for how tests stay apart there). [`backend_tests!`] runs one test
//! body on both.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};

pub use reqwest::StatusCode;

pub mod mail;
pub mod meta;
pub mod providers;
mod services;
pub use services::{
    Backend, KAFKA_ENV, KAFKA_PARTITIONS, KafkaLock, POSTGRES_ENV, SESSION_TIMEOUT_MS, TOPICS,
    delete_topics, kafka_brokers, kafka_lag, kafka_lock_path, lock_kafka, random_prefix,
};
use services::{KafkaSide, Services};

/// Runs each test body on both backends: `body: embedded_name,
/// kafka_pg_name;` makes two `#[tokio::test]`s (multi-threaded, 2 workers)
/// that call `body(Backend::Embedded)` and `body(Backend::KafkaPg)`; the
/// second skips (or, under CI, fails) when Kafka or PostgreSQL is not
/// configured ([`Backend::available`]).
#[macro_export]
macro_rules! backend_tests {
    ($($body:ident: $embedded:ident, $kafka_pg:ident;)+) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $embedded() {
            $body($crate::Backend::Embedded).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $kafka_pg() {
            if $crate::Backend::KafkaPg.available(stringify!($kafka_pg)) {
                $body($crate::Backend::KafkaPg).await;
            }
        }
    )+};
}

/// The bearer token every test daemon accepts.
pub const TOKEN: &str = "e2e-token-0123456789abcdef";

/// How long a daemon may take to answer `/readyz` with 200.
pub const READY_DEADLINE: Duration = Duration::from_secs(60);

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The profile directory the binary is expected in (`target/debug`), and the
/// profile name. Derived from the running test executable
/// (`<target>/<profile>/deps/<test>`) when it sits in a cargo layout, so a
/// custom target dir or profile is followed; otherwise `CARGO_TARGET_DIR`
/// (or `../target`) plus `debug`.
fn profile_dir() -> (PathBuf, String) {
    if let Ok(exe) = std::env::current_exe()
        && let Some(deps) = exe.parent()
        && deps.file_name().is_some_and(|n| n == "deps")
        && let Some(profile) = deps.parent()
        && let Some(name) = profile.file_name().and_then(|n| n.to_str())
    {
        return (profile.to_path_buf(), name.to_owned());
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    };
    (target.join("debug"), "debug".to_owned())
}

/// The `switchboard` binary. Built once per test process with
/// `cargo build -p switchboard` (a no-op when it is up to date, so the tests
/// never run a stale binary); set `SWITCHBOARD_E2E_NO_BUILD=1` to use the
/// binary as it is. If the build fails but a binary exists, that binary is
/// used with a warning.
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let (dir, profile) = profile_dir();
        let bin = dir.join(format!("switchboard{}", std::env::consts::EXE_SUFFIX));
        let skip = std::env::var_os("SWITCHBOARD_E2E_NO_BUILD").is_some_and(|v| v != "0");
        if skip && bin.is_file() {
            return bin;
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root()).args([
            "build",
            "-p",
            "switchboard",
            "--bin",
            "switchboard",
        ]);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .expect("cannot run cargo to build the switchboard binary");
        if !out.status.success() {
            let log = String::from_utf8_lossy(&out.stderr);
            if bin.is_file() {
                eprintln!(
                    "warning: `cargo build -p switchboard` failed; using the existing {}\n{log}",
                    bin.display()
                );
            } else {
                panic!("`cargo build -p switchboard` failed:\n{log}");
            }
        }
        assert!(
            bin.is_file(),
            "the switchboard binary is not at {}",
            bin.display()
        );
        bin
    })
}

/// A command for the binary with an environment free of any
/// `SWITCHBOARD__*` or `RUST_LOG` variable the test process inherited.
pub fn switchboard_command() -> Command {
    let mut cmd = Command::new(binary());
    for (key, _) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|k| k.starts_with("SWITCHBOARD__") || k == "RUST_LOG")
        {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `switchboard topics create` with `env` and returns its output.
pub fn topics_create(env: &[(String, String)]) -> std::process::Output {
    let mut cmd = switchboard_command();
    cmd.args(["topics", "create"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
        .expect("cannot run `switchboard topics create`")
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind a loopback port");
    listener
        .local_addr()
        .expect("a bound listener has an address")
        .port()
}

/// A test's scratch space: a temporary directory holding the data directory
/// and the daemons' logs, and, on Kafka and PostgreSQL, the test's topics
/// and schema. Daemons started from it share the data directory (and the
/// topics and schema), so a restart sees what the previous run stored.
pub struct TestDir {
    dir: tempfile::TempDir,
    starts: usize,
    services: Option<Services>,
    /// A shared broker lock, when the test passes a Kafka configuration of
    /// its own (see [`lock_kafka`]).
    env_lock: Option<KafkaLock>,
}

impl TestDir {
    /// A new, empty one, for the embedded log and SQLite. With
    /// `SWITCHBOARD_E2E_KEEP=1` it is not removed at the end (the daemons'
    /// whole logs stay there), and its path is printed.
    pub fn new() -> Self {
        let keep = std::env::var_os("SWITCHBOARD_E2E_KEEP").is_some_and(|v| v != "0");
        let dir = tempfile::Builder::new()
            .prefix("switchboard-e2e-")
            .disable_cleanup(keep)
            .tempdir()
            .expect("cannot create a temporary directory");
        if keep {
            eprintln!("SWITCHBOARD_E2E_KEEP: keeping {}", dir.path().display());
        }
        TestDir {
            dir,
            starts: 0,
            services: None,
            env_lock: None,
        }
    }

    /// A new one for `backend`. On Kafka and PostgreSQL: a fresh topic
    /// prefix (the topics are created before the first start, with
    /// [`KAFKA_PARTITIONS`] partitions, and deleted when this is dropped)
    /// and a fresh schema (dropped with this). Panics if the services are
    /// not configured: check [`Backend::available`] first.
    pub fn with_backend(backend: Backend) -> Self {
        let mut dir = Self::new();
        if backend == Backend::KafkaPg {
            dir.services = Some(Services::new());
        }
        dir
    }

    /// The backend its daemons run on.
    pub fn backend(&self) -> Backend {
        if self.services.is_some() {
            Backend::KafkaPg
        } else {
            Backend::Embedded
        }
    }

    /// The topic prefix its daemons use.
    pub fn topic_prefix(&self) -> &str {
        self.services
            .as_ref()
            .map_or("switchboard.", |s| s.prefix.as_str())
    }

    /// The full name of topic `name` (`inbound.v1`, `dlq.v1`, ...).
    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.topic_prefix())
    }

    /// The Kafka bootstrap address, on Kafka.
    pub fn brokers(&self) -> Option<&str> {
        self.services.as_ref().map(|s| s.brokers.as_str())
    }

    /// The PostgreSQL schema and its URL (with `search_path`), on
    /// PostgreSQL.
    pub fn schema(&self) -> Option<(&str, String)> {
        self.services
            .as_ref()
            .map(|s| (s.schema_name(), s.schema_url()))
    }

    /// The environment that puts a daemon (or `switchboard` command) on
    /// this directory's backend; creates the topics the first time. Empty
    /// for the embedded backend.
    pub fn backend_env(&mut self) -> Vec<(String, String)> {
        match self.services.as_mut() {
            Some(s) => {
                s.ensure_topics();
                s.env()
            }
            None => Vec::new(),
        }
    }

    /// The temporary directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts a daemon on this data directory with the test token and
    /// `env` added to its environment, and waits until it is ready.
    pub async fn start(&mut self, env: &[(&str, &str)]) -> Daemon {
        let data_dir = self.data_dir();
        self.start_in(&data_dir, env).await
    }

    /// Starts another instance: like [`TestDir::start`], but with a data
    /// directory of its own (`<dir>/<name>`) and its own port. On Kafka
    /// and PostgreSQL it shares the topics, the schema and so the consumer
    /// groups with every other daemon of this directory.
    pub async fn start_instance(&mut self, name: &str, env: &[(&str, &str)]) -> Daemon {
        let data_dir = self.path().join(name);
        self.start_in(&data_dir, env).await
    }

    async fn start_in(&mut self, data_dir: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut last_error = String::new();
        for _attempt in 0..5 {
            let mut daemon = self.spawn_in(data_dir, env);
            match daemon.wait_ready(READY_DEADLINE).await {
                Ok(()) => return daemon,
                Err(e) => {
                    let log = daemon.stderr();
                    // The daemon's words when the port was taken meanwhile.
                    let clash = log.contains("cannot listen");
                    daemon.kill();
                    if clash {
                        last_error = format!("{e:#}\n{log}");
                        continue;
                    }
                    daemon.report_on_drop = false;
                    panic!("the daemon did not become ready: {e:#}\n--- daemon stderr ---\n{log}");
                }
            }
        }
        panic!("the daemon could not get a port after 5 attempts: {last_error}");
    }
}

impl TestDir {
    /// Starts a daemon like [`TestDir::start`] but does not wait for it to
    /// be ready (nor retry on a port clash).
    pub fn spawn(&mut self, env: &[(&str, &str)]) -> Daemon {
        let data_dir = self.data_dir();
        self.spawn_in(&data_dir, env)
    }

    fn spawn_in(&mut self, data_dir: &Path, env: &[(&str, &str)]) -> Daemon {
        self.starts += 1;
        let stderr_path = self.path().join(format!("daemon-{}.stderr", self.starts));
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        // A test that configures Kafka itself shares the broker too.
        if self.services.is_none()
            && self.env_lock.is_none()
            && env
                .iter()
                .any(|(k, v)| *k == "SWITCHBOARD__BUS__BACKEND" && *v == "kafka")
            && let Some((_, brokers)) = env
                .iter()
                .find(|(k, _)| *k == "SWITCHBOARD__BUS__KAFKA__BROKERS")
        {
            self.env_lock = lock_kafka(brokers, false);
        }
        // The backend first, so that the test's own `env` wins.
        let mut all: Vec<(String, String)> = self.backend_env();
        all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let kafka = self.services.as_ref().map(|s| KafkaSide {
            brokers: s.brokers.clone(),
            prefix: s.prefix.clone(),
        });
        Daemon::spawn(addr, data_dir, &stderr_path, &all, kafka)
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

/// A running daemon. Dropping it kills the process (SIGKILL) and reaps it;
/// a daemon on Kafka is first asked to stop (SIGTERM, up to 10 s), so it
/// leaves its consumer groups instead of holding up their next rebalance.
pub struct Daemon {
    child: Option<Child>,
    status: Option<ExitStatus>,
    addr: SocketAddr,
    stderr_path: PathBuf,
    api: Api,
    report_on_drop: bool,
    kafka: Option<KafkaSide>,
}

impl Daemon {
    fn spawn(
        addr: SocketAddr,
        data_dir: &Path,
        stderr_path: &Path,
        env: &[(String, String)],
        kafka: Option<KafkaSide>,
    ) -> Self {
        let log = std::fs::File::create(stderr_path).expect("cannot create the daemon's log file");
        let out = log.try_clone().expect("cannot clone the log file handle");
        let mut cmd = switchboard_command();
        cmd.arg("run")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .env("SWITCHBOARD__HTTP__TOKENS", TOKEN)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(log));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("cannot start the switchboard binary");
        Daemon {
            child: Some(child),
            status: None,
            addr,
            stderr_path: stderr_path.to_path_buf(),
            api: Api::new(addr, TOKEN),
            report_on_drop: true,
            kafka,
        }
    }

    /// Records accepted on `inbound.v1` but not yet threaded into the
    /// history, or `None` while that is not known yet. Embedded: the
    /// daemon's `switchboard_bus_lag` for `inbound.v1`. Kafka: asked of the
    /// broker, for the identity group on `inbound.v1` plus the router group
    /// on `routed.v1` (the daemon's `/metrics` reports the router group on
    /// `inbound.v1` there, which it never consumes).
    pub async fn routing_lag(&self) -> anyhow::Result<Option<f64>> {
        match &self.kafka {
            None => self.api.inbound_lag().await,
            Some(k) => Ok(Some(k.routing_lag().await? as f64)),
        }
    }

    /// Waits until everything accepted so far is threaded (see
    /// [`Daemon::routing_lag`]).
    pub async fn wait_routed(&self, deadline: Duration) {
        wait_for("the routing lag to reach 0", deadline, || async {
            Ok(self.routing_lag().await?.filter(|l| *l == 0.0))
        })
        .await;
    }

    /// Whether it runs on Kafka.
    pub fn on_kafka(&self) -> bool {
        self.kafka.is_some()
    }

    /// Polls `/readyz` until it answers 200, failing early if the process
    /// exits.
    async fn wait_ready(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let url = format!("http://{}/readyz", self.addr);
        loop {
            if let Some(status) = self.try_status() {
                bail!("the daemon exited with {status} before it was ready");
            }
            let last = match client.get(&url).send().await {
                Ok(resp) if resp.status() == StatusCode::OK => return Ok(()),
                Ok(resp) => format!(
                    "{}: {}",
                    resp.status(),
                    resp.text().await.unwrap_or_default()
                ),
                Err(e) => e.to_string(),
            };
            if started.elapsed() > deadline {
                bail!("/readyz did not answer 200 within {deadline:?} (last: {last})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A client for its API.
    pub fn api(&self) -> Api {
        self.api.clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// What the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Its exit status, if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.status = Some(status);
        }
        self.status
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut()
            && self.status.is_none()
        {
            // Fails only if it already exited; `wait` reaps it either way.
            if child.kill().is_err() {
                eprintln!("daemon {} had already exited", child.id());
            }
            if let Ok(status) = child.wait() {
                self.status = Some(status);
            }
        }
    }

    /// Sends SIGTERM (through `kill`, the workspace forbids unsafe code).
    pub fn terminate(&self) {
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill -TERM {pid} failed: {status}");
    }

    /// Waits for the process to exit, up to `deadline`.
    pub async fn wait_exit(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_status() {
                return Ok(status);
            }
            if started.elapsed() > deadline {
                bail!("the daemon did not exit within {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Daemon {
    /// SIGTERM, then up to `grace` for the exit, blocking; false if it is
    /// still running.
    fn stop_blocking(&mut self, grace: Duration) -> bool {
        if self.try_status().is_some() {
            return true;
        }
        let pid = self.pid().to_string();
        if !Command::new("kill")
            .args(["-TERM", &pid])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return self.try_status().is_some();
        }
        let started = Instant::now();
        while started.elapsed() < grace {
            if self.try_status().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.kafka.is_some() {
            self.stop_blocking(Duration::from_secs(10));
        }
        self.kill();
        if self.report_on_drop && std::thread::panicking() {
            let log = self.stderr();
            let mut start = log.len().saturating_sub(64 * 1024);
            while !log.is_char_boundary(start) {
                start += 1;
            }
            let tail = &log[start..];
            eprintln!(
                "--- stderr of the daemon on {} (last 64 KiB) ---\n{tail}\n--- end of daemon stderr ---",
                self.addr
            );
        }
    }
}

/// Percent-encodes a query value.
pub fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A client of the daemon's HTTP API.
#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

/// An answer: status and body (JSON if it parses, else a JSON string).
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body.
    pub body: Value,
}

impl Answer {
    async fn read(resp: reqwest::Response) -> anyhow::Result<Self> {
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.context("reading the response body")?;
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// The `error` field of a JSON error body.
    pub fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }

    /// The `field` field of a JSON error body.
    pub fn field(&self) -> Option<&str> {
        self.body["field"].as_str()
    }
}

impl Api {
    /// A client for the daemon at `addr`, presenting `token`.
    pub fn new(addr: SocketAddr, token: &str) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .retry(reqwest::retry::never())
            .build()
            .expect("a plain reqwest client builds");
        Api {
            client,
            base: format!("http://{addr}"),
            token: token.to_owned(),
        }
    }

    /// The absolute URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The underlying client.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// `POST path` with a JSON body and the token.
    pub async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Answer> {
        let resp = self
            .client
            .post(self.url(path))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        Answer::read(resp).await
    }

    /// `POST path` with raw bytes, an optional content type and an optional
    /// token.
    pub async fn post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
        content_type: Option<&str>,
        token: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let mut req = self.client.post(self.url(path)).body(body);
        if let Some(ct) = content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.with_context(|| format!("POST {path}"))?;
        Answer::read(resp).await
    }

    /// `POST /v1/inbound`.
    pub async fn inbound(&self, envelope: &Value) -> anyhow::Result<Answer> {
        self.post_json("/v1/inbound", envelope).await
    }

    /// `POST /v1/commands`.
    pub async fn command(&self, command: &Value) -> anyhow::Result<Answer> {
        self.post_json("/v1/commands", command).await
    }

    /// `GET path` with the token.
    pub async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        let resp = self
            .client
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        Answer::read(resp).await
    }

    /// `GET /v1/customers?identity=KIND:VALUE`: the customer, or `None` on
    /// 404. Any other status is an error.
    pub async fn customer(&self, identity: &str) -> anyhow::Result<Option<Value>> {
        let a = self
            .get(&format!(
                "/v1/customers?identity={}",
                encode_query(identity)
            ))
            .await?;
        match a.status {
            StatusCode::OK => Ok(Some(a.body)),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(anyhow!("customer lookup {identity}: {s} {}", a.body)),
        }
    }

    /// One page of a customer's timeline (must answer 200).
    pub async fn timeline_page(
        &self,
        customer: &str,
        after: Option<&str>,
        limit: usize,
    ) -> anyhow::Result<Value> {
        let mut path = format!("/v1/customers/{customer}/timeline?limit={limit}");
        if let Some(a) = after {
            path.push_str(&format!("&after={}", encode_query(a)));
        }
        let a = self.get(&path).await?;
        if a.status != StatusCode::OK {
            bail!("GET {path}: {} {}", a.status, a.body);
        }
        Ok(a.body)
    }

    /// Every message of a customer's timeline, following `next_cursor`
    /// pages of `limit`. Fails on a repeated cursor (a pagination loop).
    pub async fn timeline_messages(
        &self,
        customer: &str,
        limit: usize,
    ) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        let mut seen_cursors = std::collections::HashSet::new();
        loop {
            let page = self
                .timeline_page(customer, after.as_deref(), limit)
                .await?;
            let messages = page["messages"]
                .as_array()
                .ok_or_else(|| anyhow!("timeline page without messages: {page}"))?;
            if messages.len() > limit {
                bail!("a page of limit {limit} held {} messages", messages.len());
            }
            out.extend(messages.iter().cloned());
            match page["next_cursor"].as_str() {
                Some(c) => {
                    if !seen_cursors.insert(c.to_owned()) {
                        bail!("cursor {c} came back twice");
                    }
                    after = Some(c.to_owned());
                }
                None => return Ok(out),
            }
        }
    }

    /// `GET /v1/conversations/{id}`, or `None` on 404.
    pub async fn conversation(&self, id: &str) -> anyhow::Result<Option<Value>> {
        let a = self.get(&format!("/v1/conversations/{id}")).await?;
        match a.status {
            StatusCode::OK => Ok(Some(a.body)),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(anyhow!("conversation {id}: {s} {}", a.body)),
        }
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let resp = self.client.get(self.url("/metrics")).send().await?;
        if resp.status() != StatusCode::OK {
            bail!("/metrics answered {}", resp.status());
        }
        Ok(resp.text().await?)
    }

    /// Records on `inbound.v1` not yet committed by the router, summed over
    /// partitions, or `None` while `/metrics` shows no lag for it.
    pub async fn inbound_lag(&self) -> anyhow::Result<Option<f64>> {
        let text = self.metrics().await?;
        let lags = metric_samples(&text, "switchboard_bus_lag");
        let inbound: Vec<f64> = lags
            .iter()
            .filter(|(labels, _)| labels.contains("inbound.v1") && labels.contains("router"))
            .map(|(_, v)| *v)
            .collect();
        Ok((!inbound.is_empty()).then(|| inbound.iter().sum()))
    }

    /// Waits until the router has committed everything on `inbound.v1`.
    pub async fn wait_routed(&self, deadline: Duration) {
        wait_for("the inbound lag to reach 0", deadline, || async {
            Ok(self.inbound_lag().await?.filter(|l| *l == 0.0))
        })
        .await;
    }
}

/// The samples of metric `name` in Prometheus text: (labels, value).
pub fn metric_samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
                let (labels, value) = r.split_once('}')?;
                (labels.to_owned(), value)
            } else if rest.starts_with(' ') {
                (String::new(), rest)
            } else {
                return None;
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum of every sample of metric `name`.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    metric_samples(text, name).iter().map(|(_, v)| v).sum()
}

/// Polls `probe` until it returns `Some`, panicking with `what` and the last
/// error after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let started = Instant::now();
    let mut last = String::from("no error");
    loop {
        match probe().await {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        assert!(
            started.elapsed() <= deadline,
            "gave up waiting for {what} after {deadline:?} (last error: {last})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// RFC 3339 time of `ms` milliseconds after the Unix epoch.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("a time in range")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Milliseconds since the epoch of an RFC 3339 time.
pub fn parse_millis(s: &str) -> anyhow::Result<i64> {
    Ok(chrono::DateTime::parse_from_rfc3339(s)
        .with_context(|| format!("{s:?} is not an RFC 3339 time"))?
        .timestamp_millis())
}

/// 2024-03-01T00:00:00Z, a base for explicit `received_at` times.
pub const BASE_MS: i64 = 1_709_251_200_000;

/// An inbound envelope with the required fields; callers add the rest.
#[allow(clippy::too_many_arguments)]
pub fn envelope(
    key: &str,
    channel: &str,
    provider: &str,
    account: &str,
    from: (&str, &str),
    to: (&str, &str),
    received_at_ms: i64,
    text: &str,
) -> Value {
    json!({
        "schema": "switchboard.envelope.v1",
        "idempotency_key": key,
        "channel": channel,
        "provider": provider,
        "account": account,
        "direction": "inbound",
        "from": {"kind": from.0, "value": from.1},
        "to": {"kind": to.0, "value": to.1},
        "received_at": rfc3339(received_at_ms),
        "text": text,
    })
}

/// A JSON string field of `v`, panicking with context if absent.
pub fn str_field<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("no string field {field:?} in {v}"))
}

/// Posts every envelope to `/v1/inbound`, at most `concurrency` at a time,
/// returning each envelope's idempotency key with its answer, in the order
/// given.
pub async fn post_all(
    api: &Api,
    envelopes: Vec<Value>,
    concurrency: usize,
) -> Vec<(String, anyhow::Result<Answer>)> {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, env) in envelopes.into_iter().enumerate() {
        let permit = std::sync::Arc::clone(&permits)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let api = api.clone();
        tasks.spawn(async move {
            let key = str_field(&env, "idempotency_key").to_owned();
            let answer = api.inbound(&env).await;
            drop(permit);
            (i, key, answer)
        });
    }
    let mut out: Vec<(usize, String, anyhow::Result<Answer>)> = Vec::new();
    while let Some(done) = tasks.join_next().await {
        out.push(done.expect("a posting task panicked"));
    }
    out.sort_by_key(|(i, _, _)| *i);
    out.into_iter().map(|(_, k, a)| (k, a)).collect()
}

/// A small deterministic pseudo-random sequence (xorshift64*), so tests
/// shuffle the same way every run.
pub struct Rng(u64);

impl Rng {
    /// Seeded; a zero seed is replaced.
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// What a [`Flood`] got back.
#[derive(Debug, Default)]
pub struct FloodResult {
    /// Keys answered 2xx, in answer order.
    pub acked: Vec<String>,
    /// Keys answered with another status: (key, status, body).
    pub refused: Vec<(String, StatusCode, Value)>,
    /// Posts that got no answer (connection refused or reset, timeout).
    pub failed: usize,
}

#[derive(Default)]
struct Tally {
    result: std::sync::Mutex<FloodResult>,
    acked: std::sync::atomic::AtomicUsize,
}

/// Envelopes posted in the background, at most `concurrency` at a time,
/// tallying which were acknowledged; for killing or stopping the daemon
/// while posts are in flight.
pub struct Flood {
    tally: std::sync::Arc<Tally>,
    handle: tokio::task::JoinHandle<()>,
}

impl Flood {
    /// Starts posting.
    pub fn start(api: &Api, envelopes: Vec<Value>, concurrency: usize) -> Self {
        use std::sync::Arc;
        let tally = Arc::new(Tally::default());
        let api = api.clone();
        let t = Arc::clone(&tally);
        let handle = tokio::spawn(async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
            let mut tasks = tokio::task::JoinSet::new();
            for env in envelopes {
                let permit = Arc::clone(&permits)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let tally = Arc::clone(&t);
                let api = api.clone();
                tasks.spawn(async move {
                    let key = str_field(&env, "idempotency_key").to_owned();
                    let answer = api.inbound(&env).await;
                    drop(permit);
                    let mut r = tally.result.lock().unwrap_or_else(|p| p.into_inner());
                    match answer {
                        Ok(a) if a.status.is_success() => {
                            r.acked.push(key);
                            tally
                                .acked
                                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Ok(a) => r.refused.push((key, a.status, a.body)),
                        Err(_) => r.failed += 1,
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.expect("a posting task panicked");
            }
        });
        Flood { tally, handle }
    }

    /// How many posts were acknowledged so far.
    pub fn acked(&self) -> usize {
        self.tally.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `n` posts were acknowledged; fails if every post finished
    /// first.
    pub async fn wait_acked(&self, n: usize, deadline: Duration) {
        wait_for(&format!("{n} acknowledged posts"), deadline, || async {
            let acked = self.acked();
            anyhow::ensure!(
                acked >= n || !self.handle.is_finished(),
                "every post finished with only {acked} acknowledged"
            );
            Ok((acked >= n).then_some(()))
        })
        .await;
    }

    /// Waits for every post to be answered or to fail.
    pub async fn finish(self, deadline: Duration) -> FloodResult {
        tokio::time::timeout(deadline, self.handle)
            .await
            .expect("the posts did not finish in time")
            .expect("the posting task panicked");
        let mut r = self.tally.result.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *r)
    }
}

/// How often each idempotency key occurs in the histories of the customers
/// found by `identities` (`kind:value`; unknown ones are skipped). Fails if
/// `belongs` says a key is in the wrong customer's history.
pub async fn stored_keys(
    api: &Api,
    identities: &[String],
    belongs: impl Fn(&str, &str) -> bool,
) -> anyhow::Result<std::collections::HashMap<String, usize>> {
    let mut counts = std::collections::HashMap::new();
    for identity in identities {
        let Some(customer) = api.customer(identity).await? else {
            continue;
        };
        for m in api
            .timeline_messages(str_field(&customer, "id"), 1000)
            .await?
        {
            let key = str_field(&m, "idempotency_key").to_owned();
            anyhow::ensure!(
                belongs(&key, identity),
                "{key} is in the history of {identity}"
            );
            *counts.entry(key).or_default() += 1;
        }
    }
    Ok(counts)
}

// --- Outbound: POST /v1/messages and what follows it. ---

/// An outbound request (`switchboard.outbound.v1`) replying in a
/// conversation.
pub fn outbound_request(key: &str, conversation_id: &str, text: &str) -> Value {
    json!({
        "schema": "switchboard.outbound.v1",
        "idempotency_key": key,
        "conversation_id": conversation_id,
        "text": text,
    })
}

impl Api {
    /// `POST /v1/messages`.
    pub async fn send_message(&self, request: &Value) -> anyhow::Result<Answer> {
        self.post_json("/v1/messages", request).await
    }

    /// `POST /v1/messages/{id}/status`.
    pub async fn report_status(&self, message_id: &str, report: &Value) -> anyhow::Result<Answer> {
        self.post_json(&format!("/v1/messages/{message_id}/status"), report)
            .await
    }

    /// Records on `commands.v1` not yet committed by the command loop,
    /// summed over partitions, or `None` while `/metrics` shows no lag for
    /// it.
    pub async fn commands_lag(&self) -> anyhow::Result<Option<f64>> {
        let text = self.metrics().await?;
        let lags: Vec<f64> = metric_samples(&text, "switchboard_bus_lag")
            .iter()
            .filter(|(labels, _)| labels.contains("commands.v1") && labels.contains("commands"))
            .map(|(_, v)| *v)
            .collect();
        Ok((!lags.is_empty()).then(|| lags.iter().sum()))
    }

    /// Waits until the command loop has committed everything on
    /// `commands.v1`.
    pub async fn wait_commands_applied(&self, deadline: Duration) {
        wait_for("the commands lag to reach 0", deadline, || async {
            Ok(self.commands_lag().await?.filter(|l| *l == 0.0))
        })
        .await;
    }

    /// The messages of conversation `id` (404 is an error).
    pub async fn conversation_messages(&self, id: &str) -> anyhow::Result<Vec<Value>> {
        let conv = self
            .conversation(id)
            .await?
            .ok_or_else(|| anyhow!("no conversation {id}"))?;
        conv["messages"]
            .as_array()
            .cloned()
            .ok_or_else(|| anyhow!("conversation {id} without messages: {conv}"))
    }
}

impl Flood {
    /// Like [`Flood::start`], but posts each JSON body to `path` (for
    /// example `/v1/messages`); each body names its `idempotency_key`.
    pub fn start_at(api: &Api, path: &str, bodies: Vec<Value>, concurrency: usize) -> Self {
        use std::sync::Arc;
        let tally = Arc::new(Tally::default());
        let api = api.clone();
        let path = path.to_owned();
        let t = Arc::clone(&tally);
        let handle = tokio::spawn(async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
            let mut tasks = tokio::task::JoinSet::new();
            for body in bodies {
                let permit = Arc::clone(&permits)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let tally = Arc::clone(&t);
                let api = api.clone();
                let path = path.clone();
                tasks.spawn(async move {
                    let key = str_field(&body, "idempotency_key").to_owned();
                    let answer = api.post_json(&path, &body).await;
                    drop(permit);
                    let mut r = tally.result.lock().unwrap_or_else(|p| p.into_inner());
                    match answer {
                        Ok(a) if a.status.is_success() => {
                            r.acked.push(key);
                            tally
                                .acked
                                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Ok(a) => r.refused.push((key, a.status, a.body)),
                        Err(_) => r.failed += 1,
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.expect("a posting task panicked");
            }
        });
        Flood { tally, handle }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_metric_samples() {
        let text = "# HELP x_total a counter\n# TYPE x_total counter\n\
                    x_total{a=\"1\",b=\"z\"} 3\nx_total{a=\"2\"} 4.5\nx_totals 100\ny 1\nx_total 2\n";
        let samples = metric_samples(text, "x_total");
        assert_eq!(samples.len(), 3, "{samples:?}");
        assert_eq!(metric_sum(text, "x_total"), 9.5);
        assert_eq!(metric_sum(text, "nothing"), 0.0);
    }

    #[test]
    fn encodes_query_values() {
        assert_eq!(encode_query("phone:+1 415"), "phone%3A%2B1%20415");
        assert_eq!(encode_query("a-b_c.d~"), "a-b_c.d~");
    }

    #[test]
    fn shuffles_deterministically() {
        let mut a: Vec<u32> = (0..50).collect();
        let mut b = a.clone();
        Rng::new(7).shuffle(&mut a);
        Rng::new(7).shuffle(&mut b);
        assert_eq!(a, b);
        assert_ne!(a, (0..50).collect::<Vec<_>>());
        a.sort_unstable();
        assert_eq!(a, (0..50).collect::<Vec<_>>());
    }
}
