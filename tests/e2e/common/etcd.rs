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
    /// Holds the data directory and etcd's output; removed on drop.
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd and waits until it reports itself healthy. Panics, with etcd's output,
    /// when it does not within 20 s.
    pub fn start() -> EtcdServer {
        let binary = etcd_binary();
        // A port found free may be taken before etcd binds it: etcd then exits, and a second
        // try with other ports settles it.
        let mut failures = Vec::new();
        for _ in 0..3 {
            match EtcdServer::try_start(&binary) {
                Ok(server) => return server,
                Err(why) => failures.push(why),
            }
        }
        panic!("etcd did not start:\n{}", failures.join("\n"));
    }

    /// `Err` when etcd exits before answering (retried); panics when it hangs.
    fn try_start(binary: &Path) -> Result<EtcdServer, String> {
        let dir = tempfile::tempdir().expect("a temporary directory for etcd");
        let client_port = free_port();
        let peer_port = loop {
            let port = free_port();
            if port != client_port {
                break port;
            }
        };
        let child = spawn(binary, dir.path(), client_port, peer_port);
        let mut server = EtcdServer { child, client_port, peer_port, dir };
        server.wait_healthy()?;
        Ok(server)
    }

    /// Starts etcd again after [`EtcdServer::stop`], on the same ports and data: what it held
    /// before is there again.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn(&etcd_binary(), self.dir.path(), self.client_port, self.peer_port);
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

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
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
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
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

/// Runs etcd on `dir`'s data folder (logging to `dir/etcd.log`, appended).
fn spawn(binary: &Path, dir: &Path, client_port: u16, peer_port: u16) -> Child {
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
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
