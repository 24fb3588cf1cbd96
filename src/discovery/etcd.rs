//! The etcd session, written once: how weir connects to etcd, bounds its
//! requests, backs off, lists a prefix and follows it.
//!
//! Every etcd user goes through here: the endpoint watch, the policy watch,
//! the lease poller and the registration agent. [`follow`] is the one
//! list → watch → resume loop: it lists a prefix (paged, at one revision),
//! watches from `revision + 1`, resumes after an error from the last
//! revision its [`Follower`] applied, and lists again — handed over as one
//! reset — when that history is gone: compacted, a different cluster, or a
//! revision that went backwards (etcd wiped or restored from a backup).
//! Only progress etcd confirms (events, progress notifications) ever moves
//! a follower's position.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions};
use tokio_util::sync::CancellationToken;

/// Listing page size, in keys, to start with; halved while a page is too
/// large to decode (values of up to etcd's request limit each).
const LIST_PAGE: i64 = 1000;

/// The largest response weir decodes from etcd: a page of one value of etcd's
/// largest configurable request size, with room to spare. (The client's own
/// default, 4 MiB, is below three 1.5 MiB values: a listing of a prefix
/// holding those never completed.)
const DECODE_LIMIT: usize = 64 << 20;

/// How to reach etcd: its endpoints, TLS material and credentials.
#[derive(Clone, Debug, Default)]
pub struct EtcdAccess {
    pub endpoints: Vec<String>,
    /// CA certificate(s) (PEM) the members' certificates must chain to;
    /// needed for `https://` endpoints.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd user; its password comes from `password_file` or else the
    /// `WEIR_ETCD_PASSWORD` environment variable, never from the config.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// The environment variable a password is read from without a file.
pub const PASSWORD_ENV: &str = "WEIR_ETCD_PASSWORD";

impl EtcdAccess {
    pub fn new(endpoints: Vec<String>) -> EtcdAccess {
        EtcdAccess {
            endpoints,
            ..EtcdAccess::default()
        }
    }

    /// Whether the settings can be used at all (files readable, a password
    /// where a username is): mistakes to report at start, not retry.
    pub fn check(&self) -> Result<(), EtcdError> {
        self.tls()?;
        if self.username.is_some() {
            self.password()?;
        }
        Ok(())
    }

    fn tls(&self) -> Result<Option<etcd_client::TlsOptions>, EtcdError> {
        let https = self.endpoints.iter().any(|e| e.starts_with("https://"));
        if !https {
            if self.ca.is_some() || self.cert.is_some() {
                return Err(EtcdError::Access(
                    "[etcd] ca and cert apply to https:// endpoints; the endpoints are http://"
                        .into(),
                ));
            }
            return Ok(None);
        }
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| {
                EtcdError::Access(format!("reading [etcd] {what} {}: {e}", path.display()))
            })
        };
        let ca = self.ca.as_deref().ok_or_else(|| {
            EtcdError::Access("https:// etcd endpoints need [etcd] ca (--ca)".into())
        })?;
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read("ca", ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(etcd_client::Identity::from_pem(
                    read("cert", cert)?,
                    read("key", key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(EtcdError::Access(
                    "[etcd] cert and key go together (--cert, --key)".into(),
                ))
            }
        }
        Ok(Some(tls))
    }

    fn password(&self) -> Result<String, EtcdError> {
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                EtcdError::Access(format!(
                    "reading [etcd] password_file {}: {e}",
                    path.display()
                ))
            })?;
            return Ok(text.trim_end_matches(['\r', '\n']).to_owned());
        }
        std::env::var(PASSWORD_ENV).map_err(|_| {
            EtcdError::Access(format!(
                "[etcd] username is set: its password comes from password_file (--password-file) or ${PASSWORD_ENV}"
            ))
        })
    }
}

/// A client for `access`. Without credentials the connection is lazy: this
/// succeeds while etcd is down. With a username it authenticates first, so
/// it fails while etcd cannot be reached (see [`connect_until`]).
///
/// HTTP/2 pings go every 10 s: etcd cuts streams of clients that ping more
/// often than its `--grpc-keepalive-min-time` (5 s by default). Every
/// request requires a leader: a member cut off from its quorum refuses
/// (and cancels its watches) rather than serve a view frozen in the past.
pub async fn connect(access: &EtcdAccess) -> Result<Client, EtcdError> {
    connect_to(access, &access.endpoints).await
}

/// [`connect`] on `endpoints`, some of `access`'s (the TLS settings are
/// those of the whole list).
async fn connect_to(access: &EtcdAccess, endpoints: &[String]) -> Result<Client, EtcdError> {
    let mut options = etcd_client::ConnectOptions::new()
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true)
        .with_connect_timeout(Duration::from_secs(3));
    let tls = access.tls()?;
    let over_tls = tls.is_some();
    if let Some(tls) = tls {
        options = options.with_tls(tls);
    }
    if let Some(user) = &access.username {
        // Tokens expire (etcd's --auth-token-ttl): one refused is renewed.
        options = options
            .with_user(user.clone(), access.password()?)
            .with_auto_token_refresh(true);
    }
    Client::connect(endpoints, Some(options))
        .await
        .map_err(|err| {
            // A refused handshake shows as a lost connection, not as TLS.
            let lost = match &err {
                etcd_client::Error::TransportError(_) => true,
                etcd_client::Error::GRpcStatus(s) => matches!(
                    s.code(),
                    tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Unavailable
                ),
                _ => false,
            };
            if over_tls && lost {
                EtcdError::OverTls(err)
            } else {
                EtcdError::Request(err)
            }
        })
}

/// A client on the first of `access.endpoints` that answers (a command's
/// few requests then go to a member that is up: the balanced channel would
/// send some to a stopped one). With one endpoint, [`connect`].
pub async fn connect_answering(access: &EtcdAccess) -> Result<Client, EtcdError> {
    if access.endpoints.len() < 2 {
        return connect(access).await;
    }
    let mut last = None;
    for endpoint in &access.endpoints {
        match connect_to(access, std::slice::from_ref(endpoint)).await {
            Ok(mut client) => match bounded(Duration::from_secs(3), client.status()).await {
                Ok(_) => return Ok(client),
                Err(err) => last = Some(err),
            },
            Err(err @ EtcdError::Access(_)) => return Err(err),
            Err(err) => last = Some(err),
        }
    }
    Err(last.expect("two endpoints or more were tried"))
}

/// [`connect`], tried again with backoff while etcd cannot be reached (a
/// client with credentials must reach it to authenticate); `None` once
/// `cancel` fires. A mistake in the settings themselves is not retried.
pub async fn connect_until(access: &EtcdAccess, cancel: &CancellationToken) -> Option<Client> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match connect(access).await {
            Ok(client) => return Some(client),
            Err(err @ EtcdError::Access(_)) => {
                tracing::error!(cause = %err, "etcd settings unusable; not connecting");
                cancel.cancelled().await;
                return None;
            }
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(cause = %crate::errors::chain(&err), retry_in = ?delay, "cannot connect to etcd");
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Why an etcd request gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd request failed: {0}{hint}", hint = hint(.0))]
    Request(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Access(String),
    #[error("cannot reach etcd over TLS: {0} (etcd may have refused the client certificate, [etcd] cert and key, or its own certificate did not verify against [etcd] ca)")]
    OverTls(etcd_client::Error),
}

impl EtcdError {
    /// Worth another try in a moment: no answer, a member down, a leader
    /// being elected.
    pub fn is_transient(&self) -> bool {
        match self {
            EtcdError::Timeout(_) => true,
            EtcdError::Request(etcd_client::Error::TransportError(_)) => true,
            EtcdError::Request(etcd_client::Error::GRpcStatus(status)) => matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ),
            _ => false,
        }
    }

    /// etcd refused the credentials or the permission: trying again
    /// changes nothing until someone changes the settings or the roles.
    pub fn is_refused(&self) -> bool {
        let EtcdError::Request(etcd_client::Error::GRpcStatus(status)) = self else {
            return false;
        };
        status.code() == tonic::Code::PermissionDenied
            || status.message().contains("authentication failed")
    }
}

/// What an etcd error most likely means, for the operator reading it.
fn hint(err: &etcd_client::Error) -> &'static str {
    let text = crate::errors::chain(err).to_lowercase();
    let status = match err {
        etcd_client::Error::GRpcStatus(status) => Some(status.code()),
        _ => None,
    };
    if text.contains("authentication failed") || text.contains("invalid auth token") {
        " (authentication failed: check [etcd] username and password_file, or --username and --password-file)"
    } else if status == Some(tonic::Code::PermissionDenied) || text.contains("permission denied") {
        " (permission denied: the etcd user's role does not grant this on the key)"
    } else if text.contains("certificate") || text.contains("alert") || text.contains("tls") {
        " (TLS: a certificate was refused; check [etcd] ca, cert and key against the cluster's)"
    } else if status == Some(tonic::Code::Unauthenticated) {
        " (etcd requires authentication: set [etcd] username)"
    } else {
        ""
    }
}

/// Runs one etcd request, giving up after `limit`.
pub async fn bounded<T>(
    limit: Duration,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    tokio::time::timeout(limit, request)
        .await
        .map_err(|_| EtcdError::Timeout(limit))?
        .map_err(EtcdError::from)
}

/// Capped exponential backoff with full jitter.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    pub fn next_delay(&mut self) -> Duration {
        let cap = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rand::random_range(0.5..=1.0);
        cap.mul_f64(jitter)
    }
}

/// Where in an etcd cluster's history a follower stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub cluster_id: u64,
    pub revision: i64,
}

/// One key-value change, independent of the etcd client's types.
#[derive(Clone, Copy, Debug)]
pub enum KvChange<'a> {
    Put {
        key: &'a [u8],
        value: &'a [u8],
        lease: i64,
        /// The key's mod revision: a new put, even of the same value, has a new one.
        revision: i64,
    },
    Delete {
        key: &'a [u8],
    },
}

/// A key-value as listed.
#[derive(Clone, Copy, Debug)]
pub struct Kv<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub lease: i64,
    /// The key's mod revision.
    pub revision: i64,
}

/// Why a prefix is listed (again) rather than resumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relist {
    /// Nothing was listed yet.
    Start,
    /// The revision to resume from was compacted away.
    Compacted,
    /// etcd answers with another cluster id (a new cluster, or a restore).
    ClusterChanged,
    /// etcd's revision is behind the follower's (wiped, or restored from a backup).
    RevisionBackwards,
}

impl Relist {
    pub fn as_str(self) -> &'static str {
        match self {
            Relist::Start => "start",
            Relist::Compacted => "compacted",
            Relist::ClusterChanged => "cluster_changed",
            Relist::RevisionBackwards => "revision_backwards",
        }
    }
}

/// What keeps a picture of one prefix: told a full listing as a reset, then
/// each batch of changes, and every position etcd confirms.
pub trait Follower: Send + Sync {
    /// The position the picture reflects; `None` forces a listing.
    fn position(&self) -> Option<Position>;
    /// Replaces the picture with a full listing taken at `at`.
    fn reset(&self, kvs: &[Kv<'_>], at: Position, reason: Relist);
    /// Applies one batch of watched changes; `at` is its newest revision.
    fn apply(&self, changes: &[KvChange<'_>], at: Position);
    /// etcd confirmed that every change up to `at` has been delivered.
    fn advance_to(&self, at: Position);
    /// The position is no longer worth resuming from: list next time.
    fn forget_position(&self);
    /// The watch was established (`true`) or its session ended (`false`).
    fn watching(&self, _established: bool) {}
    /// etcd answered on the watch (an event, a progress notification).
    fn heard(&self) {}
}

/// How a follower's sessions are run.
#[derive(Clone, Copy, Debug)]
pub struct FollowSettings {
    /// Bound on every request of a session: connecting (with credentials,
    /// authenticating), the probe, each listing page, creating the watch.
    pub request_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often the watch asks etcd to confirm its progress. A watch that
    /// heard nothing since the last ask (the member froze, or lost its
    /// network) is given up and resumed, on another member if need be.
    pub progress_interval: Duration,
}

impl Default for FollowSettings {
    fn default() -> Self {
        FollowSettings {
            request_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            progress_interval: Duration::from_secs(5),
        }
    }
}

/// Why a watch session ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("watch start revision {requested} was compacted (oldest kept: {compacted})")]
    Compacted { requested: i64, compacted: i64 },
    #[error("etcd cancelled the watch: {0}")]
    Cancelled(String),
    #[error("etcd closed the watch stream")]
    Closed,
    #[error("etcd response without a header")]
    NoHeader,
    #[error(
        "the watch heard nothing for {0:?}, though asked for progress: etcd member unresponsive"
    )]
    Silent(Duration),
}

impl From<etcd_client::Error> for WatchError {
    fn from(err: etcd_client::Error) -> Self {
        WatchError::Etcd(EtcdError::Request(err))
    }
}

enum Never {}

/// Keeps `follower` in step with the keys under `prefix` until `cancel`;
/// keys under `prefix` + `exclude` are neither listed nor handed over
/// (reserved names another follower reads).
///
/// Each session talks to one member of `access`'s endpoints and a failed
/// one moves to the next (see `MemberCursor`).
pub async fn follow<F: Follower>(
    access: &EtcdAccess,
    prefix: &str,
    exclude: Option<&str>,
    settings: FollowSettings,
    follower: &F,
    cancel: &CancellationToken,
) {
    let excluded = exclude.map(|e| format!("{prefix}{e}"));
    let excluded = excluded.as_deref();
    let mut members = MemberCursor::new(access);
    let mut backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
    let mut why_unpositioned = Relist::Start;
    // The highest store revision etcd has shown this follower (probes and
    // every watch response, progress answers included): a reconnect to a
    // history below it is a wiped or restored etcd, even when the new
    // history has already passed the last event under `prefix`.
    let seen = AtomicI64::new(0);
    loop {
        let ended = tokio::select! {
            _ = cancel.cancelled() => return,
            ended = async {
                let client = members.client(settings.request_timeout).await?;
                session(client, prefix, excluded, settings, follower, why_unpositioned, &mut backoff, &seen).await
            } => ended,
        };
        let err = match ended {
            Ok(never) => match never {},
            Err(err) => err,
        };
        follower.watching(false);
        let member = members.current().to_owned();
        let delay = if let WatchError::Compacted { .. } = err {
            // The history we would resume from is gone, on every member:
            // list again at once, here.
            follower.forget_position();
            why_unpositioned = Relist::Compacted;
            Duration::ZERO
        } else {
            members.move_on();
            backoff.next_delay()
        };
        let cause = crate::errors::chain(&err);
        let next = members.current();
        if let WatchError::Etcd(EtcdError::Access(_)) = err {
            // Checked at start: a file of the settings went missing since.
            tracing::error!(prefix, member, next, %cause, retry_in = ?delay, "etcd settings unusable; trying again");
        } else {
            tracing::warn!(prefix, member, next, %cause, retry_in = ?delay, "etcd watch session ended; resuming");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// The one member of the cluster a follower's session talks to, and the
/// next one after a session fails.
///
/// A client on all the endpoints spreads a session's requests over every
/// member, one that froze or lost its network included: its connection
/// looks ready until HTTP/2 keep-alive gives up (15 s), so a third of the
/// requests of every attempt went on timing out there. On one member, a
/// failed session (a request timed out, the watch went silent, the member
/// has no leader) moves to the next, and a whole session's probe, listing
/// and watch are answered by the same member. The first member is picked
/// at random, so a fleet of gateways spreads its watches over the cluster.
/// Each member's client is kept for when the turn comes back to it (with
/// credentials, connecting authenticates: once per member, not per session).
struct MemberCursor<'a> {
    access: &'a EtcdAccess,
    at: usize,
    clients: Vec<Option<Client>>,
}

impl<'a> MemberCursor<'a> {
    fn new(access: &'a EtcdAccess) -> Self {
        let members = access.endpoints.len().max(1);
        MemberCursor {
            access,
            at: rand::random_range(0..members),
            clients: vec![None; members],
        }
    }

    /// The endpoint sessions go to now.
    fn current(&self) -> &str {
        self.access
            .endpoints
            .get(self.at)
            .map_or("", String::as_str)
    }

    /// A client on the current member. With credentials, connecting
    /// authenticates there (within `limit`), so this fails while the member
    /// cannot be reached.
    async fn client(&mut self, limit: Duration) -> Result<Client, EtcdError> {
        if let Some(client) = &self.clients[self.at] {
            return Ok(client.clone());
        }
        let member = self.access.endpoints.get(self.at).cloned();
        let connecting = connect_to(self.access, member.as_slice());
        let client = tokio::time::timeout(limit, connecting)
            .await
            .map_err(|_| EtcdError::Timeout(limit))??;
        self.clients[self.at] = Some(client.clone());
        Ok(client)
    }

    /// The next session goes to the next member (with one, to it again).
    fn move_on(&mut self) {
        self.at = (self.at + 1) % self.clients.len();
    }
}

/// One session: resume or list, then follow the watch until it fails.
#[allow(clippy::too_many_arguments)]
async fn session<F: Follower>(
    mut client: Client,
    prefix: &str,
    excluded: Option<&str>,
    settings: FollowSettings,
    follower: &F,
    why_unpositioned: Relist,
    backoff: &mut Backoff,
    seen: &AtomicI64,
) -> Result<Never, WatchError> {
    let start = resume_or_list(
        &mut client,
        prefix,
        excluded,
        settings,
        follower,
        why_unpositioned,
        seen,
    )
    .await?;
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(start)
        .with_progress_notify();
    let mut watcher = client
        .watch_client()
        .max_decoding_message_size(DECODE_LIMIT);
    let stream = bounded(
        settings.request_timeout,
        watcher.watch(prefix, Some(options)),
    )
    .await?;
    follower.watching(true);
    follower.heard();
    backoff.reset();
    watch_events(
        stream,
        start,
        excluded,
        settings.progress_interval,
        follower,
        seen,
    )
    .await
}

/// The revision to watch from: right after the follower's position when
/// etcd still has that history, else after a fresh listing handed over as
/// a reset.
async fn resume_or_list<F: Follower>(
    client: &mut Client,
    prefix: &str,
    excluded: Option<&str>,
    settings: FollowSettings,
    follower: &F,
    why_unpositioned: Relist,
    seen: &AtomicI64,
) -> Result<i64, WatchError> {
    let now = probe(client, prefix, settings.request_timeout).await?;
    // A probe is a linearizable read: never below a revision the cluster
    // has shown, unless the history is another one.
    let shown = seen.swap(now.revision, Ordering::Relaxed);
    let reason = match follower.position() {
        Some(at) if at.cluster_id != now.cluster_id => Relist::ClusterChanged,
        Some(at) if at.revision.max(shown) > now.revision => Relist::RevisionBackwards,
        Some(at) => return Ok(at.revision + 1),
        None if shown > now.revision => Relist::RevisionBackwards,
        None => why_unpositioned,
    };
    let listed = match excluded {
        None => list_at(client, prefix, now.revision, settings.request_timeout).await?,
        Some(excluded) => {
            // The two ranges around the excluded names, at one revision.
            let mut before = list_range(
                client,
                prefix.as_bytes(),
                excluded.as_bytes(),
                now.revision,
                settings.request_timeout,
            )
            .await?;
            let after = list_range(
                client,
                &prefix_end(excluded.as_bytes()),
                &prefix_end(prefix.as_bytes()),
                now.revision,
                settings.request_timeout,
            )
            .await?;
            before.extend(after);
            before
        }
    };
    tracing::info!(
        prefix,
        reason = reason.as_str(),
        revision = now.revision,
        keys = listed.len(),
        "listed etcd prefix"
    );
    let kvs: Vec<Kv<'_>> = listed
        .iter()
        .map(|kv| Kv {
            key: kv.key(),
            value: kv.value(),
            lease: kv.lease(),
            revision: kv.mod_revision(),
        })
        .collect();
    follower.reset(&kvs, now, reason);
    Ok(now.revision + 1)
}

/// The cluster and its current revision, from a one-key read.
async fn probe(
    client: &mut Client,
    prefix: &str,
    timeout: Duration,
) -> Result<Position, WatchError> {
    let options = GetOptions::new()
        .with_prefix()
        .with_keys_only()
        .with_limit(1);
    let probe = bounded(timeout, client.get(prefix, Some(options))).await?;
    let head = probe.header().ok_or(WatchError::NoHeader)?;
    Ok(Position {
        cluster_id: head.cluster_id(),
        revision: head.revision(),
    })
}

/// Hands each batch of events to the follower until the stream fails, and
/// asks for progress every `progress_interval`: when nothing at all came
/// back since the last ask, the member is taken as gone silent.
async fn watch_events<F: Follower>(
    stream: etcd_client::WatchStream,
    start: i64,
    excluded: Option<&str>,
    progress_interval: Duration,
    follower: &F,
    seen: &AtomicI64,
) -> Result<Never, WatchError> {
    let (mut requests, mut responses) = stream.split();
    let mut ask = tokio::time::interval(progress_interval);
    ask.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ask.tick().await; // the first tick is immediate
    let mut heard_since_ask = true;
    let mut asked_at = tokio::time::Instant::now();
    loop {
        let message = tokio::select! {
            message = responses.message() => message,
            _ = ask.tick() => {
                if !heard_since_ask {
                    return Err(WatchError::Silent(asked_at.elapsed()));
                }
                heard_since_ask = false;
                asked_at = tokio::time::Instant::now();
                requests.request_progress().await?;
                continue;
            }
        };
        let Some(resp) = message? else {
            return Err(WatchError::Closed);
        };
        heard_since_ask = true;
        follower.heard();
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return Err(WatchError::Compacted {
                    requested: start,
                    compacted: resp.compact_revision(),
                });
            }
            return Err(WatchError::Cancelled(resp.cancel_reason().to_owned()));
        }
        let Some(header) = resp.header() else {
            return Err(WatchError::NoHeader);
        };
        seen.fetch_max(header.revision(), Ordering::Relaxed);
        let cluster_id = header.cluster_id();
        let events = resp.events();
        if events.is_empty() {
            // Creation ack, or a progress notification of this watch: every
            // event up to the header revision has been delivered. An answer
            // to our progress request (watch id -1) proves the member alive
            // but, on etcd before 3.5.8, not that this watch caught up: it
            // does not move the position.
            if !resp.created() && resp.watch_id() != -1 {
                follower.advance_to(Position {
                    cluster_id,
                    revision: header.revision(),
                });
            }
            continue;
        }
        let mut revision = 0;
        let changes: Vec<KvChange<'_>> = events
            .iter()
            .filter_map(|ev| {
                let kv = ev.kv()?;
                revision = revision.max(kv.mod_revision());
                if excluded.is_some_and(|e| kv.key().starts_with(e.as_bytes())) {
                    return None;
                }
                Some(match ev.event_type() {
                    EventType::Put => KvChange::Put {
                        key: kv.key(),
                        value: kv.value(),
                        lease: kv.lease(),
                        revision: kv.mod_revision(),
                    },
                    EventType::Delete => KvChange::Delete { key: kv.key() },
                })
            })
            .collect();
        follower.apply(
            &changes,
            Position {
                cluster_id,
                revision,
            },
        );
    }
}

/// Lists every key under `prefix` at `revision`, a page at a time.
pub async fn list_at(
    client: &mut Client,
    prefix: &str,
    revision: i64,
    timeout: Duration,
) -> Result<Vec<KeyValue>, EtcdError> {
    list_range(
        client,
        prefix.as_bytes(),
        &prefix_end(prefix.as_bytes()),
        revision,
        timeout,
    )
    .await
}

/// Lists the keys in `[from, end)` at `revision`, a page at a time, so no
/// response need be larger than the decode limit: a page too large to
/// decode (big values) is asked for again at half the size.
async fn list_range(
    client: &Client,
    from: &[u8],
    end: &[u8],
    revision: i64,
    timeout: Duration,
) -> Result<Vec<KeyValue>, EtcdError> {
    let mut kv = client.kv_client().max_decoding_message_size(DECODE_LIMIT);
    let mut from = from.to_vec();
    let mut page = LIST_PAGE;
    let mut all = Vec::new();
    loop {
        let options = GetOptions::new()
            .with_range(end.to_vec())
            .with_revision(revision)
            .with_limit(page);
        let mut resp = match bounded(timeout, kv.get(from.clone(), Some(options))).await {
            Err(err) if page > 1 && too_large(&err) => {
                page /= 2;
                tracing::debug!(page, cause = %err, "etcd listing page too large; asking for fewer keys");
                continue;
            }
            other => other?,
        };
        let more = resp.more();
        let kvs = resp.take_kvs();
        let Some(last) = kvs.last() else { break };
        from = last.key().to_vec();
        from.push(0);
        all.extend(kvs);
        if !more {
            break;
        }
    }
    Ok(all)
}

/// A response over the decode limit (or over etcd's own send limit).
fn too_large(err: &EtcdError) -> bool {
    let EtcdError::Request(etcd_client::Error::GRpcStatus(status)) = err else {
        return false;
    };
    matches!(
        status.code(),
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
    ) || status.message().contains("too large")
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_session_moves_through_every_member_in_turn() {
        let endpoints: Vec<String> = (1..=3).map(|p| format!("http://127.0.0.1:{p}")).collect();
        let access = EtcdAccess::new(endpoints.clone());
        let mut members = MemberCursor::new(&access);
        let mut visited = vec![members.current().to_owned()];
        for _ in 0..3 {
            members.move_on();
            visited.push(members.current().to_owned());
        }
        assert_eq!(visited[3], visited[0], "back to the first after a round");
        visited.truncate(3);
        visited.sort();
        assert_eq!(visited, endpoints, "each member once a round");

        let lone = EtcdAccess::new(vec!["http://127.0.0.1:1".into()]);
        let mut members = MemberCursor::new(&lone);
        members.move_on();
        assert_eq!(members.current(), "http://127.0.0.1:1");
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/svc/"), b"/svc0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(delays[7] >= Duration::from_millis(500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
