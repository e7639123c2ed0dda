//! The state store backends held to the same behaviour: the embedded redb file, and etcd as a
//! real server (`etcd` must be installed: `scripts/setup.sh`). Then what differs: reopening,
//! a busy or corrupt file, an unreachable etcd, and leader election.

// The shared helpers below are test code too (clippy.toml allows unwrap only inside #[test]).
#![allow(clippy::unwrap_used)]

#[path = "../../tests/e2e/common/certs.rs"]
mod certs;
#[path = "../../tests/e2e/common/etcd.rs"]
mod etcd;

use std::sync::Arc;
use std::time::Duration;

use etcd::{EtcdServer, EtcdTls};
use gantry_controller::statestore::embedded::EmbeddedStore;
use gantry_controller::statestore::etcd::{EtcdSecurity, EtcdStore};
use gantry_controller::statestore::{Leadership, StateStore, StateStoreError, WatchEvent};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Long enough for a slow machine; a test that passes never waits for it.
const PATIENCE: Duration = Duration::from_secs(10);

fn put(key: &str, value: &[u8]) -> WatchEvent {
    WatchEvent::Put { key: key.into(), value: value.to_vec() }
}

fn delete(key: &str) -> WatchEvent {
    WatchEvent::Delete { key: key.into() }
}

async fn next_event(rx: &mut mpsc::Receiver<WatchEvent>, store: &dyn StateStore) -> WatchEvent {
    timeout(PATIENCE, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{}: no watch event within {PATIENCE:?}", store.describe()))
        .unwrap_or_else(|| panic!("{}: the watch ended", store.describe()))
}

/// What every backend must do: get, list in key order, put over an old value, delete, delete
/// a prefix, and watch exactly the changes under a prefix, in order.
async fn behaves_as_a_store(store: Arc<dyn StateStore>) {
    let name = store.describe();
    assert_eq!(store.get("deployments/a").await.unwrap(), None, "{name}");
    assert!(store.list("deployments/").await.unwrap().is_empty(), "{name}");

    let mut deployments = store.watch("deployments/").await.unwrap();
    let mut placements = store.watch("placements/").await.unwrap();

    // Values are bytes, not text.
    store.put("deployments/b", vec![0, 255, 1]).await.unwrap();
    store.put("deployments/a", b"llama v1".to_vec()).await.unwrap();
    store.put("deployments/c", b"qwen".to_vec()).await.unwrap();
    store.put("placements/a/0", b"node-1".to_vec()).await.unwrap();
    // Shares the text `deployments` but is not under `deployments/`.
    store.put("deployments-old", b"stale".to_vec()).await.unwrap();

    assert_eq!(store.get("deployments/a").await.unwrap(), Some(b"llama v1".to_vec()), "{name}");
    assert_eq!(store.get("deployments/b").await.unwrap(), Some(vec![0, 255, 1]), "{name}");
    assert_eq!(
        store.list("deployments/").await.unwrap(),
        [
            ("deployments/a".to_string(), b"llama v1".to_vec()),
            ("deployments/b".to_string(), vec![0, 255, 1]),
            ("deployments/c".to_string(), b"qwen".to_vec()),
        ],
        "{name}: list is every key under the prefix, in key order"
    );

    store.put("deployments/a", b"llama v2".to_vec()).await.unwrap();
    assert_eq!(store.get("deployments/a").await.unwrap(), Some(b"llama v2".to_vec()), "{name}");
    assert_eq!(store.list("deployments/").await.unwrap().len(), 3, "{name}: an overwrite adds no key");

    assert!(store.delete("deployments/b").await.unwrap(), "{name}: deleting a key says it existed");
    assert!(!store.delete("deployments/b").await.unwrap(), "{name}: deleting it again says it did not");
    assert_eq!(store.get("deployments/b").await.unwrap(), None, "{name}");

    assert_eq!(store.delete_prefix("deployments/").await.unwrap(), 2, "{name}: a and c were left");
    assert!(store.list("deployments/").await.unwrap().is_empty(), "{name}");
    assert_eq!(store.delete_prefix("nothing/").await.unwrap(), 0, "{name}");
    assert_eq!(
        store.list("placements/").await.unwrap(),
        [("placements/a/0".to_string(), b"node-1".to_vec())],
        "{name}: delete_prefix leaves other prefixes alone"
    );
    assert_eq!(store.get("deployments-old").await.unwrap(), Some(b"stale".to_vec()), "{name}");

    // A last change under the prefix: the events before it are exactly those expected, so
    // nothing from outside the prefix (or the second, no-op delete) slipped in.
    store.put("deployments/end", b"marker".to_vec()).await.unwrap();
    let expected = [
        put("deployments/b", &[0, 255, 1]),
        put("deployments/a", b"llama v1"),
        put("deployments/c", b"qwen"),
        put("deployments/a", b"llama v2"),
        delete("deployments/b"),
        delete("deployments/a"),
        delete("deployments/c"),
        put("deployments/end", b"marker"),
    ];
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(&next_event(&mut deployments, &*store).await, want, "{name}: event {i}");
    }

    store.delete("placements/a/0").await.unwrap();
    assert_eq!(next_event(&mut placements, &*store).await, put("placements/a/0", b"node-1"), "{name}");
    assert_eq!(next_event(&mut placements, &*store).await, delete("placements/a/0"), "{name}");

    // A dropped watch does not get in the way of writers.
    drop(deployments);
    store.put("deployments/after", b"x".to_vec()).await.unwrap();
    assert_eq!(store.get("deployments/after").await.unwrap(), Some(b"x".to_vec()), "{name}");
}

async fn etcd_store(server: &EtcdServer, prefix: &str, lease_ttl_secs: i64) -> EtcdStore {
    EtcdStore::connect(&[server.url()], prefix, lease_ttl_secs, &EtcdSecurity::default())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test etcd: {e}\netcd's output:\n{}", server.log()))
}

#[tokio::test]
async fn embedded_store_behaves_as_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
    behaves_as_a_store(Arc::new(store)).await;
}

#[tokio::test]
async fn etcd_store_behaves_as_a_store() {
    let server = EtcdServer::start();
    behaves_as_a_store(Arc::new(etcd_store(&server, "/gantry-test/", 5).await)).await;
}

#[tokio::test]
async fn embedded_store_keeps_its_values_when_reopened() {
    let dir = tempfile::tempdir().unwrap();
    // The parent directories are created.
    let path = dir.path().join("nested/dirs/state.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.describe(), format!("embedded ({})", path.display()));
    store.put("deployments/llama", b"{\"replicas\":2}".to_vec()).await.unwrap();
    store.put("placements/llama/0", b"node-1".to_vec()).await.unwrap();
    drop(store);

    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.get("deployments/llama").await.unwrap(), Some(b"{\"replicas\":2}".to_vec()));
    assert_eq!(store.list("placements/").await.unwrap(), [("placements/llama/0".to_string(), b"node-1".to_vec())]);
}

#[tokio::test]
async fn etcd_store_values_are_seen_by_a_new_client_under_the_same_prefix_only() {
    let server = EtcdServer::start();
    let first = etcd_store(&server, "/gantry-a/", 5).await;
    first.put("deployments/llama", b"{\"replicas\":2}".to_vec()).await.unwrap();
    drop(first);

    // Without the trailing slash: the same prefix.
    let again = etcd_store(&server, "/gantry-a", 5).await;
    assert_eq!(again.describe(), format!("etcd ({}, prefix /gantry-a/)", server.url()));
    assert_eq!(again.get("deployments/llama").await.unwrap(), Some(b"{\"replicas\":2}".to_vec()));
    assert_eq!(
        again.list("").await.unwrap(),
        [("deployments/llama".to_string(), b"{\"replicas\":2}".to_vec())],
        "keys come back relative to the prefix"
    );

    let other = etcd_store(&server, "/gantry-b/", 5).await;
    assert_eq!(other.get("deployments/llama").await.unwrap(), None, "another prefix is another store");
    assert!(other.list("").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_second_open_of_the_same_file_is_busy_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let _first = EmbeddedStore::open(&path).unwrap();
    match EmbeddedStore::open(&path) {
        Err(StateStoreError::Busy(message)) => {
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains("another controller"), "{message}");
            assert!(message.contains("--store"), "{message}");
        }
        other => panic!("expected Busy, got {other:?}"),
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_state_file_is_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    std::fs::write(&path, vec![0x5a; 64 * 1024]).unwrap();
    match EmbeddedStore::open(&path) {
        Err(StateStoreError::Backend(message)) => {
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(!message.contains('\n'), "one line: {message}");
        }
        other => panic!("expected Backend, got {other:?}"),
    }
}

#[tokio::test]
async fn etcd_where_nothing_listens_is_unavailable_quickly_and_names_the_url() {
    let url = format!("http://127.0.0.1:{}", etcd::free_port());
    let result =
        timeout(PATIENCE, EtcdStore::connect(std::slice::from_ref(&url), "/gantry/", 5, &EtcdSecurity::default()))
            .await
            .expect("connecting to a dead etcd gives up by itself, well within 10 s");
    match result {
        Err(StateStoreError::Unavailable(message)) => {
            assert!(message.contains(&url), "{message}");
            assert!(!message.contains('\n'), "one line: {message}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn embedded_campaign_leads_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
    assert_eq!(store.leader().await.unwrap(), None);
    let leadership = timeout(PATIENCE, store.campaign("host-a:7100")).await.unwrap().unwrap();
    assert_eq!(store.leader().await.unwrap().as_deref(), Some("host-a:7100"));
    assert!(!*leadership.lost.borrow());
    drop(store);
    assert!(*leadership.lost.borrow(), "leadership ends with the store");
}

/// Starts `store`'s campaign as `candidate` and checks it is still waiting after a second.
async fn waiting_campaign(
    store: &Arc<EtcdStore>,
    candidate: &'static str,
) -> tokio::task::JoinHandle<Result<Leadership, StateStoreError>> {
    let waiting = store.clone();
    let campaign = tokio::spawn(async move { waiting.campaign(candidate).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!campaign.is_finished(), "{candidate} must wait while another leads");
    campaign
}

#[tokio::test]
async fn etcd_election_passes_to_the_waiting_candidate_when_the_leader_is_dropped() {
    let server = EtcdServer::start();
    // A long lease: only the drop's revoke can explain a prompt handover.
    let first = etcd_store(&server, "/gantry/", 60).await;
    let second = Arc::new(etcd_store(&server, "/gantry/", 60).await);
    assert_eq!(first.leader().await.unwrap(), None, "nobody has campaigned yet");

    let leading =
        timeout(PATIENCE, first.campaign("host-a:7100")).await.expect("the first campaign wins at once").unwrap();
    assert_eq!(second.leader().await.unwrap().as_deref(), Some("host-a:7100"));

    let campaign = waiting_campaign(&second, "host-b:7100").await;
    assert_eq!(second.leader().await.unwrap().as_deref(), Some("host-a:7100"));

    drop(first);
    assert!(*leading.lost.borrow(), "the dropped store's leadership is over");
    let led = timeout(PATIENCE, campaign).await.expect("the waiting candidate leads once the leader is gone");
    let second_leading = led.unwrap().unwrap();
    assert_eq!(second.leader().await.unwrap().as_deref(), Some("host-b:7100"));
    assert!(!*second_leading.lost.borrow());
}

#[tokio::test]
async fn etcd_resign_passes_leadership_on_and_marks_it_lost() {
    let server = EtcdServer::start();
    let first = etcd_store(&server, "/gantry/", 60).await;
    let second = Arc::new(etcd_store(&server, "/gantry/", 60).await);
    let mut leading = timeout(PATIENCE, first.campaign("host-a:7100")).await.unwrap().unwrap();
    let campaign = waiting_campaign(&second, "host-b:7100").await;

    first.resign().await.unwrap();
    timeout(PATIENCE, leading.lost.wait_for(|lost| *lost)).await.unwrap().unwrap();
    timeout(PATIENCE, campaign).await.expect("the waiting candidate leads after a resign").unwrap().unwrap();
    assert_eq!(first.leader().await.unwrap().as_deref(), Some("host-b:7100"));
}

/// While etcd is away the leader stays leader (it serves on what it knows; the store refuses
/// writes, naming etcd); when etcd comes back with the lease intact, it still leads.
#[tokio::test]
async fn etcd_leadership_outlasts_an_etcd_outage() {
    let mut server = EtcdServer::start();
    let store = etcd_store(&server, "/gantry/", 2).await;
    let leading = timeout(PATIENCE, store.campaign("host-a:7100")).await.unwrap().unwrap();
    // Kept alive past its TTL while etcd is up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!*leading.lost.borrow(), "the lease is kept alive");
    assert_eq!(store.leader().await.unwrap().as_deref(), Some("host-a:7100"));

    server.stop();
    match store.put("deployments/a", b"x".to_vec()).await {
        Err(StateStoreError::Unavailable(message)) => assert!(message.contains(&server.url()), "{message}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // Two TTLs without etcd: leadership is in no one else's hands, so it is kept.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!*leading.lost.borrow(), "an unreachable etcd does not end leadership");

    server.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!*leading.lost.borrow(), "the lease survived etcd's restart");
    assert_eq!(store.leader().await.unwrap().as_deref(), Some("host-a:7100"));
    store.put("deployments/a", b"y".to_vec()).await.expect("writes work again");
}

/// When etcd answers that the lease is gone (it was revoked, or expired while this controller
/// could not reach etcd and another took over), leadership is lost.
#[tokio::test]
async fn etcd_leadership_is_lost_when_etcd_says_the_lease_is_gone() {
    let server = EtcdServer::start();
    let store = etcd_store(&server, "/gantry/", 2).await;
    let mut leading = timeout(PATIENCE, store.campaign("host-a:7100")).await.unwrap().unwrap();
    let mut admin = etcd_client::Client::connect([server.url()], None).await.unwrap();
    let leases = admin.leases().await.unwrap();
    for l in leases.leases() {
        admin.lease_revoke(l.id()).await.unwrap();
    }
    timeout(PATIENCE, leading.lost.wait_for(|lost| *lost))
        .await
        .expect("leadership is lost once etcd says the lease is gone")
        .unwrap();
}

#[tokio::test]
async fn a_truncated_state_file_is_reported_as_corrupt_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    for i in 0..100 {
        store.put(&format!("deployments/{i}"), vec![7; 300]).await.unwrap();
    }
    drop(store);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    match EmbeddedStore::open(&path) {
        Err(StateStoreError::Backend(message)) => {
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains("corrupt"), "{message}");
        }
        other => panic!("expected Backend, got {other:?}"),
    }
}

#[tokio::test]
async fn a_watcher_that_stops_reading_never_blocks_embedded_writers() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
    let mut stalled = store.watch("deployments/").await.unwrap();
    let writes = async {
        for i in 0..1100 {
            store.put(&format!("deployments/{i:04}"), vec![1]).await.unwrap();
        }
    };
    timeout(Duration::from_secs(60), writes).await.expect("writes go on while a watcher does not read");
    // The watcher got what fit in its buffer, then its watch ended, so it knows to list again.
    let mut received = 0;
    while let Some(event) = stalled.recv().await {
        assert_eq!(event, put(&format!("deployments/{received:04}"), &[1]));
        received += 1;
    }
    assert!((1..1100).contains(&received), "{received} events before the end");
}

/// Split brain, fenced: a leader whose lease ran out while it did nothing (a paused process, a
/// partition) and another controller took over can no longer write — every write is conditioned
/// on its election key — while the new leader's writes stand.
#[tokio::test]
async fn a_leader_whose_lease_ran_out_can_no_longer_write() {
    let server = EtcdServer::start();
    let a = etcd_store(&server, "/gantry/", 2).await;
    let b = etcd_store(&server, "/gantry/", 2).await;
    let _a_leads = timeout(PATIENCE, a.campaign("host-a:7100")).await.unwrap().unwrap();
    a.put("deployments/x", b"from a".to_vec()).await.expect("the leader writes");
    // A's lease ends as if A had been paused past its TTL (etcd expires it; here, at once).
    let mut admin = etcd_client::Client::connect([server.url()], None).await.unwrap();
    let leases = admin.leases().await.unwrap();
    for l in leases.leases() {
        admin.lease_revoke(l.id()).await.unwrap();
    }
    let _b_leads = timeout(PATIENCE, b.campaign("host-b:7100")).await.unwrap().unwrap();
    b.put("deployments/x", b"from b".to_vec()).await.expect("the new leader writes");
    // A wakes up and writes what it had pending: refused, and nothing of it lands.
    for (what, result) in [
        ("put", a.put("deployments/x", b"stale".to_vec()).await.map(|_| ())),
        ("delete", a.delete("deployments/x").await.map(|_| ())),
        ("delete_prefix", a.delete_prefix("deployments/").await.map(|_| ())),
    ] {
        match result {
            Err(StateStoreError::Busy(m)) => assert!(m.contains("this controller no longer leads"), "{what}: {m}"),
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(b.get("deployments/x").await.unwrap().as_deref(), Some(&b"from b"[..]));
    assert!(b.delete("deployments/x").await.unwrap(), "the leader's delete counts what it removed");
}

/// etcd with TLS and `--client-cert-auth`, as the Helm chart runs it: the controller connects
/// only with the CA that signed etcd's certificate and a client certificate from etcd's CA.
/// Without a certificate, with one from another CA, or without the CA, it is refused and
/// says why; with the right ones it reads and writes.
#[tokio::test]
async fn etcd_with_client_certificates_admits_only_a_controller_holding_one_from_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs::make_ca(d, "etcd-ca");
    certs::make_ca(d, "rogue-ca");
    certs::leaf(d, "etcd-ca", "etcd");
    certs::leaf(d, "etcd-ca", "controller");
    certs::leaf(d, "rogue-ca", "intruder");
    let server = EtcdServer::start_tls(EtcdTls {
        cert: d.join("etcd.pem"),
        key: d.join("etcd.key"),
        client_ca: d.join("etcd-ca.pem"),
    });
    let url = server.url();
    assert!(url.starts_with("https://"), "{url}");
    let read = |name: &str| std::fs::read(d.join(name)).unwrap();
    let with = |cert: Option<&str>| EtcdSecurity {
        ca_pem: Some(read("etcd-ca.pem")),
        identity_pem: cert.map(|name| (read(&format!("{name}.pem")), read(&format!("{name}.key")))),
        user: None,
    };
    let connect = |security: EtcdSecurity| {
        let url = url.clone();
        async move {
            timeout(PATIENCE, EtcdStore::connect(&[url], "/gantry/", 5, &security))
                .await
                .expect("connecting gives up by itself")
        }
    };

    // No CA for https: refused before any connection, naming the flag.
    match connect(EtcdSecurity::default()).await {
        Err(StateStoreError::Backend(message)) => assert!(message.contains("--etcd-ca"), "{message}"),
        other => panic!("expected Backend naming --etcd-ca, got {:?}", other.map(|s| s.describe())),
    }
    // A CA but no client certificate, or one from another CA: etcd refuses the handshake.
    for (cert, case) in [(None, "no client certificate"), (Some("intruder"), "a certificate from another CA")] {
        match connect(with(cert)).await {
            Err(StateStoreError::Unavailable(message)) => {
                assert!(message.contains(&url), "{case}: {message}");
                assert!(!message.contains('\n'), "{case}: one line: {message}");
            }
            other => panic!("{case}: expected Unavailable, got {:?}", other.map(|s| s.describe())),
        }
    }
    // Plaintext to the TLS port is refused too.
    let plain = url.replacen("https://", "http://", 1);
    let result = timeout(PATIENCE, EtcdStore::connect(&[plain], "/gantry/", 5, &EtcdSecurity::default()))
        .await
        .expect("connecting gives up by itself");
    assert!(matches!(result, Err(StateStoreError::Unavailable(_))), "plaintext: {:?}", result.map(|s| s.describe()));

    // The controller's certificate: a working store.
    let store = connect(with(Some("controller")))
        .await
        .unwrap_or_else(|e| panic!("the controller's certificate is refused: {e}\netcd's output:\n{}", server.log()));
    store.put("deployments/tls", b"yes".to_vec()).await.unwrap();
    assert_eq!(store.get("deployments/tls").await.unwrap(), Some(b"yes".to_vec()));
}

/// The options are checked against the endpoints before connecting, with the flag to change.
#[tokio::test]
async fn etcd_tls_options_that_do_not_match_the_endpoints_are_refused_with_the_flag_to_change() {
    let pem = b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".to_vec();
    let cases: [(Vec<String>, EtcdSecurity, &str); 3] = [
        (
            vec!["http://127.0.0.1:1".into()],
            EtcdSecurity { ca_pem: Some(pem.clone()), ..EtcdSecurity::default() },
            "--etcd-ca is set but the etcd endpoints are http://",
        ),
        (
            vec!["https://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
            EtcdSecurity { ca_pem: Some(pem.clone()), ..EtcdSecurity::default() },
            "mix http:// and https://",
        ),
        (
            vec!["http://127.0.0.1:1".into()],
            EtcdSecurity { identity_pem: Some((pem.clone(), pem)), ..EtcdSecurity::default() },
            "--etcd-cert needs TLS",
        ),
    ];
    for (endpoints, security, want) in cases {
        match EtcdStore::connect(&endpoints, "/gantry/", 5, &security).await {
            Err(StateStoreError::Backend(message)) => assert!(message.contains(want), "{message}"),
            other => panic!("{want}: expected Backend, got {:?}", other.map(|s| s.describe())),
        }
    }
}
