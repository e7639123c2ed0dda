//! A real etcd server for tests: a single member on free loopback ports, its data in a
//! temporary directory, killed on drop. Shared by the controller's store tests and the
//! end-to-end tests; include it with `#[path = "…/tests/e2e/common/etcd.rs"] mod etcd;`. It
//! needs only `std` and `tempfile`, and is synchronous so any test can start one.
//!
//! etcd must be installed (`scripts/setup.sh` installs Debian's `etcd-server`); without it the
//! test fails saying so rather than being skipped.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long etcd may take to answer its health check after starting.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running etcd. See the module docs.
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    client_port: u16,
    peer_port: u16,
    /// Plain HTTP `/health` and `/metrics`, whatever the client port speaks.
    metrics_port: u16,
    tls: Option<EtcdTls>,
    /// Holds the data directory and etcd's output; removed on drop.
    dir: tempfile::TempDir,
}

/// etcd serving its clients over TLS: its certificate and key, and the CA whose certificates
/// it requires of clients (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl EtcdServer {
    /// Starts etcd and waits until it reports itself healthy. Panics, with etcd's output,
    /// when it does not within 20 s.
    pub fn start() -> EtcdServer {
        EtcdServer::start_with(None)
    }

    /// Starts etcd serving clients over TLS and admitting only those with a certificate from
    /// `tls.client_ca`; its URL is `https://…`.
    pub fn start_tls(tls: EtcdTls) -> EtcdServer {
        EtcdServer::start_with(Some(tls))
    }

    fn start_with(tls: Option<EtcdTls>) -> EtcdServer {
        let binary = etcd_binary();
        // A port found free may be taken before etcd binds it: etcd then exits, and a second
        // try with other ports settles it.
        let mut failures = Vec::new();
        for _ in 0..3 {
            match EtcdServer::try_start(&binary, tls.clone()) {
                Ok(server) => return server,
                Err(why) => failures.push(why),
            }
        }
        panic!("etcd did not start:\n{}", failures.join("\n"));
    }

    /// `Err` when etcd exits before answering (retried); panics when it hangs.
    fn try_start(binary: &Path, tls: Option<EtcdTls>) -> Result<EtcdServer, String> {
        let dir = tempfile::tempdir().expect("a temporary directory for etcd");
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let port = free_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let (client_port, peer_port, metrics_port) = (ports[0], ports[1], ports[2]);
        let mut server = EtcdServer {
            child: spawn(binary, dir.path(), [client_port, peer_port, metrics_port], tls.as_ref()),
            client_port,
            peer_port,
            metrics_port,
            tls,
            dir,
        };
        server.wait_healthy()?;
        Ok(server)
    }

    /// Starts etcd again after [`EtcdServer::stop`], on the same ports and data: what it held
    /// before is there again.
    pub fn restart(&mut self) {
        self.stop();
        let ports = [self.client_port, self.peer_port, self.metrics_port];
        self.child = spawn(&etcd_binary(), self.dir.path(), ports, self.tls.as_ref());
        if let Err(why) = self.wait_healthy() {
            panic!("etcd did not come back: {why}");
        }
    }

    /// `Err` when etcd exits before answering; panics when it hangs.
    fn wait_healthy(&mut self) -> Result<(), String> {
        let client_url = self.url();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.is_healthy() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "etcd exited ({status}) before answering on {client_url}; its output:\n{}",
                    self.log()
                ));
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not answer on {client_url} within {} s; its output:\n{}",
                START_TIMEOUT.as_secs(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The client URL, `http://127.0.0.1:PORT` (`https://` when started with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// etcd's output so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Kills etcd now (dropping does the same), for tests of what happens when it goes away.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether etcd's `/health` says it has a leader and no alarms. A plain HTTP request,
    /// so the helper needs no etcd client.
    fn is_healthy(&self) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.metrics_port));
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.contains("\"health\":\"true\"")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs etcd on `dir`'s data folder (logging to `dir/etcd.log`, appended), on the client,
/// peer and metrics ports.
fn spawn(binary: &Path, dir: &Path, [client_port, peer_port, metrics_port]: [u16; 3], tls: Option<&EtcdTls>) -> Child {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let client_url = format!("{scheme}://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let metrics_url = format!("http://127.0.0.1:{metrics_port}");
    let mut tls_args: Vec<std::ffi::OsString> = Vec::new();
    if let Some(tls) = tls {
        for (flag, path) in
            [("--cert-file", &tls.cert), ("--key-file", &tls.key), ("--trusted-ca-file", &tls.client_ca)]
        {
            tls_args.push(flag.into());
            tls_args.push(path.into());
        }
        tls_args.push("--client-cert-auth".into());
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("etcd.log"))
        .expect("etcd's log file can be created");
    Command::new(binary)
        .args(["--name", "default"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("default={peer_url}"), "--initial-cluster-state", "new"])
        .args(["--listen-metrics-urls", &metrics_url])
        .args(tls_args)
        // A lone member elects itself after one election timeout: keep it short.
        .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("etcd's log file can be shared"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; run scripts/setup.sh", binary.display()))
}

/// `etcd` on `PATH`, else Debian's `/usr/bin/etcd`.
fn etcd_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join("etcd")).find(|p| p.is_file()));
    on_path
        .or_else(|| Some(PathBuf::from("/usr/bin/etcd")).filter(|p| p.is_file()))
        .unwrap_or_else(|| panic!("etcd is not installed (not on PATH nor at /usr/bin/etcd): run scripts/setup.sh"))
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port()
}
