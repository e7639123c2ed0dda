//! API keys: when a controller is given keys, every gRPC service but health checking and
//! every HTTP route but `/healthz` needs `Authorization: Bearer <key>`. Keys are compared as
//! SHA-256 digests in constant time, and are never logged.
//!
//! Each key has a [`Role`] (a key file line is `KEY [ROLE [NAME]]`; without one, `admin`), and
//! each API a [`Permission`] that some roles hold: `admin` everything; `user` inference and
//! the model list; `viewer` every read (deployments, workers, models, metrics, the dashboard)
//! and no inference; `worker` only a worker's link.

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

pub use gantry_proto::auth::Bearer;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything: deployments, the cluster, inference, reads, a worker's link.
    Admin,
    /// Inference and the model list.
    User,
    /// Reads only: deployments, workers, models, metrics, the dashboard.
    Viewer,
    /// A worker's link only.
    Worker,
}

impl Role {
    pub fn parse(s: &str) -> Result<Role, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "user" => Ok(Role::User),
            "viewer" => Ok(Role::Viewer),
            "worker" => Ok(Role::Worker),
            other => Err(format!("role `{other}`: use admin, user, viewer or worker")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::Viewer => "viewer",
            Role::Worker => "worker",
        }
    }

    /// Whether this role holds `p`.
    pub fn may(self, p: Permission) -> bool {
        match self {
            Role::Admin => true,
            Role::User => matches!(p, Permission::Infer | Permission::ListModels | Permission::Discover),
            Role::Viewer => matches!(p, Permission::ListModels | Permission::Read | Permission::Discover),
            Role::Worker => matches!(p, Permission::WorkerLink | Permission::Discover),
        }
    }
}

/// What an API call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Inference: `Inference/*`, `POST /v1/chat/completions`, `/v1/completions`.
    Infer,
    /// The models: `Models/*`, `GET /v1/models`.
    ListModels,
    /// Reading the cluster: `Deployments/Get|List|Watch`, `Cluster/*`, `/metrics`, the dashboard's data.
    Read,
    /// Changing deployments: `Deployments/Apply|Scale|Delete`.
    Write,
    /// A worker's link: `WorkerLink/Attach`.
    WorkerLink,
    /// Server reflection (what services there are).
    Discover,
}

impl Permission {
    fn describe(self) -> &'static str {
        match self {
            Permission::Infer => "inference",
            Permission::ListModels => "the model list",
            Permission::Read => "reading deployments, workers and metrics",
            Permission::Write => "changing deployments",
            Permission::WorkerLink => "a worker's link",
            Permission::Discover => "server reflection",
        }
    }
}

/// Who called, as its key says: its role, the name the key file gives it (never the key), and
/// the limits its line sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    pub name: String,
    pub limits: Limits,
}

/// A tenant's limits, from `KEY ROLE NAME streams=N tpm=N priority=P` (each optional).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Streams the key may have open at once.
    pub streams: Option<u32>,
    /// Generated tokens per minute (a bucket that refills continuously).
    pub tokens_per_minute: Option<u64>,
    pub priority: Priority,
}

/// Who yields when the controller's relay slots run short: `low` is refused first (once fewer
/// than a fifth of the slots are free), then `normal` (a twentieth), `high` last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    pub fn name(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    /// The share of the relay slots (percent) this class leaves free for higher ones.
    pub fn reserve_percent(self) -> usize {
        match self {
            Priority::Low => 20,
            Priority::Normal => 5,
            Priority::High => 0,
        }
    }
}

impl Limits {
    /// Reads `streams=N`, `tpm=N` and `priority=low|normal|high`.
    fn parse_field(&mut self, field: &str) -> Result<(), String> {
        let (k, v) = field
            .split_once('=')
            .ok_or_else(|| format!("`{field}`: limits are key=value (streams=4, tpm=60000, priority=low)"))?;
        let number = |v: &str| {
            v.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(|| format!("`{field}`: give a whole number above 0"))
        };
        match k {
            "streams" => self.streams = Some(u32::try_from(number(v)?).map_err(|_| format!("`{field}`: too many"))?),
            "tpm" => self.tokens_per_minute = Some(number(v)?),
            "priority" => {
                self.priority = match v {
                    "low" => Priority::Low,
                    "normal" => Priority::Normal,
                    "high" => Priority::High,
                    _ => return Err(format!("`{field}`: priority is low, normal or high")),
                }
            }
            _ => return Err(format!("`{field}`: the limits are streams, tpm and priority")),
        }
        Ok(())
    }
}

/// The permission a gRPC method needs, by its path (`/gantry.v1.Deployments/Apply`).
pub fn grpc_permission(path: &str) -> Permission {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    match service {
        "gantry.v1.Inference" => Permission::Infer,
        "gantry.v1.Models" if method == "Record" => Permission::Write,
        "gantry.v1.Models" => Permission::ListModels,
        "gantry.v1.Deployments" if matches!(method, "Apply" | "Scale" | "Delete") => Permission::Write,
        "gantry.v1.WorkerLink" => Permission::WorkerLink,
        s if s.starts_with("grpc.reflection.") => Permission::Discover,
        // Deployments' reads, Cluster, and anything new: reads at least (new writes must be
        // added above; the table test lists every method).
        _ => Permission::Read,
    }
}

/// The permission an HTTP route needs.
pub fn http_permission(path: &str) -> Permission {
    match path {
        "/v1/chat/completions" | "/v1/completions" => Permission::Infer,
        "/v1/models" => Permission::ListModels,
        _ => Permission::Read,
    }
}

/// What a caller whose role lacks `needed` is told.
pub fn permission_denied(caller: &Caller, needed: Permission, what: &str) -> Status {
    Status::permission_denied(format!(
        "the API key `{}` has the role `{}`, which does not allow {} ({what})",
        caller.name,
        caller.role.name(),
        needed.describe()
    ))
}

/// One accepted key.
#[derive(Clone)]
struct Key {
    digest: [u8; 32],
    caller: Caller,
}

/// The accepted keys, as digests.
#[derive(Clone)]
pub struct ApiKeys {
    digests: Arc<Vec<Key>>,
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

    /// Reads key lines: `KEY [ROLE [NAME]]` (role `admin` when none is given; the name, for
    /// logs and errors, `key-N` when none is given).
    pub fn parse(text: &str) -> Result<ApiKeys, String> {
        let mut digests = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let key = fields.next().unwrap_or_default();
            if key.len() < MIN_KEY_LEN {
                return Err(format!(
                    "line {}: a key is at least {MIN_KEY_LEN} characters without spaces (e.g. `openssl rand -hex 24`)",
                    i + 1
                ));
            }
            let role = match fields.next() {
                None => Role::Admin,
                Some(r) => Role::parse(r).map_err(|e| format!("line {}: {e}", i + 1))?,
            };
            let name = fields.next().map_or_else(|| format!("key-{}", digests.len() + 1), str::to_string);
            let mut limits = Limits::default();
            for field in fields {
                limits.parse_field(field).map_err(|e| format!("line {}: {e}", i + 1))?;
            }
            digests.push(Key { digest: digest(key), caller: Caller { role, name, limits } });
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

    /// The caller an `Authorization` header value names, if it carries one of the keys.
    pub fn caller(&self, authorization: Option<&[u8]>) -> Option<Caller> {
        let value = authorization?;
        let key = value.strip_prefix(b"Bearer ").or_else(|| value.strip_prefix(b"bearer "))?;
        let given = digest_bytes(key);
        // Every key is compared, each in constant time, so timing says nothing about which
        // bytes (or which key) matched.
        let mut found = None;
        for k in self.digests.iter() {
            if constant_time_eq(&k.digest, &given) {
                found = Some(k.caller.clone());
            }
        }
        found
    }

    /// The caller of a request whose `Authorization` is `authorization`, if its key may do
    /// `needed`; else the status to answer (`what` names the call in the error).
    pub fn authorize(&self, authorization: Option<&[u8]>, needed: Permission, what: &str) -> Result<Caller, Status> {
        let caller = self.caller(authorization).ok_or_else(|| unauthenticated(authorization.is_some()))?;
        if caller.role.may(needed) { Ok(caller) } else { Err(permission_denied(&caller, needed, what)) }
    }

    /// A tonic interceptor that refuses calls without a valid key, or whose key's role lacks
    /// `needed` (`None`: the method decides, from the [`Caller`] left in the extensions).
    pub fn interceptor(
        &self,
        needed: Option<Permission>,
        what: &'static str,
    ) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
        let keys = self.clone();
        move |mut req: Request<()>| {
            let authorization = req.metadata().get("authorization").map(|v| v.as_bytes());
            let caller = match needed {
                Some(p) => keys.authorize(authorization, p, what)?,
                None => keys.caller(authorization).ok_or_else(|| unauthenticated(authorization.is_some()))?,
            };
            req.extensions_mut().insert(caller);
            Ok(req)
        }
    }
}

/// For methods whose permission depends on the method (`Deployments`): refuses a caller the
/// interceptor left without `needed` (no caller: keys are off, everything is allowed).
pub fn require<T>(req: &Request<T>, needed: Permission, what: &str) -> Result<(), Status> {
    match req.extensions().get::<Caller>() {
        Some(c) if !c.role.may(needed) => Err(permission_denied(c, needed, what)),
        _ => Ok(()),
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
        assert!(keys.caller(Some(b"Bearer 0123456789abcdef0123")).is_some());
        assert!(keys.caller(Some(b"Bearer fedcba9876543210fedc")).is_some());
        assert!(keys.caller(Some(b"Bearer 0123456789abcdef012")).is_none());
        assert!(keys.caller(Some(b"0123456789abcdef0123")).is_none(), "the scheme is required");
        assert!(keys.caller(None).is_none());
        assert_eq!(ApiKeys::parse("# none\n").unwrap_err(), "no keys in it");
        assert_eq!(
            keys.caller(Some(b"Bearer 0123456789abcdef0123")),
            Some(Caller { role: Role::Admin, name: "key-1".into(), limits: Limits::default() })
        );
        assert!(ApiKeys::parse("short\n").unwrap_err().starts_with("line 1: a key is at least 16 characters"));
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)", "never the keys themselves");
    }

    #[test]
    fn a_key_line_sets_its_tenants_limits() {
        let keys = ApiKeys::parse(
            "0123456789abcdef0123 user alice streams=2 tpm=6000 priority=low\nfedcba9876543210fedc user bob\n",
        )
        .unwrap();
        let alice = keys.caller(Some(b"Bearer 0123456789abcdef0123")).unwrap();
        assert_eq!(alice.limits, Limits { streams: Some(2), tokens_per_minute: Some(6000), priority: Priority::Low });
        let bob = keys.caller(Some(b"Bearer fedcba9876543210fedc")).unwrap();
        assert_eq!(bob.limits, Limits::default());
        for (line, err) in [
            ("0123456789abcdef0123 user a streams=0", "line 1: `streams=0`: give a whole number above 0"),
            ("0123456789abcdef0123 user a speed=9", "line 1: `speed=9`: the limits are streams, tpm and priority"),
            (
                "0123456789abcdef0123 user a priority=urgent",
                "line 1: `priority=urgent`: priority is low, normal or high",
            ),
            (
                "0123456789abcdef0123 user a extra",
                "line 1: `extra`: limits are key=value (streams=4, tpm=60000, priority=low)",
            ),
        ] {
            assert_eq!(ApiKeys::parse(line).unwrap_err(), err);
        }
    }

    #[test]
    fn the_interceptor_tells_missing_from_wrong() {
        let keys = ApiKeys::parse("0123456789abcdef0123\n").unwrap();
        let check = keys.interceptor(Some(Permission::Read), "test");
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

    #[test]
    fn each_role_may_call_what_it_is_for() {
        use Permission::*;
        // Every method of the API, and what it needs.
        let methods = [
            ("/gantry.v1.Inference/Generate", Infer),
            ("/gantry.v1.Inference/Chat", Infer),
            ("/gantry.v1.Models/Inspect", ListModels),
            ("/gantry.v1.Models/Select", ListModels),
            ("/gantry.v1.Models/List", ListModels),
            ("/gantry.v1.Models/Record", Write),
            ("/gantry.v1.Deployments/Apply", Write),
            ("/gantry.v1.Deployments/Scale", Write),
            ("/gantry.v1.Deployments/Delete", Write),
            ("/gantry.v1.Deployments/Get", Read),
            ("/gantry.v1.Deployments/List", Read),
            ("/gantry.v1.Deployments/Watch", Read),
            ("/gantry.v1.Cluster/ListWorkers", Read),
            ("/gantry.v1.WorkerLink/Attach", WorkerLink),
            ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Discover),
        ];
        for (path, needed) in methods {
            assert_eq!(grpc_permission(path), needed, "{path}");
        }
        let table = [
            (Role::Admin, [true, true, true, true, true, true]),
            (Role::User, [true, true, false, false, false, true]),
            (Role::Viewer, [false, true, true, false, false, true]),
            (Role::Worker, [false, false, false, false, true, true]),
        ];
        for (role, allowed) in table {
            for (p, want) in [Infer, ListModels, Read, Write, WorkerLink, Discover].into_iter().zip(allowed) {
                assert_eq!(role.may(p), want, "{role:?} {p:?}");
            }
        }
        assert_eq!(http_permission("/v1/chat/completions"), Infer);
        assert_eq!(http_permission("/v1/models"), ListModels);
        assert_eq!(http_permission("/metrics"), Read);
        assert_eq!(http_permission("/api/v1/cluster"), Read);

        let keys = ApiKeys::parse("0123456789abcdef0123 viewer grafana\nfedcba9876543210fedc user\n").unwrap();
        let e = keys.authorize(Some(b"Bearer 0123456789abcdef0123"), Write, "Deployments/Apply").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            e.message(),
            "the API key `grafana` has the role `viewer`, which does not allow changing deployments (Deployments/Apply)"
        );
        let user = keys.authorize(Some(b"Bearer fedcba9876543210fedc"), Infer, "Inference/Chat").unwrap();
        assert_eq!(user, Caller { role: Role::User, name: "key-2".into(), limits: Limits::default() });
        assert_eq!(
            ApiKeys::parse("0123456789abcdef0123 root\n").unwrap_err(),
            "line 1: role `root`: use admin, user, viewer or worker"
        );
        assert_eq!(
            ApiKeys::parse("0123456789abcdef0123 user a b\n").unwrap_err(),
            "line 1: `b`: limits are key=value (streams=4, tpm=60000, priority=low)"
        );
    }
}
