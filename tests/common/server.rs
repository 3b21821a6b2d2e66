//! A capivara server on 127.0.0.1 for the tests: in-process (its own runtime)
//! or as a child process, and a small blocking HTTP client.
#![allow(dead_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capivara::server::{RunningServer, ServeConfig};
use serde_json::Value;

use super::postgres::PgServer;
use super::tiny_dir;

/// Which index backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    DataDir,
    Postgres,
}

/// One index: a data directory (always there: the lock file lives in it),
/// and with Postgres a database of the shared test server.
#[derive(Debug, Clone)]
pub struct Place {
    pub data_dir: PathBuf,
    pub index_url: Option<String>,
}

impl Place {
    /// A fresh, empty index on `store` with its data directory under `dir`;
    /// `None` when Postgres is not available here (and not required: the
    /// test is then skipped, with a line saying so).
    pub fn fresh(store: Store, dir: &Path) -> Option<Place> {
        let index_url = match store {
            Store::DataDir => None,
            Store::Postgres => Some(PgServer::shared()?.create_database()),
        };
        Some(Place {
            data_dir: dir.to_path_buf(),
            index_url,
        })
    }

    /// Points a server configuration at this index.
    pub fn apply(&self, cfg: &mut ServeConfig) {
        cfg.data_dir = self.data_dir.clone();
        cfg.index_url = self.index_url.clone();
    }

    /// The command-line flags for this index.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--data-dir".to_string(),
            self.data_dir.display().to_string(),
        ];
        if let Some(u) = &self.index_url {
            a.extend(["--index-url".to_string(), u.clone()]);
        }
        a
    }
}

/// Runs a test body once per index backend: `on_each_store!(name, ...)`
/// makes `name::data_dir` and `name::postgres` tests calling `name(Store)`.
#[macro_export]
macro_rules! on_each_store {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn data_dir() {
                    super::$name(super::Store::DataDir)
                }
                #[test]
                fn postgres() {
                    super::$name(super::Store::Postgres)
                }
            }
        )*
    };
}

pub struct Http {
    pub base: String,
    agent: ureq::Agent,
}

/// A response: status, headers we care about, body as JSON (or text).
pub struct Resp {
    pub status: u16,
    pub retry_after: Option<String>,
    pub content_type: String,
    /// The `Server-Timing` header.
    pub server_timing: Option<String>,
    pub text: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// The `embeddings` rows of an `/embed/*` answer.
    pub fn embeddings(&self) -> Vec<Vec<f32>> {
        let v = self.json();
        let rows = v["embeddings"].as_array().expect("an embeddings list");
        rows.iter().map(floats).collect()
    }

    /// Asserts the one error shape and returns its code.
    pub fn error_code(&self) -> String {
        let v = self.json();
        let code = v["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error.code in {v}"));
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "no message in {v}"
        );
        code.to_string()
    }
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Self {
            base: format!("http://{addr}"),
            agent,
        }
    }

    fn finish(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Resp {
        let mut r = r.expect("request failed at the transport level");
        let status = r.status().as_u16();
        let h = |n: &str| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        let retry_after = h("retry-after");
        let content_type = h("content-type").unwrap_or_default();
        let server_timing = h("server-timing");
        let mut text = String::new();
        r.body_mut()
            .with_config()
            .limit(256 << 20)
            .reader()
            .read_to_string(&mut text)
            .unwrap();
        Resp {
            status,
            retry_after,
            content_type,
            server_timing,
            text,
        }
    }

    /// A POST of headers only, announcing `content_length` bytes that are
    /// never sent: a server that refuses the size must answer without reading
    /// a body (no race between its early answer and our write). The response
    /// is read on a raw socket.
    pub fn post_announced(&self, path: &str, content_type: &str, content_length: usize) -> Resp {
        use std::io::Write;
        let addr = self.base.trim_start_matches("http://");
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            sock,
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n\
             Content-Length: {content_length}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match sock.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    raw.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&raw);
                    if let Some(h) = text.find("\r\n\r\n") {
                        let len = text[..h]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if raw.len() >= h + 4 + len {
                            break;
                        }
                    }
                }
                Err(e) => panic!("reading the answer to {path}: {e}"),
            }
        }
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let header = |n: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(n).then(|| v.trim().to_string())
            })
        };
        Resp {
            status,
            retry_after: header("retry-after"),
            content_type: header("content-type").unwrap_or_default(),
            server_timing: header("server-timing"),
            text: body.to_string(),
        }
    }

    /// A GET whose body is bytes: status, content type, body.
    pub fn get_bytes(&self, path: &str) -> (u16, String, Vec<u8>) {
        let mut r = self
            .agent
            .get(format!("{}{path}", self.base))
            .call()
            .expect("request failed at the transport level");
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let mut body = Vec::new();
        r.body_mut()
            .with_config()
            .limit(64 << 20)
            .reader()
            .read_to_end(&mut body)
            .unwrap();
        (r.status().as_u16(), ct, body)
    }

    pub fn get(&self, path: &str) -> Resp {
        Self::finish(self.agent.get(format!("{}{path}", self.base)).call())
    }

    /// A GET with `Authorization: Bearer <key>`.
    pub fn get_key(&self, path: &str, key: &str) -> Resp {
        Self::finish(
            self.agent
                .get(format!("{}{path}", self.base))
                .header("Authorization", format!("Bearer {key}"))
                .call(),
        )
    }

    pub fn delete(&self, path: &str, key: Option<&str>) -> Resp {
        let mut req = self.agent.delete(format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        Self::finish(req.call())
    }

    /// A JSON POST that may fail at the transport level (a killed server):
    /// `None` then.
    pub fn try_post_json(&self, path: &str, body: &Value) -> Option<Resp> {
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json")
            .send(body.to_string().as_bytes());
        r.is_ok().then(|| Self::finish(r))
    }

    /// A DELETE that may fail at the transport level: `None` then.
    pub fn try_delete(&self, path: &str) -> Option<Resp> {
        let r = self.agent.delete(format!("{}{path}", self.base)).call();
        r.is_ok().then(|| Self::finish(r))
    }

    /// Any request with extra headers: the status and every response header
    /// (names lower-case).
    pub fn request_headers(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, std::collections::HashMap<String, String>) {
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = self
            .agent
            .run(req.body(()).unwrap())
            .expect("request failed at the transport level");
        let h = r
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        (r.status().as_u16(), h)
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Resp {
        self.post_raw(
            path,
            "application/json",
            body.to_string().into_bytes(),
            None,
        )
    }

    pub fn post_json_key(&self, path: &str, body: &Value, key: &str) -> Resp {
        self.post_raw(
            path,
            "application/json",
            body.to_string().into_bytes(),
            Some(key),
        )
    }

    pub fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        key: Option<&str>,
    ) -> Resp {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", content_type);
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        Self::finish(req.send(&body[..]))
    }

    /// A multipart/form-data body from (name, filename, bytes) parts.
    pub fn post_multipart(
        &self,
        path: &str,
        parts: &[(&str, Option<&str>, &[u8])],
        key: Option<&str>,
    ) -> Resp {
        let boundary = "capivara-test-boundary-7MA4YWxkTrZu0gW";
        let mut body = Vec::new();
        for (name, filename, data) in parts {
            body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            match filename {
                Some(f) => body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                ),
                None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
            }
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        self.post_raw(
            path,
            &format!("multipart/form-data; boundary={boundary}"),
            body,
            key,
        )
    }

    pub fn wait_ready(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let ok = self
                .agent
                .get(format!("{}/readyz", self.base))
                .call()
                .map(|r| r.status().as_u16() == 200)
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "server not ready after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// An in-process server with its own runtime.
pub struct TestServer {
    pub http: Http,
    pub data_dir: PathBuf,
    rt: tokio::runtime::Runtime,
    server: Option<RunningServer>,
    _tmp: Option<tempfile::TempDir>,
}

impl TestServer {
    pub fn start(configure: impl FnOnce(&mut ServeConfig)) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().to_path_buf();
        let mut s = Self::start_in(&data, configure);
        s._tmp = Some(tmp);
        s
    }

    /// A server on a fresh index of `store` (`None`: Postgres is not
    /// available here; the caller returns, skipping the test).
    pub fn start_on(store: Store, configure: impl FnOnce(&mut ServeConfig)) -> Option<Self> {
        let tmp = tempfile::tempdir().unwrap();
        let place = Place::fresh(store, tmp.path())?;
        let mut s = Self::start_at(&place, configure);
        s._tmp = Some(tmp);
        Some(s)
    }

    /// A server on the index `place`.
    pub fn start_at(place: &Place, configure: impl FnOnce(&mut ServeConfig)) -> Self {
        Self::start_in(&place.data_dir.clone(), |c| {
            place.apply(c);
            configure(c);
        })
    }

    pub fn start_in(data_dir: &Path, configure: impl FnOnce(&mut ServeConfig)) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let mut cfg = ServeConfig::new(
            tiny_dir().to_str().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
            data_dir,
        );
        configure(&mut cfg);
        let (server, loaded) = rt.block_on(capivara::server::start(cfg)).unwrap();
        rt.block_on(loaded).unwrap().unwrap();
        Self {
            http: Http::new(server.addr),
            data_dir: data_dir.to_path_buf(),
            rt,
            server: Some(server),
            _tmp: None,
        }
    }

    pub fn state(&self) -> &capivara::server::AppState {
        &self.server.as_ref().unwrap().state
    }

    pub fn stop(mut self) {
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.shutdown()).unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = self.rt.block_on(s.shutdown());
        }
    }
}

/// `capivara serve` as a child process on a free port.
pub struct ChildServer {
    pub http: Http,
    pub child: Child,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ChildServer {
    pub fn spawn(data_dir: &Path, extra: &[&str]) -> Self {
        Self::spawn_env(data_dir, extra, &[])
    }

    /// `capivara serve` on the index `place`.
    pub fn spawn_at(place: &Place, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut args: Vec<String> = place.args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::spawn_env_args(&args, env)
    }

    pub fn spawn_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = data_dir.display().to_string();
        let mut args = vec!["--data-dir", dir.as_str()];
        args.extend_from_slice(extra);
        Self::spawn_env_args(&args, env)
    }

    fn spawn_env_args(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_capivara"))
            .arg("serve")
            .arg("--model")
            .arg(tiny_dir())
            .arg("--addr")
            .arg(addr.to_string())
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let http = Http::new(addr);
        http.wait_ready(Duration::from_secs(60));
        Self { http, child }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small PNG of one colour with a square of another: distinct, deterministic images.
pub fn test_png(seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x % 256) as u8
    };
    let (bg, fg) = ([next(), next(), next()], [next(), next(), next()]);
    let (w, h) = (40 + (next() as u32 % 40), 40 + (next() as u32 % 40));
    let (sx, sy) = (next() as u32 % (w / 2), next() as u32 % (h / 2));
    let img = image::RgbImage::from_fn(w, h, |i, j| {
        if i >= sx && i < sx + w / 3 && j >= sy && j < sy + h / 3 {
            image::Rgb(fg)
        } else {
            image::Rgb(bg)
        }
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A JSON array of numbers as f32.
pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// `v[key]`: an array of number arrays, as rows of f32.
pub fn rows(v: &Value, key: &str) -> Vec<Vec<f32>> {
    v[key].as_array().unwrap().iter().map(floats).collect()
}

/// Starts a server on `cfg` whose loading must fail; the error, as text.
pub fn load_error(cfg: ServeConfig) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (server, loaded) = rt.block_on(capivara::server::start(cfg)).unwrap();
    let err = rt.block_on(loaded).unwrap().unwrap_err().to_string();
    rt.block_on(server.shutdown()).unwrap();
    err
}
