//! A stand-in for the Hugging Face Hub on loopback, for tests (the real Hub cannot be reached
//! from the test machines). It answers the two endpoints Gantry uses the way the Hub does —
//! `/api/models/{repo}/revision/{rev}?blobs=true` and `/{repo}/resolve/{rev}/{file}` — with
//! the Hub's status codes and `X-Error-Code` headers for gated, private and missing models,
//! `Range` requests, redirects of large files to a second "CDN" origin, and, on request, a
//! connection dropped mid-file or corrupted bytes. Every request is recorded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::hub::hex;

/// Who may download a repository's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Public,
    /// Terms to accept: anonymous requests get 401, tokens other than this one 403.
    Gated {
        token: String,
    },
    /// Only this token sees it; everyone else gets 401 `RepoNotFound`.
    Private {
        token: String,
    },
}

/// One file of a stub repository.
#[derive(Debug, Clone)]
pub struct StubFile {
    pub name: String,
    pub data: Arc<Vec<u8>>,
    /// Stored with Git LFS: the listing gives its SHA-256 and it is served from the CDN
    /// origin when redirects are on.
    pub lfs: bool,
}

impl StubFile {
    pub fn new(name: &str, data: Vec<u8>, lfs: bool) -> StubFile {
        StubFile { name: name.into(), data: Arc::new(data), lfs }
    }

    /// The lowercase hex SHA-256 of the content.
    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(self.data.as_slice()))
    }
}

/// A repository the stub serves.
#[derive(Debug, Clone)]
pub struct StubRepo {
    pub repo: String,
    pub commit: String,
    pub access: Access,
    pub files: Vec<StubFile>,
    /// Extra names in the listing (to test what the Hub may send).
    pub extra_listing: Vec<String>,
}

impl StubRepo {
    pub fn new(repo: &str, files: Vec<StubFile>) -> StubRepo {
        let commit = hex(&Sha256::digest(repo.as_bytes()))[..40].to_string();
        StubRepo { repo: repo.into(), commit, access: Access::Public, files, extra_listing: Vec::new() }
    }

    pub fn with_access(mut self, access: Access) -> StubRepo {
        self.access = access;
        self
    }
}

/// A request the stub received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Whether it came to the CDN origin.
    pub cdn: bool,
    pub path: String,
    pub authorization: Option<String>,
    pub range: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    repos: Vec<StubRepo>,
    /// File name → bytes after which the next transfers close the connection, and how many
    /// more transfers to cut.
    drops: HashMap<String, (u64, u32)>,
    /// Files whose bytes are served corrupted.
    corrupt: Vec<String>,
    /// LFS files answer with a redirect to the CDN origin.
    redirect_lfs: bool,
    requests: Vec<Recorded>,
}

/// The running stub: a Hub origin and a CDN origin on two loopback ports.
#[derive(Debug, Clone)]
pub struct HubStub {
    pub hub: SocketAddr,
    pub cdn: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl HubStub {
    pub fn start(repos: Vec<StubRepo>) -> HubStub {
        let hub_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stub = HubStub {
            hub: hub_listener.local_addr().unwrap(),
            cdn: cdn_listener.local_addr().unwrap(),
            state: Arc::new(Mutex::new(State { repos, ..State::default() })),
        };
        for (listener, cdn) in [(hub_listener, false), (cdn_listener, true)] {
            let stub = stub.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    let stub = stub.clone();
                    std::thread::spawn(move || {
                        let _ = stub.handle(conn, cdn);
                    });
                }
            });
        }
        stub
    }

    /// `http://127.0.0.1:PORT`, the value for `HF_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.hub)
    }

    /// The next `times` transfers of `file` close the connection after `after` bytes.
    pub fn drop_connection(&self, file: &str, after: u64, times: u32) {
        self.state.lock().unwrap().drops.insert(file.into(), (after, times));
    }

    pub fn corrupt(&self, file: &str) {
        self.state.lock().unwrap().corrupt.push(file.into());
    }

    pub fn redirect_lfs_to_cdn(&self) {
        self.state.lock().unwrap().redirect_lfs = true;
    }

    pub fn add_repo(&self, repo: StubRepo) {
        self.state.lock().unwrap().repos.push(repo);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    fn handle(&self, conn: TcpStream, cdn: bool) -> std::io::Result<()> {
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let path = percent_decode(path);
        self.state.lock().unwrap().requests.push(Recorded {
            cdn,
            path: path.clone(),
            authorization: headers.get("authorization").cloned(),
            range: headers.get("range").cloned(),
        });
        let token = headers.get("authorization").and_then(|a| a.strip_prefix("Bearer ")).map(str::to_string);
        let mut out = conn;
        if cdn {
            // /cdn/<sha256>: no token needed (the URL is the credential on the real CDN).
            let sha = path.trim_start_matches("/cdn/");
            let file = self.find_by_sha(sha);
            return match file {
                Some(f) => self.send_file(&mut out, &f, headers.get("range")),
                None => respond(&mut out, 404, &[], b"no such blob"),
            };
        }
        if let Some(rest) = path.strip_prefix("/api/models/") {
            let _ = query;
            let Some((repo, rev)) = rest.split_once("/revision/") else {
                return respond(&mut out, 400, &[], b"bad path");
            };
            return self.listing(&mut out, repo, rev, token.as_deref());
        }
        // /{org}/{name}/resolve/{rev}/{file…}
        let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        if let [org, name, "resolve", rev, file] = parts.as_slice() {
            return self.resolve(&mut out, &format!("{org}/{name}"), rev, file, token.as_deref(), headers.get("range"));
        }
        respond(&mut out, 404, &[], b"not found")
    }

    fn repo(&self, repo: &str) -> Option<StubRepo> {
        self.state.lock().unwrap().repos.iter().find(|r| r.repo == repo).cloned()
    }

    fn find_by_sha(&self, sha: &str) -> Option<StubFile> {
        let state = self.state.lock().unwrap();
        state.repos.iter().flat_map(|r| r.files.iter()).find(|f| f.sha256() == sha).cloned()
    }

    /// The Hub's answer for a repository `token` may not see, if any.
    fn denied(repo: &StubRepo, token: Option<&str>, listing: bool) -> Option<(u16, &'static str, &'static str)> {
        match &repo.access {
            Access::Public => None,
            Access::Private { token: t } if token == Some(t.as_str()) => None,
            Access::Private { .. } => Some((401, "RepoNotFound", "Repository not found")),
            // The listing of a gated repository is public; its files are not.
            Access::Gated { .. } if listing => None,
            Access::Gated { token: t } if token == Some(t.as_str()) => None,
            Access::Gated { .. } if token.is_some() => {
                Some((403, "GatedRepo", "Access to this model is restricted and you are not in the authorized list"))
            }
            Access::Gated { .. } => {
                Some((401, "GatedRepo", "Access to this model is restricted; you must be authenticated"))
            }
        }
    }

    /// The repository at `rev` if `token` may see it (its listing, or with `files`, its
    /// files), else the Hub's error answer.
    fn visible(
        &self,
        repo: &str,
        rev: &str,
        token: Option<&str>,
        files: bool,
    ) -> Result<StubRepo, (u16, &'static str, &'static str)> {
        let r = self.repo(repo).ok_or((404, "RepoNotFound", "Repository not found"))?;
        if let Some(denied) = Self::denied(&r, token, !files) {
            return Err(denied);
        }
        if rev != "main" && rev != r.commit {
            return Err((404, "RevisionNotFound", "Invalid rev id"));
        }
        Ok(r)
    }

    fn listing(&self, out: &mut TcpStream, repo: &str, rev: &str, token: Option<&str>) -> std::io::Result<()> {
        let r = match self.visible(repo, rev, token, false) {
            Ok(r) => r,
            Err((status, code, msg)) => return error(out, status, code, msg),
        };
        let mut siblings: Vec<serde_json::Value> = r
            .files
            .iter()
            .map(|f| {
                let mut s = serde_json::json!({
                    "rfilename": f.name,
                    "size": f.data.len(),
                    "blobId": hex(&Sha256::digest(format!("blob {}", f.name).as_bytes()))[..40].to_string(),
                });
                if f.lfs {
                    s["lfs"] = serde_json::json!({"sha256": f.sha256(), "size": f.data.len(), "pointerSize": 134});
                }
                s
            })
            .collect();
        siblings.extend(r.extra_listing.iter().map(|n| serde_json::json!({"rfilename": n})));
        let body = serde_json::json!({"id": r.repo, "sha": r.commit, "siblings": siblings}).to_string();
        respond(out, 200, &[("Content-Type", "application/json".into())], body.as_bytes())
    }

    fn resolve(
        &self,
        out: &mut TcpStream,
        repo: &str,
        rev: &str,
        file: &str,
        token: Option<&str>,
        range: Option<&String>,
    ) -> std::io::Result<()> {
        let r = match self.visible(repo, rev, token, true) {
            Ok(r) => r,
            Err((status, code, msg)) => return error(out, status, code, msg),
        };
        let Some(f) = r.files.iter().find(|f| f.name == file).cloned() else {
            return error(out, 404, "EntryNotFound", "Entry not found");
        };
        if f.lfs && self.state.lock().unwrap().redirect_lfs {
            let location = format!("http://{}/cdn/{}", self.cdn, f.sha256());
            return respond(out, 302, &[("Location", location), ("X-Repo-Commit", r.commit.clone())], b"");
        }
        self.send_file(out, &f, range)
    }

    fn send_file(&self, out: &mut TcpStream, f: &StubFile, range: Option<&String>) -> std::io::Result<()> {
        let len = f.data.len() as u64;
        let start = range
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<u64>().ok());
        let (status, from, mut headers) = match start {
            Some(s) if s >= len => return respond(out, 416, &[("Content-Range", format!("bytes */{len}"))], b""),
            Some(s) => (206, s, vec![("Content-Range", format!("bytes {s}-{}/{len}", len - 1))]),
            None => (200, 0, Vec::new()),
        };
        let mut body = f.data[from as usize..].to_vec();
        let (cut, corrupt) = {
            let mut state = self.state.lock().unwrap();
            let cut = match state.drops.get_mut(&f.name) {
                Some((after, times)) if *times > 0 => {
                    *times -= 1;
                    Some(*after)
                }
                _ => None,
            };
            (cut, state.corrupt.contains(&f.name))
        };
        if corrupt && let Some(b) = body.last_mut() {
            *b ^= 0xff;
        }
        headers.push(("Content-Type", "application/octet-stream".into()));
        headers.push(("Accept-Ranges", "bytes".into()));
        match cut {
            // Promise everything, send part, hang up.
            Some(after) => {
                let n = (after.saturating_sub(from) as usize).min(body.len());
                write_head(out, status, &headers, body.len())?;
                out.write_all(&body[..n])?;
                out.flush()?;
                out.shutdown(std::net::Shutdown::Both)
            }
            None => respond(out, status, &headers, &body),
        }
    }
}

fn error(out: &mut TcpStream, status: u16, code: &str, message: &str) -> std::io::Result<()> {
    let body = serde_json::json!({"error": message}).to_string();
    respond(
        out,
        status,
        &[
            ("X-Error-Code", code.into()),
            ("X-Error-Message", message.into()),
            ("Content-Type", "application/json".into()),
        ],
        body.as_bytes(),
    )
}

fn write_head(out: &mut TcpStream, status: u16, headers: &[(&str, String)], len: usize) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {len}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

fn respond(out: &mut TcpStream, status: u16, headers: &[(&str, String)], body: &[u8]) -> std::io::Result<()> {
    write_head(out, status, headers, body.len())?;
    out.write_all(body)?;
    out.flush()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(Ok(v)) = bytes.get(i + 1..i + 3).map(|h| u8::from_str_radix(&String::from_utf8_lossy(h), 16))
        {
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
