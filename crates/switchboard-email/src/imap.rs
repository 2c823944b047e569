//! IMAP in: one poller per mailbox, each on a connection of its own.
//!
//! A poller connects (implicit TLS, STARTTLS, or plain on loopback),
//! authenticates (LOGIN or XOAUTH2), selects its mailbox and reads its
//! checkpoint: the UIDVALIDITY and the highest UID already handed over. It
//! then fetches, by UID above the checkpoint (never by `UNSEEN`: mail another
//! client read is still new to us), with `BODY.PEEK[]` so fetching changes no
//! flag. Each batch is parsed, handed to [`Intake::accept`], and only once
//! that returned `Ok` is the mail acknowledged (`\Seen`, or moved to a
//! folder) and the checkpoint advanced. A crash anywhere before the
//! checkpoint fetches the batch again; the envelopes' idempotency keys make
//! the second copy harmless. When the mailbox's UIDVALIDITY differs from the
//! checkpoint's, every UID is void: the poller rescans the whole mailbox and
//! the keys deduplicate what was seen before.
//!
//! Between rounds it waits in IDLE (re-issued every `idle_timeout`, below
//! the 29 minutes RFC 2177 allows) or, where the server has no IDLE, sleeps
//! `poll_interval`. Any failure closes the connection and reconnects after a
//! backoff that doubles from `reconnect_min` to `reconnect_max`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::TryStreamExt as _;
use switchboard_core::{Intake, IntakeError, Live, Received};
use switchboard_store::{MailboxCheckpoint, Store};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::{AfterAccept, Auth, EmailAccount, EmailConfig, ImapConfig, Security};
use crate::parse::{AttachmentStore, ParseContext, ServerExtras};
use crate::tls::{MailStream, client_config, connect_tls};

/// Threads parsing one batch: each mail's original is synced to disk, and
/// overlapping those waits is most of the gain.
const PARSE_THREADS: usize = 8;

/// An IMAP session on a plain or TLS stream.
pub type Session = async_imap::Session<MailStream>;

/// Why a poller's round failed. Every kind is retried by reconnecting.
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    /// The TCP or TLS connection failed.
    #[error("connection to {0} failed: {1}")]
    Connect(String, String),
    /// The server refused our credentials.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// A command failed or the server broke the protocol.
    #[error("imap: {0}")]
    Protocol(String),
    /// A step took longer than allowed.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The checkpoint could not be read or written.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The attachment store could not be written.
    #[error("attachment store: {0}")]
    Attachments(String),
    /// The configuration cannot work (bad CA file).
    #[error("configuration: {0}")]
    Config(String),
}

impl From<async_imap::error::Error> for ImapError {
    fn from(e: async_imap::error::Error) -> Self {
        ImapError::Protocol(e.to_string())
    }
}

/// What the server offers that a sync uses.
#[derive(Debug, Clone, Copy)]
struct Caps {
    /// RFC 6851 MOVE.
    can_move: bool,
    /// RFC 4315 UIDPLUS (UID EXPUNGE).
    uidplus: bool,
    /// Gmail's X-GM-EXT-1 (X-GM-THRID).
    gmail: bool,
}

/// The Gmail thread id (X-GM-THRID) of each message of `set`, asked for
/// apart from the bodies: async-imap reads the attribute but gives no access
/// to it, so the responses are read here, with its parser.
async fn gmail_thread_ids(
    session: &mut Session,
    set: &str,
) -> Result<HashMap<u32, u64>, ImapError> {
    use async_imap::imap_proto::{Response, Status};
    let tag = session
        .run_command(format!("UID FETCH {set} (UID X-GM-THRID)"))
        .await?;
    let mut out = HashMap::new();
    loop {
        let Some(resp) = session
            .read_response()
            .await
            .map_err(|e| ImapError::Protocol(format!("reading X-GM-THRID: {e}")))?
        else {
            return Err(ImapError::Protocol(
                "connection closed while reading X-GM-THRID".into(),
            ));
        };
        match resp.parsed() {
            Response::Fetch(_, attrs) => {
                if let Some((uid, thread)) = fetched_thread_id(attrs) {
                    out.insert(uid, thread);
                }
            }
            Response::Done {
                tag: done,
                status,
                outcome,
            } if *done == tag => {
                if *status != Status::Ok {
                    return Err(ImapError::Protocol(format!(
                        "UID FETCH X-GM-THRID: {status:?} {}",
                        outcome.information.as_deref().unwrap_or("")
                    )));
                }
                return Ok(out);
            }
            _ => {}
        }
    }
}

/// The (UID, X-GM-THRID) of one FETCH response, when it has both.
fn fetched_thread_id(attrs: &[async_imap::imap_proto::AttributeValue<'_>]) -> Option<(u32, u64)> {
    use async_imap::imap_proto::AttributeValue;
    let uid = attrs.iter().find_map(|a| match a {
        AttributeValue::Uid(u) => Some(*u),
        _ => None,
    })?;
    let thread = attrs.iter().find_map(|a| match a {
        AttributeValue::GmailThrId(t) => Some(*t),
        _ => None,
    })?;
    Some((uid, thread))
}

/// Where pollers keep their checkpoints.
#[async_trait]
pub trait Checkpoints: Send + Sync {
    /// The checkpoint of `mailbox` of `account`, if any.
    async fn load(&self, account: &str, mailbox: &str)
    -> Result<Option<MailboxCheckpoint>, String>;
    /// Records it, durably.
    async fn save(&self, account: &str, mailbox: &str, cp: MailboxCheckpoint)
    -> Result<(), String>;
}

/// Checkpoints in the history store (the daemon's).
pub struct StoreCheckpoints(pub Arc<dyn Store>);

#[async_trait]
impl Checkpoints for StoreCheckpoints {
    async fn load(
        &self,
        account: &str,
        mailbox: &str,
    ) -> Result<Option<MailboxCheckpoint>, String> {
        let store = Arc::clone(&self.0);
        let (a, m) = (account.to_owned(), mailbox.to_owned());
        tokio::task::spawn_blocking(move || store.mailbox_checkpoint(&a, &m))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    async fn save(
        &self,
        account: &str,
        mailbox: &str,
        cp: MailboxCheckpoint,
    ) -> Result<(), String> {
        let store = Arc::clone(&self.0);
        let (a, m) = (account.to_owned(), mailbox.to_owned());
        tokio::task::spawn_blocking(move || store.set_mailbox_checkpoint(&a, &m, cp))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}

/// Checkpoints in memory (tests and benchmarks).
#[derive(Debug, Default)]
pub struct MemoryCheckpoints(Mutex<HashMap<(String, String), MailboxCheckpoint>>);

#[async_trait]
impl Checkpoints for MemoryCheckpoints {
    async fn load(
        &self,
        account: &str,
        mailbox: &str,
    ) -> Result<Option<MailboxCheckpoint>, String> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map.get(&(account.to_owned(), mailbox.to_owned())).copied())
    }

    async fn save(
        &self,
        account: &str,
        mailbox: &str,
        cp: MailboxCheckpoint,
    ) -> Result<(), String> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert((account.to_owned(), mailbox.to_owned()), cp);
        Ok(())
    }
}

/// What a poller has done, for health and metrics.
#[derive(Debug, Default)]
pub struct PollerStats {
    /// Whether the poller holds a selected session now.
    pub connected: AtomicBool,
    /// Mails handed over and acknowledged.
    pub accepted: AtomicU64,
    /// Connection attempts that failed or sessions that broke.
    pub failures: AtomicU64,
    /// Full rescans after a UIDVALIDITY change.
    pub rescans: AtomicU64,
}

/// The SASL XOAUTH2 exchange: the initial response carries user and token;
/// on failure the server sends a JSON challenge, answered empty.
struct XOAuth2<'a> {
    user: &'a str,
    token: &'a str,
    sent: bool,
}

impl async_imap::Authenticator for XOAuth2<'_> {
    type Response = String;

    fn process(&mut self, _challenge: &[u8]) -> String {
        if self.sent {
            return String::new();
        }
        self.sent = true;
        xoauth2_response(self.user, self.token)
    }
}

/// The XOAUTH2 initial client response (before base64).
pub(crate) fn xoauth2_response(user: &str, token: &str) -> String {
    format!("user={user}\x01auth=Bearer {token}\x01\x01")
}

/// Opens an authenticated session.
pub async fn connect(
    cfg: &ImapConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Session, ImapError> {
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let connect_err = |e: String| ImapError::Connect(addr.clone(), e);
    let tcp = tokio::time::timeout(
        cfg.timeout,
        TcpStream::connect((cfg.host.as_str(), cfg.port)),
    )
    .await
    .map_err(|_| ImapError::Timeout(format!("connecting to {addr}")))?
    .map_err(|e| connect_err(e.to_string()))?;
    tcp.set_nodelay(true).ok();
    let tls_config = || {
        tls.cloned()
            .ok_or_else(|| ImapError::Config("tls is required but not configured".into()))
    };
    let stream = match cfg.security {
        Security::Tls => {
            let s = tokio::time::timeout(cfg.timeout, connect_tls(tls_config()?, &cfg.host, tcp))
                .await
                .map_err(|_| ImapError::Timeout(format!("tls handshake with {addr}")))?
                .map_err(|e| connect_err(format!("tls: {e}")))?;
            MailStream::Tls(Box::new(s))
        }
        Security::StartTls | Security::Plain => MailStream::Plain(tcp),
    };
    let mut client = async_imap::Client::new(stream);
    let greeting = tokio::time::timeout(cfg.timeout, client.read_response())
        .await
        .map_err(|_| ImapError::Timeout(format!("greeting from {addr}")))?
        .map_err(|e| connect_err(e.to_string()))?;
    if greeting.is_none() {
        return Err(connect_err("closed before the greeting".into()));
    }
    if cfg.security == Security::StartTls {
        tokio::time::timeout(
            cfg.timeout,
            client.run_command_and_check_ok("STARTTLS", None),
        )
        .await
        .map_err(|_| ImapError::Timeout("STARTTLS".into()))?
        .map_err(|e| connect_err(format!("STARTTLS refused: {e}")))?;
        let MailStream::Plain(tcp) = client.into_inner() else {
            return Err(ImapError::Protocol("STARTTLS on a TLS stream".into()));
        };
        let s = tokio::time::timeout(cfg.timeout, connect_tls(tls_config()?, &cfg.host, tcp))
            .await
            .map_err(|_| ImapError::Timeout(format!("tls handshake with {addr}")))?
            .map_err(|e| connect_err(format!("tls after STARTTLS: {e}")))?;
        client = async_imap::Client::new(MailStream::Tls(Box::new(s)));
    }
    let session = match &cfg.auth {
        Auth::Plain { username, password } | Auth::Login { username, password } => {
            tokio::time::timeout(cfg.timeout, client.login(username, password.expose()))
                .await
                .map_err(|_| ImapError::Timeout("LOGIN".into()))?
                .map_err(|(e, _)| ImapError::Auth(e.to_string()))?
        }
        Auth::XOAuth2 { username, token } => {
            let auth = XOAuth2 {
                user: username,
                token: token.expose(),
                sent: false,
            };
            tokio::time::timeout(cfg.timeout, client.authenticate("XOAUTH2", auth))
                .await
                .map_err(|_| ImapError::Timeout("AUTHENTICATE XOAUTH2".into()))?
                .map_err(|(e, _)| ImapError::Auth(e.to_string()))?
        }
        Auth::None => return Err(ImapError::Config("imap needs credentials".into())),
    };
    Ok(session)
}

/// A compact UID set: `1:5,7,9:10`.
pub(crate) fn uid_set(sorted: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// Where a round starts: the checkpoint's last UID, or 0 (everything) when
/// there is none or the mailbox's UIDVALIDITY changed. The flag says a
/// rescan is due to a change.
pub(crate) fn start_uid(cp: Option<MailboxCheckpoint>, uidvalidity: u32) -> (u32, bool) {
    match cp {
        Some(cp) if cp.uidvalidity == uidvalidity => (cp.last_uid, false),
        Some(_) => (0, true),
        None => (0, false),
    }
}

/// Reads one mailbox into an [`Intake`].
pub struct ImapPoller {
    account: String,
    account_name: String,
    mailbox: String,
    cfg: Arc<ImapConfig>,
    /// The credentials, swappable while running (SIGHUP); read at each
    /// login, shared by the account's pollers.
    auth: Arc<Live<Auth>>,
    tls: Option<Arc<rustls::ClientConfig>>,
    parse: Arc<ParseContext>,
    intake: Arc<dyn Intake>,
    checkpoints: Arc<dyn Checkpoints>,
    stats: Arc<PollerStats>,
    /// The domain of `reply+<conversation>@` addresses, if replies use them.
    reply_domain: Option<String>,
}

enum Waited {
    /// Something changed (or the wait ended): sync again.
    Again,
    /// Shutdown.
    Stop,
}

impl ImapPoller {
    /// A poller for `mailbox` of `account` (the address, the envelopes'
    /// `account`).
    pub fn new(
        account: &EmailAccount,
        mailbox: &str,
        parse: Arc<ParseContext>,
        intake: Arc<dyn Intake>,
        checkpoints: Arc<dyn Checkpoints>,
    ) -> Result<Self, ImapError> {
        let cfg = account
            .imap
            .clone()
            .ok_or_else(|| ImapError::Config(format!("{} has no imap settings", account.name)))?;
        let tls = match cfg.security {
            Security::Plain => None,
            _ => Some(client_config(cfg.ca_file.as_deref()).map_err(ImapError::Config)?),
        };
        Ok(ImapPoller {
            account: account.address.clone(),
            account_name: account.name.clone(),
            mailbox: mailbox.to_owned(),
            auth: Arc::new(Live::new(cfg.auth.clone())),
            cfg: Arc::new(cfg),
            tls,
            parse,
            intake,
            checkpoints,
            stats: Arc::new(PollerStats::default()),
            reply_domain: account.reply_address_domain.clone(),
        })
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<PollerStats> {
        Arc::clone(&self.stats)
    }

    /// The account address.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The account's name in the configuration.
    pub fn account_name(&self) -> &str {
        &self.account_name
    }

    /// The credentials it logs in with: setting them (SIGHUP) takes effect
    /// at the next login; a session already logged in carries on.
    pub fn credentials(&self) -> Arc<Live<Auth>> {
        Arc::clone(&self.auth)
    }

    /// Shares `auth` with the account's other pollers.
    fn with_credentials(mut self, auth: Arc<Live<Auth>>) -> Self {
        self.auth = auth;
        self
    }

    /// The mailbox.
    pub fn mailbox(&self) -> &str {
        &self.mailbox
    }

    /// Runs until `shutdown` turns true, reconnecting after failures.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = self.cfg.reconnect_min;
        tracing::info!(account = %self.account, mailbox = %self.mailbox, host = %self.cfg.host, "imap poller starting");
        loop {
            if *shutdown.borrow() {
                break;
            }
            let mut progressed = false;
            let res = self.session(&mut shutdown, &mut progressed).await;
            self.stats.connected.store(false, Ordering::Relaxed);
            match res {
                Ok(()) => break,
                Err(error) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    if progressed {
                        backoff = self.cfg.reconnect_min;
                    }
                    tracing::warn!(
                        account = %self.account, mailbox = %self.mailbox, %error,
                        retry_in_ms = backoff.as_millis() as u64,
                        "imap session failed; reconnecting"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stopped(&mut shutdown) => break,
                    }
                    backoff = (backoff * 2).min(self.cfg.reconnect_max);
                }
            }
        }
        tracing::info!(account = %self.account, mailbox = %self.mailbox, "imap poller stopped");
    }

    /// One session: connect, then sync and wait until shutdown or failure.
    /// `progressed` turns true once the mailbox is selected (the backoff
    /// starts over after a session that got that far).
    async fn session(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        progressed: &mut bool,
    ) -> Result<(), ImapError> {
        let cfg = ImapConfig {
            auth: (*self.auth.get()).clone(),
            ..(*self.cfg).clone()
        };
        let mut session = connect(&cfg, self.tls.as_ref()).await?;
        let t = self.cfg.timeout;
        let caps = timed(t, "CAPABILITY", session.capabilities()).await??;
        let can_idle = self.cfg.idle && caps.has_str("IDLE");
        let can_move = caps.has_str("MOVE");
        let uidplus = caps.has_str("UIDPLUS");
        // Gmail's thread ids (X-GM-EXT-1): a thread hint that survives
        // clients dropping In-Reply-To and References.
        let gmail = caps.has_str("X-GM-EXT-1");
        drop(caps);
        if let AfterAccept::Move(folder) = &self.cfg.after {
            // Created if missing; "already exists" is the usual answer.
            if let Ok(Err(e)) = timed(t, "CREATE", session.create(folder)).await {
                tracing::debug!(folder = %folder, error = %e, "create refused (it likely exists)");
            }
        }
        let mailbox = timed(t, "SELECT", session.select(&self.mailbox)).await??;
        let uidvalidity = mailbox
            .uid_validity
            .ok_or_else(|| ImapError::Protocol("SELECT gave no UIDVALIDITY".into()))?;
        let cp = self
            .checkpoints
            .load(&self.account, &self.mailbox)
            .await
            .map_err(ImapError::Checkpoint)?;
        let (mut last_uid, rescan) = start_uid(cp, uidvalidity);
        if rescan {
            self.stats.rescans.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                account = %self.account, mailbox = %self.mailbox,
                old_uidvalidity = cp.map(|c| c.uidvalidity).unwrap_or_default(), uidvalidity,
                "uidvalidity changed: rescanning the whole mailbox (duplicates are dropped by key)"
            );
        }
        self.stats.connected.store(true, Ordering::Relaxed);
        *progressed = true;
        tracing::info!(
            account = %self.account, mailbox = %self.mailbox, uidvalidity, last_uid,
            exists = mailbox.exists, idle = can_idle, "imap mailbox selected"
        );
        loop {
            // Until a search finds nothing new: then IDLE reports anything
            // that arrives later.
            loop {
                let n = self
                    .sync_once(
                        &mut session,
                        uidvalidity,
                        &mut last_uid,
                        Caps {
                            can_move,
                            uidplus,
                            gmail,
                        },
                        shutdown,
                    )
                    .await?;
                if *shutdown.borrow() {
                    logout(&mut session, t).await;
                    return Ok(());
                }
                if n == 0 {
                    break;
                }
            }
            while session.unsolicited_responses.try_recv().is_ok() {}
            let waited = if can_idle {
                let (s, w) = self.idle(session, shutdown).await?;
                session = s;
                w
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(self.cfg.poll_interval) => {
                        timed(t, "NOOP", session.noop()).await??;
                        Waited::Again
                    }
                    _ = stopped(shutdown) => Waited::Stop,
                }
            };
            if let Waited::Stop = waited {
                logout(&mut session, t).await;
                return Ok(());
            }
        }
    }

    /// Waits in IDLE until the server reports something, `idle_timeout`
    /// passes, or shutdown.
    async fn idle(
        &self,
        session: Session,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(Session, Waited), ImapError> {
        let t = self.cfg.timeout;
        let mut handle = session.idle();
        timed(t, "IDLE", handle.init()).await??;
        let waited = {
            let (wait, _stop) = handle.wait_with_timeout(self.cfg.idle_timeout);
            // The library's timeout restarts at every keepalive; this one
            // bounds the whole wait, so IDLE is re-issued in time.
            tokio::select! {
                r = tokio::time::timeout(self.cfg.idle_timeout, wait) => match r {
                    Ok(Ok(_)) | Err(_) => Waited::Again,
                    Ok(Err(e)) => return Err(e.into()),
                },
                _ = stopped(shutdown) => Waited::Stop,
            }
        };
        let session = timed(t, "DONE", handle.done()).await??;
        Ok((session, waited))
    }

    /// Fetches, hands over and acknowledges every mail above `last_uid`, in
    /// batches; returns how many mails it found.
    async fn sync_once(
        &self,
        session: &mut Session,
        uidvalidity: u32,
        last_uid: &mut u32,
        caps: Caps,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<usize, ImapError> {
        let Caps {
            can_move,
            uidplus,
            gmail,
        } = caps;
        let t = self.cfg.timeout;
        let found = timed(
            t,
            "UID SEARCH",
            session.uid_search(format!("UID {}:*", last_uid.saturating_add(1))),
        )
        .await??;
        // `n:*` always names the last message, even below n.
        let mut uids: Vec<u32> = found.into_iter().filter(|u| *u > *last_uid).collect();
        uids.sort_unstable();
        let total = uids.len();
        for chunk in uids.chunks(self.cfg.fetch_batch) {
            if *shutdown.borrow() {
                break;
            }
            let set = uid_set(chunk);
            let fetched: Vec<(u32, Vec<u8>)> = {
                let stream =
                    timed(t, "UID FETCH", session.uid_fetch(&set, "(UID BODY.PEEK[])")).await??;
                let fetches: Vec<_> =
                    timed(t * 10, "UID FETCH", stream.try_collect::<Vec<_>>()).await??;
                fetches
                    .into_iter()
                    .filter_map(|f| Some((f.uid?, f.body()?.to_vec())))
                    .filter(|(uid, _)| chunk.binary_search(uid).is_ok())
                    .collect()
            };
            // One copy per UID, in UID order.
            let fetched: BTreeMap<u32, Vec<u8>> = fetched.into_iter().collect();
            let threads = if gmail {
                timed(t, "UID FETCH X-GM-THRID", gmail_thread_ids(session, &set)).await??
            } else {
                HashMap::new()
            };
            let records = self
                .parse_batch(uidvalidity, fetched.clone(), threads)
                .await?;
            let count = records.len();
            let Some(()) = self.hand_over(records, shutdown).await else {
                // Shutdown while the stream was unavailable: nothing is
                // acknowledged; the next start fetches the batch again.
                return Ok(total);
            };
            let acked: Vec<u32> = fetched.keys().copied().collect();
            if !acked.is_empty() {
                self.acknowledge(session, &uid_set(&acked), can_move, uidplus)
                    .await?;
            }
            let high = *chunk.last().expect("chunks are not empty");
            self.checkpoints
                .save(
                    &self.account,
                    &self.mailbox,
                    MailboxCheckpoint {
                        uidvalidity,
                        last_uid: high,
                    },
                )
                .await
                .map_err(ImapError::Checkpoint)?;
            *last_uid = high;
            self.stats
                .accepted
                .fetch_add(count as u64, Ordering::Relaxed);
            tracing::debug!(
                account = %self.account, mailbox = %self.mailbox, uidvalidity, last_uid = high,
                mails = count, "imap batch accepted"
            );
        }
        Ok(total)
    }

    /// Parses a batch off the async runtime (the attachment store writes
    /// files). Returns each UID's records.
    async fn parse_batch(
        &self,
        uidvalidity: u32,
        fetched: BTreeMap<u32, Vec<u8>>,
        threads: HashMap<u32, u64>,
    ) -> Result<Vec<(u32, Vec<Received>)>, ImapError> {
        let ctx = Arc::clone(&self.parse);
        let mailbox = self.mailbox.clone();
        let reply_domain = self.reply_domain.clone();
        let mails: Vec<(u32, Vec<u8>)> = fetched.into_iter().collect();
        let thread_ids = threads;
        tokio::task::spawn_blocking(move || {
            // Each original is synced to disk before it is handed over; a few
            // threads let those waits overlap. Results keep UID order.
            let threads = PARSE_THREADS.min(mails.len()).max(1);
            let per = mails.len().div_ceil(threads).max(1);
            let parse_one = |uid: u32, raw: &[u8]| -> Result<(u32, Vec<Received>), ImapError> {
                let extras = ServerExtras {
                    gmail_thread_id: thread_ids.get(&uid).copied(),
                    request_id: Some(format!("imap:{mailbox}:{uidvalidity}:{uid}")),
                    received_at: None,
                };
                let mut parsed = crate::parse::parse(raw, &ctx, &extras)
                    .map_err(|e| ImapError::Attachments(e.to_string()))?;
                // Sent to a reply address: that is the recipient threading
                // needs (rule 2), though it is none of the account's own.
                if let Some(to) = reply_domain
                    .as_deref()
                    .and_then(|d| reply_recipient(raw, d))
                {
                    parsed.envelope.to = to;
                }
                for w in &parsed.warnings {
                    tracing::debug!(uid, warning = %w, "mail parsed with a warning");
                }
                if let Some(error) = &parsed.parse_error {
                    tracing::warn!(uid, %error, "mail could not be parsed; kept as its original");
                }
                Ok((uid, parsed.into_records()))
            };
            std::thread::scope(|scope| {
                let workers: Vec<_> = mails
                    .chunks(per)
                    .map(|part| {
                        let parse_one = &parse_one;
                        scope.spawn(move || {
                            part.iter()
                                .map(|(uid, raw)| parse_one(*uid, raw))
                                .collect::<Result<Vec<_>, _>>()
                        })
                    })
                    .collect();
                let mut out = Vec::with_capacity(mails.len());
                for w in workers {
                    let part = w
                        .join()
                        .map_err(|_| ImapError::Attachments("a parser thread panicked".into()))??;
                    out.extend(part);
                }
                Ok(out)
            })
        })
        .await
        .map_err(|e| ImapError::Attachments(format!("parser task failed: {e}")))?
    }

    /// Hands records to the intake until it takes them: retried with
    /// backoff while the stream is unavailable; a refused batch is retried
    /// mail by mail and what is refused for good is logged and passed over
    /// (it stays in the mailbox's folder, acknowledged, and its original in
    /// the attachment store). `None` when shutdown came first.
    async fn hand_over(
        &self,
        records: Vec<(u32, Vec<Received>)>,
        shutdown: &watch::Receiver<bool>,
    ) -> Option<()> {
        if records.is_empty() {
            return Some(());
        }
        let all: Vec<Received> = records.iter().flat_map(|(_, r)| r.clone()).collect();
        match self.accept_retrying(all, shutdown).await? {
            Ok(()) => Some(()),
            Err(_) => {
                for (uid, recs) in records {
                    if let Err(error) = self.accept_retrying(recs, shutdown).await? {
                        tracing::error!(
                            account = %self.account, mailbox = %self.mailbox, uid, %error,
                            "mail refused by the stream; passed over"
                        );
                    }
                }
                Some(())
            }
        }
    }

    /// Accepts, retrying while unavailable. `Some(Err)` only for a refusal.
    async fn accept_retrying(
        &self,
        records: Vec<Received>,
        shutdown: &watch::Receiver<bool>,
    ) -> Option<Result<(), IntakeError>> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.intake.accept(records.clone()).await {
                Ok(()) => return Some(Ok(())),
                Err(e @ IntakeError::Refused(_)) => return Some(Err(e)),
                Err(error) => {
                    tracing::warn!(
                        account = %self.account, mailbox = %self.mailbox, %error,
                        retry_in_ms = delay.as_millis() as u64, "intake unavailable; retrying"
                    );
                    let mut stop = shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stopped(&mut stop) => return None,
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Marks the mails `\Seen`, or moves them.
    async fn acknowledge(
        &self,
        session: &mut Session,
        set: &str,
        can_move: bool,
        uidplus: bool,
    ) -> Result<(), ImapError> {
        let t = self.cfg.timeout;
        match &self.cfg.after {
            AfterAccept::Seen => {
                let stream = timed(
                    t,
                    "UID STORE",
                    session.uid_store(set, "+FLAGS.SILENT (\\Seen)"),
                )
                .await??;
                timed(t, "UID STORE", stream.try_collect::<Vec<_>>()).await??;
            }
            AfterAccept::Move(folder) if can_move => {
                timed(t, "UID MOVE", session.uid_mv(set, folder)).await??;
            }
            AfterAccept::Move(folder) => {
                timed(t, "UID COPY", session.uid_copy(set, folder)).await??;
                let stream = timed(
                    t,
                    "UID STORE",
                    session.uid_store(set, "+FLAGS.SILENT (\\Seen \\Deleted)"),
                )
                .await??;
                timed(t, "UID STORE", stream.try_collect::<Vec<_>>()).await??;
                if uidplus {
                    let stream = timed(t, "UID EXPUNGE", session.uid_expunge(set)).await??;
                    timed(t, "UID EXPUNGE", stream.try_collect::<Vec<_>>()).await??;
                } else {
                    // Without UIDPLUS, EXPUNGE also removes mail another
                    // client marked \Deleted in this folder.
                    let stream = timed(t, "EXPUNGE", session.expunge()).await??;
                    timed(t, "EXPUNGE", stream.try_collect::<Vec<_>>()).await??;
                }
            }
        }
        Ok(())
    }
}

/// The first `reply+TOKEN@domain` address in a mail's To or Cc.
pub(crate) fn reply_recipient(raw: &[u8], domain: &str) -> Option<switchboard_core::Identity> {
    let message = mail_parser::MessageParser::default().parse_headers(raw)?;
    let suffix = format!("@{}", domain.to_ascii_lowercase());
    [message.to(), message.cc()]
        .into_iter()
        .flatten()
        .flat_map(|a| a.iter())
        .filter_map(|a| a.address())
        .map(|a| a.trim().to_ascii_lowercase())
        .find(|a| a.starts_with("reply+") && a.ends_with(&suffix))
        .and_then(|a| {
            switchboard_core::Identity::new(switchboard_core::IdentityKind::Email, &a).ok()
        })
}

/// Resolves once shutdown is asked for (or nobody can ask any more).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    match rx.wait_for(|s| *s).await {
        Ok(_) | Err(_) => {}
    }
}

/// Says goodbye; a failure only means the connection is gone already.
async fn logout(session: &mut Session, t: Duration) {
    if let Ok(Err(e)) = timed(t, "LOGOUT", session.logout()).await {
        tracing::debug!(error = %e, "logout failed");
    }
}

async fn timed<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, ImapError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| ImapError::Timeout(format!("{what} after {limit:?}")))
}

/// The parse context of an account: its address and aliases, its
/// Message-ID domain, and the attachment store.
pub fn parse_context(cfg: &EmailConfig, account: &EmailAccount) -> ParseContext {
    ParseContext::new(
        account.address.clone(),
        account.message_id_domain.clone(),
        AttachmentStore::new(cfg.attachments_dir.clone(), cfg.max_attachment_bytes),
    )
    .with_addresses(&account.aliases)
}

/// One poller per mailbox of every account with IMAP settings.
pub fn pollers(
    cfg: &EmailConfig,
    intake: Arc<dyn Intake>,
    checkpoints: Arc<dyn Checkpoints>,
) -> Result<Vec<ImapPoller>, ImapError> {
    let mut out = Vec::new();
    for account in &cfg.accounts {
        let Some(imap) = &account.imap else { continue };
        let ctx = Arc::new(parse_context(cfg, account));
        let auth = Arc::new(Live::new(imap.auth.clone()));
        for mailbox in &imap.mailboxes {
            out.push(
                ImapPoller::new(
                    account,
                    mailbox,
                    Arc::clone(&ctx),
                    Arc::clone(&intake),
                    Arc::clone(&checkpoints),
                )?
                .with_credentials(Arc::clone(&auth)),
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gmail_thread_ids_are_read_from_fetch_responses() {
        use async_imap::imap_proto::Response;
        let parse_response = Response::parse;
        // As Gmail answers `UID FETCH 345 (UID X-GM-THRID)`.
        let line = b"* 12 FETCH (X-GM-THRID 1278455344230334865 UID 345)\r\n";
        let (_, resp) = parse_response(line).unwrap();
        let Response::Fetch(12, attrs) = resp else {
            panic!("not a fetch: {resp:?}")
        };
        assert_eq!(
            fetched_thread_id(&attrs),
            Some((345, 1_278_455_344_230_334_865))
        );
        let (_, resp) = parse_response(b"* 13 FETCH (UID 346)\r\n").unwrap();
        let Response::Fetch(_, attrs) = resp else {
            panic!()
        };
        assert_eq!(fetched_thread_id(&attrs), None, "no thread id, no entry");
    }

    #[test]
    fn uid_sets_are_compact() {
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8, 10]), "1:3,5,7:8,10");
        assert_eq!(uid_set(&[4]), "4");
        assert_eq!(uid_set(&[]), "");
        assert_eq!(uid_set(&[u32::MAX - 1, u32::MAX]), "4294967294:4294967295");
    }

    #[test]
    fn a_changed_uidvalidity_starts_over() {
        let cp = |v, u| {
            Some(MailboxCheckpoint {
                uidvalidity: v,
                last_uid: u,
            })
        };
        assert_eq!(start_uid(None, 7), (0, false));
        assert_eq!(start_uid(cp(7, 42), 7), (42, false));
        assert_eq!(start_uid(cp(6, 42), 7), (0, true));
    }

    #[test]
    fn xoauth2_initial_response_follows_the_spec() {
        // developers.google.com/gmail/imap/xoauth2-protocol
        assert_eq!(
            xoauth2_response(
                "someuser@example.com",
                "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
            ),
            "user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
        );
        let mut a = XOAuth2 {
            user: "u",
            token: "t",
            sent: false,
        };
        use async_imap::Authenticator as _;
        assert_eq!(a.process(b""), "user=u\x01auth=Bearer t\x01\x01");
        // The error challenge is answered empty, so the server ends with NO.
        assert_eq!(a.process(b"{\"status\":\"401\"}"), "");
    }

    #[test]
    fn a_reply_address_is_the_recipient() {
        let raw = b"From: ada@example.org\r\nTo: Support <reply+0190f0c2-0000-7000-8000-000000000001@Example.com>\r\nSubject: x\r\n\r\nhi\r\n";
        assert_eq!(
            reply_recipient(raw, "example.com").map(|i| i.value),
            Some("reply+0190f0c2-0000-7000-8000-000000000001@example.com".to_owned())
        );
        assert_eq!(reply_recipient(raw, "other.com"), None);
        let plain = b"From: ada@example.org\r\nTo: support@example.com\r\n\r\nhi\r\n";
        assert_eq!(reply_recipient(plain, "example.com"), None);
    }

    #[tokio::test]
    async fn memory_checkpoints_round_trip() {
        let c = MemoryCheckpoints::default();
        assert_eq!(c.load("a", "INBOX").await.unwrap(), None);
        let cp = MailboxCheckpoint {
            uidvalidity: 3,
            last_uid: 9,
        };
        c.save("a", "INBOX", cp).await.unwrap();
        assert_eq!(c.load("a", "INBOX").await.unwrap(), Some(cp));
        assert_eq!(c.load("a", "Other").await.unwrap(), None);
    }
}
