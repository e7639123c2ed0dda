//! TLS for the controller: its certificate and key serve gRPC (through tonic) and HTTP
//! (through rustls); with a client CA, workers must present a certificate it signed to
//! attach (mutual TLS), while API clients need none.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// How long an HTTPS client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The controller's TLS settings, read and checked.
#[derive(Clone)]
pub struct ServerTls {
    grpc: ServerTlsConfig,
    /// For dialing workers that serve TLS: the client CA as their CA, this certificate as identity.
    worker_client: Option<tonic::transport::ClientTlsConfig>,
    http: Arc<rustls::ServerConfig>,
    /// Whether workers must present a certificate signed by the client CA.
    pub workers_need_certificates: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTls(mutual: {})", self.workers_need_certificates)
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

impl ServerTls {
    /// Reads a PEM certificate chain and key, and optionally the CA that signs workers'
    /// certificates.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerTls, String> {
        let cert_pem = read(cert, "--tls-cert")?;
        let key_pem = read(key, "--tls-key")?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("--tls-cert {}: not a PEM certificate ({e})", cert.display()))?;
        if chain.is_empty() {
            return Err(format!("--tls-cert {}: no certificate in it", cert.display()));
        }
        let private = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("--tls-key {}: not a PEM private key ({e})", key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut http = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut grpc = ServerTlsConfig::new().identity(Identity::from_pem(&cert_pem, &key_pem));
        let mut worker_client = None;
        if let Some(ca) = client_ca {
            let ca_pem = read(ca, "--tls-client-ca")?;
            if CertificateDer::pem_slice_iter(&ca_pem).next().is_none() {
                return Err(format!("--tls-client-ca {}: no certificate in it", ca.display()));
            }
            // Optional at the handshake (API clients have no certificate); the worker link
            // refuses a peer without one.
            worker_client = Some(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&ca_pem))
                    .identity(Identity::from_pem(&cert_pem, &key_pem)),
            );
            grpc = grpc.client_ca_root(Certificate::from_pem(ca_pem)).client_auth_optional(true);
        }
        Ok(ServerTls { grpc, worker_client, http: Arc::new(http), workers_need_certificates: client_ca.is_some() })
    }

    pub fn grpc(&self) -> ServerTlsConfig {
        self.grpc.clone()
    }

    /// How the controller dials workers that serve TLS (with a client CA only).
    pub fn worker_client(&self) -> Option<tonic::transport::ClientTlsConfig> {
        self.worker_client.clone()
    }

    /// An HTTPS listener over `tcp`.
    pub fn http_listener(&self, tcp: TcpListener) -> TlsListener {
        TlsListener::new(tcp, TlsAcceptor::from(self.http.clone()))
    }
}

/// Accepts TCP connections and completes each TLS handshake in a task of its own (so a
/// slow or silent client delays no one else); failed handshakes are dropped.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: io::Result<SocketAddr>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsListener({:?})", self.local.as_ref().ok())
    }
}

impl TlsListener {
    fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> TlsListener {
        let local = tcp.local_addr();
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                // Ends when the listener is dropped, so the port is free again at once (a
                // standby's health server hands the port to the leader's).
                let accepted = tokio::select! {
                    conn = tcp.accept() => conn,
                    () = tx.closed() => return,
                };
                let (stream, addr) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting an HTTPS connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let _ = stream.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { ready, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accepting task never ends while this listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }
}

/// The identity a client certificate gives a worker's link: its subject's common name
/// (`CN=node-1`), else a digest of the whole subject. Certificates re-issued to the same subject
/// keep the identity; the CA that signed them (the controller's `--tls-client-ca`) vouches for it.
pub fn certificate_identity(der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    match subject(der) {
        Some(subject) => match common_name(subject) {
            Some(cn) => format!("certificate CN={cn}"),
            None => format!("certificate subject sha256:{}", hex12(&Sha256::digest(subject))),
        },
        None => format!("certificate sha256:{}", hex12(&Sha256::digest(der))),
    }
}

fn hex12(d: &[u8]) -> String {
    d.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// One DER element at the start of `b`: (tag, contents, the rest after it).
fn der_element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |acc, &x| (acc << 8) | usize::from(x)), &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The subject `Name` (its encoded contents) of a DER certificate.
fn subject(cert: &[u8]) -> Option<&[u8]> {
    let (_, certificate, _) = der_element(cert)?;
    let (_, tbs, _) = der_element(certificate)?;
    let mut rest = tbs;
    // [0] version (optional), serial, signature algorithm, issuer, validity, subject.
    let (tag, _, after) = der_element(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..4 {
        rest = der_element(rest)?.2;
    }
    let (tag, subject, _) = der_element(rest)?;
    (tag == 0x30).then_some(subject)
}

/// The first common name (OID 2.5.4.3) of a subject, if it is a string.
fn common_name(mut name: &[u8]) -> Option<String> {
    while let Some((_, set, rest)) = der_element(name) {
        name = rest;
        let mut atvs = set;
        while let Some((_, atv, more)) = der_element(atvs) {
            atvs = more;
            let (tag, oid, value) = der_element(atv)?;
            if tag == 0x06 && oid == [0x55, 0x04, 0x03] {
                let (_, text, _) = der_element(value)?;
                return String::from_utf8(text.to_vec()).ok();
            }
        }
    }
    None
}

#[cfg(test)]
mod identity_tests {
    use super::*;

    #[test]
    fn a_certificates_identity_is_its_common_name() {
        // A self-signed certificate with subject CN=node-1, O=gantry (made with openssl).
        let pem = "-----BEGIN CERTIFICATE-----
MIIBmDCCAT+gAwIBAgIUP4BMufo/AiTgd84mnvFGz0de+dAwCgYIKoZIzj0EAwIw
IjEPMA0GA1UEAwwGbm9kZS0xMQ8wDQYDVQQKDAZnYW50cnkwHhcNMjYxMjA2MTgx
MDEyWhcNMzYxMjAzMTgxMDEyWjAiMQ8wDQYDVQQDDAZub2RlLTExDzANBgNVBAoM
BmdhbnRyeTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABG1hdVMppobM6saMKn81
P2XsIr+FACPUv4+pj3n1ClnS5eAiRMwvBkzaP/qK73CX+LfgWQVx0eooV/YvLP+r
DLujUzBRMB0GA1UdDgQWBBRcK2fSBWa+pa1t+WYBFnlkYgJmRjAfBgNVHSMEGDAW
gBRcK2fSBWa+pa1t+WYBFnlkYgJmRjAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49
BAMCA0cAMEQCIDmhNSp76Pws1eeQihNSMGSjPQqLG3h86bdpnbg9iBrbAiA7v8o8
McdAQyubgeGpPvkEizic4JkcG7/SItIWDPk1gw==
-----END CERTIFICATE-----";
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(certificate_identity(&der), "certificate CN=node-1");
        // Not a certificate: a digest of the bytes, never a panic.
        assert!(certificate_identity(b"\x30\x03\x02\x01").starts_with("certificate sha256:"));
        assert!(certificate_identity(&[]).starts_with("certificate sha256:"));
    }
}
