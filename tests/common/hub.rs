//! A Hugging Face hub on 127.0.0.1 for the tests: the part of the hub's HTTP
//! API a client downloading a model uses, with a log of every request and
//! faults on demand.
//!
//! - `GET /api/models/{repo}[/revision/{rev}][?blobs=true]`: the listing
//!   (`sha`, `siblings` with `rfilename`; with `blobs=true` also `size`,
//!   `blobId` and, for LFS files, `lfs.sha256` / `lfs.size`).
//! - `GET|HEAD /{repo}/resolve/{rev}/{file}`: a plain file is answered
//!   directly (`ETag` = its git blob SHA-1); an LFS file (10 kB or more, as
//!   weights are) is a `302` to the storage with `X-Linked-Etag` (its
//!   SHA-256) and `X-Linked-Size`. Both carry `X-Repo-Commit`.
//! - The storage is a second listener (another origin, as the hub's CDN
//!   is): `GET /cdn/{sha256}`. Both honour `Range: bytes=a-[b]` (206, 416).
//!
//! Unknown repos answer 401 `RepoNotFound`, as the hub does without a token.
//! It is a plain threaded HTTP/1.1 server (one request per connection) so
//! that a fault — a connection cut after so many bytes, a flipped byte, a
//! slow link — lands exactly where a test wants it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Files this size or larger are stored in LFS (as weights are).
const LFS_FROM: usize = 10_000;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

pub fn git_sha1_hex(bytes: &[u8]) -> String {
    let mut c = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    c.update(format!("blob {}\0", bytes.len()).as_bytes());
    c.update(bytes);
    hex(c.finish().as_ref())
}

#[derive(Clone)]
pub struct HubFile {
    pub name: String,
    pub bytes: Arc<Vec<u8>>,
    pub sha256: String,
    pub git_sha1: String,
    pub lfs: bool,
}

#[derive(Clone)]
struct Repo {
    commit: String,
    files: Vec<HubFile>,
    /// Only this bearer token may read it.
    token: Option<String>,
    /// Every request answered with this status.
    status: Option<u16>,
}

/// One request the hub received.
#[derive(Clone, Debug)]
pub struct Logged {
    /// `hub` or `cdn`.
    pub server: &'static str,
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct Faults {
    /// (file name, bytes, times): the next `times` transfers of the file
    /// close the connection after `bytes` body bytes.
    cuts: Vec<(String, usize, usize)>,
    /// (file name, times): the next `times` transfers flip one byte.
    corrupt: Vec<(String, usize)>,
    /// Body bytes per 20 ms tick (a slow link).
    throttle: Option<usize>,
}

#[derive(Default)]
struct State {
    repos: BTreeMap<String, Repo>,
    log: Vec<Logged>,
    faults: Faults,
}

pub struct TestHub {
    pub endpoint: String,
    cdn: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    addrs: Vec<SocketAddr>,
    threads: Vec<JoinHandle<()>>,
}

impl TestHub {
    pub fn start() -> Self {
        let hub = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let (ha, ca) = (hub.local_addr().unwrap(), cdn.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let cdn_base = format!("http://{ca}");
        let mut threads = Vec::new();
        for (listener, server) in [(hub, "hub"), (cdn, "cdn")] {
            let (state, stop, cdn_base) = (state.clone(), stop.clone(), cdn_base.clone());
            threads.push(std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (state, cdn_base) = (state.clone(), cdn_base.clone());
                    std::thread::spawn(move || {
                        let _ = handle(conn, server, &state, &cdn_base);
                    });
                }
            }));
        }
        Self {
            endpoint: format!("http://{ha}"),
            cdn: cdn_base,
            state,
            stop,
            addrs: vec![ha, ca],
            threads,
        }
    }

    /// Publishes a repo (replacing it): its files, a commit derived from them.
    pub fn add_repo(&self, repo: &str, files: &[(&str, Vec<u8>)]) {
        let mut c = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
        c.update(repo.as_bytes());
        let files: Vec<HubFile> = files
            .iter()
            .map(|(name, bytes)| {
                c.update(name.as_bytes());
                c.update(bytes);
                HubFile {
                    name: name.to_string(),
                    sha256: sha256_hex(bytes),
                    git_sha1: git_sha1_hex(bytes),
                    lfs: bytes.len() >= LFS_FROM,
                    bytes: Arc::new(bytes.clone()),
                }
            })
            .collect();
        let commit = hex(c.finish().as_ref());
        self.state.lock().unwrap().repos.insert(
            repo.to_string(),
            Repo {
                commit,
                files,
                token: None,
                status: None,
            },
        );
    }

    pub fn commit(&self, repo: &str) -> String {
        self.state.lock().unwrap().repos[repo].commit.clone()
    }

    pub fn file(&self, repo: &str, name: &str) -> HubFile {
        let s = self.state.lock().unwrap();
        s.repos[repo]
            .files
            .iter()
            .find(|f| f.name == name)
            .unwrap()
            .clone()
    }

    /// Only `Authorization: Bearer <token>` reads the repo (else 401).
    pub fn require_token(&self, repo: &str, token: &str) {
        self.state
            .lock()
            .unwrap()
            .repos
            .get_mut(repo)
            .unwrap()
            .token = Some(token.into());
    }

    /// Every request for the repo answers `status`.
    pub fn refuse(&self, repo: &str, status: u16) {
        let mut s = self.state.lock().unwrap();
        let r = s.repos.entry(repo.to_string()).or_insert(Repo {
            commit: "0".repeat(40),
            files: vec![],
            token: None,
            status: None,
        });
        r.status = Some(status);
    }

    /// The next `times` transfers of `file` stop after `bytes` body bytes.
    pub fn cut(&self, file: &str, bytes: usize, times: usize) {
        let mut s = self.state.lock().unwrap();
        s.faults.cuts.push((file.to_string(), bytes, times));
    }

    /// The next `times` transfers of `file` have one byte changed.
    pub fn corrupt(&self, file: &str, times: usize) {
        let mut s = self.state.lock().unwrap();
        s.faults.corrupt.push((file.to_string(), times));
    }

    /// Sends file bodies at `bytes_per_second` (None: at full speed).
    pub fn throttle(&self, bytes_per_second: Option<usize>) {
        self.state.lock().unwrap().faults.throttle = bytes_per_second.map(|b| (b / 50).max(1));
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for a in &self.addrs {
            let _ = TcpStream::connect(a);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Request {
    method: String,
    path: String,
    query: String,
    headers: BTreeMap<String, String>,
}

fn read_request(conn: &TcpStream) -> std::io::Result<Request> {
    let mut r = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target, String::new()),
    };
    Ok(Request {
        method,
        path,
        query,
        headers,
    })
}

fn head(conn: &mut TcpStream, status: u16, headers: &[(&str, String)]) -> std::io::Result<()> {
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
    let mut s = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str("\r\n");
    conn.write_all(s.as_bytes())
}

fn simple(conn: &mut TcpStream, status: u16, code: &str, body: &str) -> std::io::Result<()> {
    head(
        conn,
        status,
        &[
            ("Content-Type", "application/json".into()),
            ("Content-Length", body.len().to_string()),
            ("X-Error-Code", code.into()),
        ],
    )?;
    conn.write_all(body.as_bytes())
}

fn handle(
    mut conn: TcpStream,
    server: &'static str,
    state: &Mutex<State>,
    cdn: &str,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let req = read_request(&conn)?;
    if req.method.is_empty() {
        return Ok(());
    }
    state.lock().unwrap().log.push(Logged {
        server,
        method: req.method.clone(),
        path: if req.query.is_empty() {
            req.path.clone()
        } else {
            format!("{}?{}", req.path, req.query)
        },
        range: req.headers.get("range").cloned(),
        authorization: req.headers.get("authorization").cloned(),
    });
    if server == "cdn" {
        let sha = req.path.trim_start_matches("/cdn/");
        let file = {
            let s = state.lock().unwrap();
            s.repos
                .values()
                .flat_map(|r| r.files.iter())
                .find(|f| f.sha256 == sha)
                .cloned()
        };
        return match file {
            Some(f) => send_file(&mut conn, &req, state, &f, vec![]),
            None => simple(
                &mut conn,
                404,
                "EntryNotFound",
                "{\"error\":\"no such object\"}",
            ),
        };
    }
    // Which repo: the path up to `/revision/` (listing) or `/resolve/`.
    let (repo_id, rest, api) = if let Some(p) = req.path.strip_prefix("/api/models/") {
        match p.split_once("/revision/") {
            Some((r, rev)) => (r.to_string(), rev.to_string(), true),
            None => (p.to_string(), "main".to_string(), true),
        }
    } else if let Some((r, rest)) = req.path.split_once("/resolve/") {
        (
            r.trim_start_matches('/').to_string(),
            rest.to_string(),
            false,
        )
    } else {
        return simple(&mut conn, 404, "NotFound", "{\"error\":\"not found\"}");
    };
    let repo = state.lock().unwrap().repos.get(&repo_id).cloned();
    let repo = match repo {
        None => {
            return simple(
                &mut conn,
                401,
                "RepoNotFound",
                "{\"error\":\"Repository not found\"}",
            )
        }
        Some(r) => r,
    };
    if let Some(status) = repo.status {
        let code = if status == 404 {
            "RepoNotFound"
        } else {
            "GatedRepo"
        };
        return simple(&mut conn, status, code, "{\"error\":\"refused\"}");
    }
    if let Some(t) = &repo.token {
        if req.headers.get("authorization") != Some(&format!("Bearer {t}")) {
            return simple(
                &mut conn,
                401,
                "RepoNotFound",
                "{\"error\":\"Repository not found\"}",
            );
        }
    }
    let (rev, file) = match rest.split_once('/') {
        Some((rev, file)) => (rev.to_string(), Some(file.to_string())),
        None => (rest.clone(), None),
    };
    if rev != "main" && rev != repo.commit {
        return simple(
            &mut conn,
            404,
            "RevisionNotFound",
            "{\"error\":\"no revision\"}",
        );
    }
    if api {
        let blobs = req.query.split('&').any(|kv| kv == "blobs=true");
        let siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|f| {
                if !blobs {
                    return serde_json::json!({"rfilename": f.name});
                }
                let mut v = serde_json::json!({
                    "rfilename": f.name,
                    "size": if f.lfs { 134 } else { f.bytes.len() },
                    "blobId": f.git_sha1,
                });
                if f.lfs {
                    v["size"] = f.bytes.len().into();
                    v["lfs"] = serde_json::json!({
                        "sha256": f.sha256, "size": f.bytes.len(), "pointerSize": 134
                    });
                }
                v
            })
            .collect();
        let body = serde_json::json!({
            "_id": "0", "id": repo_id, "modelId": repo_id, "private": repo.token.is_some(),
            "sha": repo.commit, "siblings": siblings,
        })
        .to_string();
        head(
            &mut conn,
            200,
            &[
                ("Content-Type", "application/json".into()),
                ("Content-Length", body.len().to_string()),
            ],
        )?;
        return conn.write_all(body.as_bytes());
    }
    let Some(f) = file.and_then(|name| repo.files.iter().find(|f| f.name == name).cloned()) else {
        return simple(
            &mut conn,
            404,
            "EntryNotFound",
            "{\"error\":\"Entry not found\"}",
        );
    };
    let common = vec![("X-Repo-Commit", repo.commit.clone())];
    if f.lfs {
        let mut h = common;
        h.extend([
            ("Location", format!("{cdn}/cdn/{}", f.sha256)),
            ("X-Linked-Etag", format!("\"{}\"", f.sha256)),
            ("X-Linked-Size", f.bytes.len().to_string()),
            ("ETag", format!("\"{}\"", f.git_sha1)),
            ("Content-Length", "0".into()),
        ]);
        return head(&mut conn, 302, &h);
    }
    let mut h = common;
    h.push(("ETag", format!("\"{}\"", f.git_sha1)));
    send_file(&mut conn, &req, state, &f, h)
}

/// A file's bytes (or the range asked for), with the faults due.
fn send_file(
    conn: &mut TcpStream,
    req: &Request,
    state: &Mutex<State>,
    f: &HubFile,
    mut headers: Vec<(&str, String)>,
) -> std::io::Result<()> {
    let size = f.bytes.len();
    let range = req.headers.get("range").and_then(|r| {
        let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
        let a: usize = a.trim().parse().ok()?;
        let b: usize = if b.trim().is_empty() {
            size.saturating_sub(1)
        } else {
            b.trim().parse::<usize>().ok()?.min(size.saturating_sub(1))
        };
        Some((a, b))
    });
    headers.push(("Accept-Ranges", "bytes".into()));
    headers.push(("Content-Type", "application/octet-stream".into()));
    let (status, from, to) = match range {
        Some((a, _)) if a >= size => {
            headers.push(("Content-Range", format!("bytes */{size}")));
            headers.push(("Content-Length", "0".into()));
            return head(conn, 416, &headers);
        }
        Some((a, b)) => {
            headers.push(("Content-Range", format!("bytes {a}-{b}/{size}")));
            (206, a, b + 1)
        }
        None => (200, 0, size),
    };
    headers.push(("Content-Length", (to - from).to_string()));
    head(conn, status, &headers)?;
    if req.method == "HEAD" {
        return Ok(());
    }
    let mut body = f.bytes[from..to].to_vec();
    // Faults apply to transfers of the body, not to a one-byte probe.
    let (cut, throttle) = {
        let mut s = state.lock().unwrap();
        let mut cut = None;
        if to - from > 1 {
            if let Some(c) = s.faults.cuts.iter_mut().find(|c| c.0 == f.name && c.2 > 0) {
                c.2 -= 1;
                cut = Some(c.1.min(body.len()));
            }
            if let Some(c) = s
                .faults
                .corrupt
                .iter_mut()
                .find(|c| c.0 == f.name && c.1 > 0)
            {
                c.1 -= 1;
                let i = body.len() / 2;
                body[i] ^= 0x5a;
            }
        }
        (cut, s.faults.throttle)
    };
    let end = cut.unwrap_or(body.len());
    let step = throttle.unwrap_or(body.len().max(1));
    let mut i = 0;
    while i < end {
        let j = (i + step).min(end);
        if conn.write_all(&body[i..j]).is_err() {
            return Ok(());
        }
        i = j;
        if throttle.is_some() && i < end {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    conn.flush()?;
    if cut.is_some() {
        // The connection drops: the client sees fewer bytes than announced.
        let _ = conn.shutdown(Shutdown::Both);
    }
    let mut sink = [0u8; 64];
    let _ = conn.set_read_timeout(Some(Duration::from_millis(10)));
    let _ = conn.read(&mut sink);
    Ok(())
}

/// The tiny fixture published as the real repos are laid out: the model
/// repo `repo` holding `open_clip_config.json` and the weights `weights` (a
/// file of `tests/fixtures/tiny` published under the name `as_name`), and
/// `xlm-roberta-base` holding `config.json`, `tokenizer.json` and
/// `sentencepiece.bpe.model`.
pub fn publish_tiny(hub: &TestHub, repo: &str, weights: &str, as_name: &str) {
    let t = super::tiny_dir();
    let read = |n: &str| std::fs::read(t.join(n)).unwrap();
    hub.add_repo(
        repo,
        &[
            (
                ".gitattributes",
                b"*.ckpt filter=lfs diff=lfs merge=lfs -text\n".to_vec(),
            ),
            ("README.md", b"---\nlicense: mit\n---\n# tiny\n".to_vec()),
            ("open_clip_config.json", read("open_clip_config.json")),
            (as_name, read(weights)),
        ],
    );
    publish_text_tower(hub);
}

/// `xlm-roberta-base` with the tiny fixture's text config and tokenizer (and
/// a stand-in SentencePiece model, which capivara does not need).
pub fn publish_text_tower(hub: &TestHub) {
    let t = super::tiny_dir();
    let read = |n: &str| std::fs::read(t.join(n)).unwrap();
    hub.add_repo(
        "xlm-roberta-base",
        &[
            ("config.json", read("text_config.json")),
            ("tokenizer.json", read("tokenizer.json")),
            ("sentencepiece.bpe.model", vec![7u8; 20_000]),
        ],
    );
}
