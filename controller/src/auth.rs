//! API keys: when a controller is given keys, every gRPC service but health checking and
//! every HTTP route but `/healthz` needs `Authorization: Bearer <key>`. Keys are compared as
//! SHA-256 digests in constant time, and are never logged.

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

pub use gantry_proto::auth::Bearer;

/// The accepted keys, as digests.
#[derive(Clone)]
pub struct ApiKeys {
    digests: Arc<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

/// Keys shorter than this are refused: a guessable key is no key.
pub const MIN_KEY_LEN: usize = 16;

impl ApiKeys {
    /// Reads a key file: one key per line; blank lines and `#` comments are skipped (the
    /// shape of a Kubernetes Secret mounted as a file, or a hand-written list).
    pub fn load(path: &Path) -> Result<ApiKeys, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("API key file {}: {e}", path.display()))?;
        ApiKeys::parse(&text).map_err(|e| format!("API key file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<ApiKeys, String> {
        let mut digests = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let key = line.trim();
            if key.is_empty() || key.starts_with('#') {
                continue;
            }
            if key.len() < MIN_KEY_LEN || key.chars().any(char::is_whitespace) {
                return Err(format!(
                    "line {}: a key is at least {MIN_KEY_LEN} characters without spaces (e.g. `openssl rand -hex 24`)",
                    i + 1
                ));
            }
            digests.push(digest(key));
        }
        if digests.is_empty() {
            return Err("no keys in it".into());
        }
        Ok(ApiKeys { digests: Arc::new(digests) })
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether an `Authorization` header value carries one of the keys.
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else { return false };
        let Some(key) = value.strip_prefix(b"Bearer ").or_else(|| value.strip_prefix(b"bearer ")) else {
            return false;
        };
        let given = digest_bytes(key);
        // Every key is compared, each in constant time, so timing says nothing about which
        // bytes (or which key) matched.
        self.digests.iter().fold(false, |found, d| found | constant_time_eq(d, &given))
    }

    /// A tonic interceptor that refuses calls without a valid key.
    pub fn interceptor(&self) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
        let keys = self.clone();
        move |req: Request<()>| {
            if keys.accepts(req.metadata().get("authorization").map(|v| v.as_bytes())) {
                Ok(req)
            } else {
                Err(unauthenticated(req.metadata().contains_key("authorization")))
            }
        }
    }
}

/// What a refused call is told: missing and wrong keys are told apart, nothing more.
pub fn unauthenticated(had_key: bool) -> Status {
    Status::unauthenticated(if had_key {
        "the API key is not valid"
    } else {
        "this controller needs an API key: send `Authorization: Bearer <key>` (gantry: --api-key or GANTRY_API_KEY)"
    })
}

fn digest(key: &str) -> [u8; 32] {
    digest_bytes(key.as_bytes())
}

fn digest_bytes(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_checked_and_matched() {
        let keys = ApiKeys::parse("# team keys\n\n0123456789abcdef0123\n  fedcba9876543210fedc  \n").unwrap();
        assert!(keys.accepts(Some(b"Bearer 0123456789abcdef0123")));
        assert!(keys.accepts(Some(b"Bearer fedcba9876543210fedc")));
        assert!(!keys.accepts(Some(b"Bearer 0123456789abcdef012")));
        assert!(!keys.accepts(Some(b"0123456789abcdef0123")), "the scheme is required");
        assert!(!keys.accepts(None));
        assert_eq!(ApiKeys::parse("# none\n").unwrap_err(), "no keys in it");
        assert!(ApiKeys::parse("short\n").unwrap_err().starts_with("line 1: a key is at least 16 characters"));
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)", "never the keys themselves");
    }

    #[test]
    fn the_interceptor_tells_missing_from_wrong() {
        let keys = ApiKeys::parse("0123456789abcdef0123\n").unwrap();
        let check = keys.interceptor();
        let e = check(Request::new(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("needs an API key"));
        use tonic::service::Interceptor;
        let mut add = Bearer::new(Some("wrong-key-wrong-key")).unwrap();
        let e = check(add.call(Request::new(())).unwrap()).unwrap_err();
        assert_eq!(e.message(), "the API key is not valid");
        let mut add = Bearer::new(Some("0123456789abcdef0123")).unwrap();
        assert!(check(add.call(Request::new(())).unwrap()).is_ok());
        assert_eq!(format!("{add:?}"), "Bearer(<key>)");
    }
}
