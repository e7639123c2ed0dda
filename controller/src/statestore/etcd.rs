//! The etcd store: keys under a prefix on an etcd cluster, leadership by etcd's election API
//! on a lease this store keeps alive. For several controllers (one leads, the others wait).
//!
//! The election lives under the prefix too (its name is `PREFIX` + `leader`, so its keys are
//! `PREFIX` + `leader/…`): the controller's own keys must stay out of `leader/`.

use std::fmt;
use std::future::Future;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, Identity,
    LeaseClient, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tracing::{info, warn};

use super::{Leadership, StateStore, StateStoreError, WatchEvent};

/// How long connecting to etcd may take before the store reports it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one operation may take (a campaign waits for leadership without this limit).
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on the connection, so a dead etcd ends watches and campaigns. etcd refuses
/// pings more often than every 5 s by default.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Events a watch may have waiting for its receiver; beyond that the etcd stream waits.
const WATCH_BUFFER: usize = 1024;

/// The state store on etcd. See the module docs.
///
/// Leadership rests on a lease granted by [`StateStore::campaign`] and kept alive by a background
/// task. [`EtcdStore::resign`] revokes it; dropping the store stops the keep-alive and revokes
/// it in the background (when a Tokio runtime is still running; otherwise etcd lets it expire
/// after its TTL). Either way the next candidate's campaign then returns.
pub struct EtcdStore {
    client: Client,
    /// The endpoints, comma-separated, for messages.
    urls: String,
    /// Ends with `/` (or is empty).
    prefix: String,
    lease_ttl_secs: i64,
    session: Mutex<Option<Session>>,
}

/// How the controller proves itself to etcd, and knows etcd: plaintext by default; TLS with
/// the CA that signed etcd's certificate (`--etcd-ca`, with `https://` endpoints), a client
/// certificate for etcd's `--client-cert-auth` (`--etcd-cert`/`--etcd-key`), and a user for
/// etcd's role-based auth (`--etcd-user`, its password from a file).
#[derive(Clone, Default)]
pub struct EtcdSecurity {
    /// PEM of the CA that signed etcd's server certificate.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM certificate and key the controller presents to etcd.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// User name and password for etcd's auth.
    pub user: Option<(String, String)>,
}

impl fmt::Debug for EtcdSecurity {
    /// Never prints the key or the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdSecurity")
            .field("tls", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity_pem.is_some())
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .finish()
    }
}

impl EtcdSecurity {
    /// Checks the options against the endpoints: TLS needs `https://` endpoints and a CA, a
    /// client certificate needs TLS, and `https://` endpoints need a CA (no system roots: a
    /// cluster's etcd is signed by its own CA).
    fn check(&self, endpoints: &[String]) -> Result<(), StateStoreError> {
        let https = endpoints.iter().filter(|e| e.starts_with("https://")).count();
        let bad = |why: String| Err(StateStoreError::Backend(why));
        if https > 0 && https < endpoints.len() {
            return bad("the etcd endpoints mix http:// and https://; use one scheme".into());
        }
        match (self.ca_pem.is_some(), https > 0) {
            (true, false) => {
                return bad("--etcd-ca is set but the etcd endpoints are http://; give https:// ones".into());
            }
            (false, true) => {
                return bad(
                    "the etcd endpoints are https://: pass --etcd-ca, the CA that signed etcd's certificate".into()
                );
            }
            _ => {}
        }
        if self.identity_pem.is_some() && self.ca_pem.is_none() {
            return bad("--etcd-cert needs TLS: pass --etcd-ca and https:// endpoints".into());
        }
        Ok(())
    }

    fn apply(&self, mut options: ConnectOptions) -> ConnectOptions {
        if let Some(ca) = &self.ca_pem {
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
            if let Some((cert, key)) = &self.identity_pem {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        if let Some((name, password)) = &self.user {
            options = options.with_user(name.clone(), password.clone());
        }
        options
    }
}

/// The lease behind the current campaign and the task keeping it alive.
struct Session {
    lease_id: i64,
    lost: watch::Sender<bool>,
    keeper: JoinHandle<()>,
    /// Once leading: this candidate's election key and the revision that created it. Every
    /// write is conditioned on that key still existing at that revision, so a leader whose
    /// lease ran out (paused, partitioned) can no longer write once another leads.
    leader_key: Option<(Vec<u8>, i64)>,
}

impl Session {
    fn end(self) -> i64 {
        self.keeper.abort();
        self.lost.send_replace(true);
        self.lease_id
    }
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("urls", &self.urls)
            .field("prefix", &self.prefix)
            .field("lease_ttl_secs", &self.lease_ttl_secs)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding the lock; if something did, the data is still whole.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// etcd's error in one line: gRPC statuses by their message and cause, without metadata.
fn error_line(e: &etcd_client::Error) -> String {
    let mut line = match e {
        etcd_client::Error::GRpcStatus(s) => format!("{} ({:?})", s.message(), s.code()),
        e => e.to_string(),
    };
    let mut source = match e {
        etcd_client::Error::GRpcStatus(s) => std::error::Error::source(s),
        e => std::error::Error::source(e),
    };
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether etcd could not be reached (as opposed to refusing the request).
fn is_unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)
                // A connection that broke under the call.
                || (s.code() == tonic::Code::Unknown
                    && ["transport error", "connection error", "broken pipe"].iter().any(|w| s.message().contains(w)))
        }
        _ => false,
    }
}

/// `/gantry` and `/gantry/` both mean the keys under `/gantry/`.
fn normalize_prefix(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('/') { prefix.to_string() } else { format!("{prefix}/") }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` and checks that it answers. Keys go under `prefix`
    /// (a missing trailing `/` is added); leases for leadership last `lease_ttl_secs`.
    ///
    /// `Unavailable`, naming the endpoints and etcd's error, when no endpoint answers within
    /// a few seconds.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        lease_ttl_secs: i64,
        security: &EtcdSecurity,
    ) -> Result<EtcdStore, StateStoreError> {
        if endpoints.is_empty() {
            return Err(StateStoreError::Unavailable("no etcd endpoint given: pass --etcd URL".into()));
        }
        if lease_ttl_secs < 1 {
            return Err(StateStoreError::Backend(format!(
                "the etcd lease must last at least 1 second, not {lease_ttl_secs}"
            )));
        }
        security.check(endpoints)?;
        let urls = endpoints.join(",");
        let unreachable = |why: String| {
            StateStoreError::Unavailable(format!("cannot reach etcd at {urls}: {why}; is etcd running there (--etcd)?"))
        };
        let options = security.apply(
            ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT).with_keep_alive(PING_INTERVAL, PING_TIMEOUT),
        );
        let no_answer = || unreachable(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()));
        let client = match timeout(CONNECT_TIMEOUT, Client::connect(endpoints, Some(options))).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(unreachable(error_line(&e))),
            Err(_) => return Err(no_answer()),
        };
        let prefix = normalize_prefix(prefix);
        // The client connects lazily: one small read proves etcd answers.
        let mut kv = client.kv_client();
        let probe = kv.get(prefix.as_str(), Some(GetOptions::new().with_prefix().with_count_only()));
        match timeout(CONNECT_TIMEOUT, probe).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(unreachable(error_line(&e))),
            Err(_) => return Err(no_answer()),
        }
        info!(etcd = %urls, prefix = %prefix, lease_ttl_secs, "connected to etcd");
        Ok(EtcdStore { client, urls, prefix, lease_ttl_secs, session: Mutex::new(None) })
    }

    /// Ends this store's leadership (or candidacy) now: stops the keep-alive and revokes the
    /// lease, which deletes its election key, so the next candidate leads at once. The
    /// [`Leadership`]'s `lost` turns true. Does nothing when this store never campaigned.
    pub async fn resign(&self) -> Result<(), StateStoreError> {
        let Some(session) = lock(&self.session).take() else {
            return Ok(());
        };
        let lease_id = session.end();
        let mut lease = self.client.lease_client();
        self.timed("revoke the leadership lease", lease.revoke(lease_id)).await.map(|_| ())
    }

    /// The key in etcd for the store key `key`.
    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn election_name(&self) -> String {
        self.full("leader")
    }

    /// Runs one etcd call under [`OP_TIMEOUT`]; `what` names it in the error.
    async fn timed<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StateStoreError> {
        match timeout(OP_TIMEOUT, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.failed(what, &e)),
            Err(_) => Err(StateStoreError::Unavailable(format!(
                "etcd at {}: {what}: no answer within {} s",
                self.urls,
                OP_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Runs a write, conditioned (once this store leads) on its election key still being the
    /// one its campaign created; returns the keys deleted (for a delete).
    async fn fenced(&self, what: &str, op: TxnOp) -> Result<i64, StateStoreError> {
        let fence = lock(&self.session).as_ref().and_then(|s| s.leader_key.clone());
        let mut txn = Txn::new();
        if let Some((key, rev)) = &fence {
            txn = txn.when(vec![Compare::create_revision(key.clone(), CompareOp::Equal, *rev)]);
        }
        let mut kv = self.client.kv_client();
        let resp = self.timed(what, kv.txn(txn.and_then(vec![op]))).await?;
        if !resp.succeeded() {
            warn!(etcd = %self.urls, "refused a write: this controller no longer leads");
            return Err(StateStoreError::Busy(format!(
                "etcd at {}: {what}: refused, this controller no longer leads (its leadership lease ran out and its election key is gone)",
                self.urls
            )));
        }
        Ok(resp
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Delete(d) => d.deleted(),
                _ => 0,
            })
            .sum())
    }

    fn failed(&self, what: &str, e: &etcd_client::Error) -> StateStoreError {
        let line = format!("etcd at {}: {what} failed: {}", self.urls, error_line(e));
        if is_unreachable(e) { StateStoreError::Unavailable(line) } else { StateStoreError::Backend(line) }
    }
}

/// The store key for the etcd key `key` under `prefix`.
fn relative(key: &[u8], prefix: &str) -> String {
    String::from_utf8_lossy(key.strip_prefix(prefix.as_bytes()).unwrap_or(key)).into_owned()
}

#[async_trait]
impl StateStore for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd ({}, prefix {})", self.urls, self.prefix)
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateStoreError> {
        let mut kv = self.client.kv_client();
        let mut resp = self.timed(&format!("get {key}"), kv.get(self.full(key), None)).await?;
        Ok(resp.take_kvs().into_iter().next().map(|kv| kv.into_key_value().1))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateStoreError> {
        let mut kv = self.client.kv_client();
        // etcd returns a range in key order unless asked otherwise.
        let options = GetOptions::new().with_prefix();
        let mut resp = self.timed(&format!("list {prefix}"), kv.get(self.full(prefix), Some(options))).await?;
        Ok(resp
            .take_kvs()
            .into_iter()
            .map(|kv| {
                let (key, value) = kv.into_key_value();
                (relative(&key, &self.prefix), value)
            })
            .collect())
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StateStoreError> {
        let op = TxnOp::put(self.full(key), value, None);
        self.fenced(&format!("put {key}"), op).await.map(|_| ())
    }

    async fn delete(&self, key: &str) -> Result<bool, StateStoreError> {
        let op = TxnOp::delete(self.full(key), None);
        Ok(self.fenced(&format!("delete {key}"), op).await? > 0)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StateStoreError> {
        let op = TxnOp::delete(self.full(prefix), Some(DeleteOptions::new().with_prefix()));
        let deleted = self.fenced(&format!("delete everything under {prefix}"), op).await?;
        Ok(u64::try_from(deleted).unwrap_or(0))
    }

    /// The receiver also ends when etcd ends the watch (etcd gone, history compacted); the
    /// caller then lists again and watches anew.
    async fn watch(&self, prefix: &str) -> Result<mpsc::Receiver<WatchEvent>, StateStoreError> {
        let mut watcher = self.client.watch_client();
        let key = self.full(prefix);
        // Returns once etcd has created the watch, so every later change reaches it.
        let stream = self
            .timed(&format!("watch {prefix}"), async {
                let mut stream = watcher.watch(key, Some(WatchOptions::new().with_prefix())).await?;
                match stream.message().await? {
                    Some(resp) if resp.created() && !resp.canceled() => Ok(stream),
                    Some(resp) => {
                        Err(etcd_client::Error::WatchError(format!("etcd refused the watch: {}", resp.cancel_reason())))
                    }
                    None => Err(etcd_client::Error::WatchError("etcd closed the watch at once".into())),
                }
            })
            .await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(forward_watch(stream, tx, self.prefix.clone(), self.urls.clone()));
        Ok(rx)
    }

    /// Grants a lease of `lease_ttl_secs`, keeps it alive (every third of its TTL) and waits in
    /// etcd's election until this candidate leads. A later campaign replaces the earlier lease.
    async fn campaign(&self, candidate: &str) -> Result<Leadership, StateStoreError> {
        let mut lease = self.client.lease_client();
        let grant = self.timed("grant the leadership lease", lease.grant(self.lease_ttl_secs, None)).await?;
        let (lease_id, ttl_secs) = (grant.id(), grant.ttl());
        let (lost_tx, lost) = watch::channel(false);
        let keeper = tokio::spawn(keep_alive(
            self.client.lease_client(),
            lease_id,
            ttl_secs,
            lost_tx.clone(),
            self.urls.clone(),
        ));
        let previous = lock(&self.session).replace(Session { lease_id, lost: lost_tx, keeper, leader_key: None });
        if let Some(previous) = previous {
            let old = previous.end();
            let _ = self.timed("revoke the previous leadership lease", lease.revoke(old)).await;
        }

        let mut election = self.client.election_client();
        let mut lease_lost = lost.clone();
        tokio::select! {
            won = election.campaign(self.election_name(), candidate, lease_id) => {
                let won = won.map_err(|e| self.failed("campaign for leadership", &e))?;
                if let (Some(key), Some(session)) = (won.leader(), lock(&self.session).as_mut())
                    && session.lease_id == lease_id
                {
                    session.leader_key = Some((key.key().to_vec(), key.rev()));
                }
            }
            _ = lease_lost.wait_for(|lost| *lost) => {
                return Err(StateStoreError::Unavailable(format!(
                    "etcd at {}: the leadership lease ended while waiting to lead",
                    self.urls
                )));
            }
        }
        Ok(Leadership { lost })
    }

    async fn leader(&self) -> Result<Option<String>, StateStoreError> {
        let mut election = self.client.election_client();
        match timeout(OP_TIMEOUT, election.leader(self.election_name())).await {
            Ok(Ok(resp)) => Ok(resp.kv().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            // etcd's answer when nobody campaigns (not its raft "etcdserver: no leader").
            Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.message().contains("election: no leader") => Ok(None),
            Ok(Err(e)) => Err(self.failed("ask for the leader", &e)),
            Err(_) => Err(StateStoreError::Unavailable(format!(
                "etcd at {}: ask for the leader: no answer within {} s",
                self.urls,
                OP_TIMEOUT.as_secs()
            ))),
        }
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        let Some(session) = lock(&self.session).take() else {
            return;
        };
        let lease_id = session.end();
        // Revoking hands leadership over now rather than after the TTL. Best effort: without a
        // running runtime the lease simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mut lease = self.client.lease_client();
            runtime.spawn(async move {
                let _ = timeout(OP_TIMEOUT, lease.revoke(lease_id)).await;
            });
        }
    }
}

/// Passes etcd's events under `prefix` to `tx`, with keys made relative, until the receiver is
/// dropped or etcd ends the watch. Dropping the stream cancels the watch in etcd.
async fn forward_watch(mut stream: WatchStream, tx: mpsc::Sender<WatchEvent>, prefix: String, urls: String) {
    loop {
        let message = tokio::select! {
            _ = tx.closed() => return,
            message = stream.message() => message,
        };
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                warn!(etcd = %urls, prefix = %prefix, "etcd ended the watch");
                return;
            }
            Err(e) => {
                warn!(etcd = %urls, prefix = %prefix, error = %error_line(&e), "the etcd watch failed");
                return;
            }
        };
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let key = relative(kv.key(), &prefix);
            let event = match event.event_type() {
                EventType::Put => WatchEvent::Put { key, value: kv.value().to_vec() },
                EventType::Delete => WatchEvent::Delete { key },
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
        if resp.canceled() {
            warn!(
                etcd = %urls,
                prefix = %prefix,
                reason = %resp.cancel_reason(),
                compact_revision = resp.compact_revision(),
                "etcd cancelled the watch"
            );
            return;
        }
    }
}

/// Refreshes lease `lease_id` every third of its TTL. A refresh that fails because etcd cannot
/// be reached is retried for as long as it takes: the controller goes on serving on what it
/// knows (changes, which need etcd, are refused meanwhile). `lost` turns true only when etcd
/// answers that the lease is gone (it expired while this controller could not reach etcd, or
/// was revoked); then another controller may lead, and this one must stop.
///
/// etcd keeps leases across its own restarts (a new etcd leader extends every lease by its
/// TTL), so a controller whose etcd was down and came back keeps leading.
async fn keep_alive(mut client: LeaseClient, lease_id: i64, ttl_secs: i64, lost: watch::Sender<bool>, urls: String) {
    let ttl = Duration::from_secs(u64::try_from(ttl_secs).unwrap_or(1).max(1));
    let period = ttl / 3;
    let mut failing_since: Option<Instant> = None;
    let mut channel = None;
    loop {
        tokio::time::sleep(period).await;
        let attempt = timeout(period, async {
            if channel.is_none() {
                channel = Some(client.keep_alive(lease_id).await?);
            }
            let (keeper, stream) = channel.as_mut().expect("opened just above");
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        let why = match attempt {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                if let Some(since) = failing_since.take() {
                    warn!(etcd = %urls, lease_id, after_s = since.elapsed().as_secs(), "etcd answers again; the leadership lease is intact");
                }
                continue;
            }
            Ok(Ok(Some(_))) => {
                warn!(etcd = %urls, lease_id, "the leadership lease is gone");
                break;
            }
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(e))) if e.contains("not found") => {
                warn!(etcd = %urls, lease_id, "the leadership lease is gone");
                break;
            }
            Ok(Ok(None)) => "etcd closed the keep-alive stream".to_string(),
            Ok(Err(e)) => error_line(&e),
            Err(_) => format!("no answer within {} ms", period.as_millis()),
        };
        channel = None;
        match failing_since {
            None => {
                failing_since = Some(Instant::now());
                warn!(etcd = %urls, lease_id, error = %why, "cannot reach etcd to keep the leadership lease; serving on the last known state, refusing changes, retrying");
            }
            Some(since) if since.elapsed().as_secs() % 30 < period.as_secs().max(1) => {
                warn!(etcd = %urls, lease_id, error = %why, down_s = since.elapsed().as_secs(), "etcd still unreachable; retrying");
            }
            Some(_) => {}
        }
    }
    lost.send_replace(true);
}
