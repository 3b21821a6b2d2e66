//! The first run: a hub id downloaded from a Hugging Face hub (the test hub
//! of `tests/common/hub.rs` on 127.0.0.1, through `HF_ENDPOINT`) into a
//! fresh cache, checked, resumed after faults, reported while it runs, and
//! never asked for again once cached. No test here reaches beyond 127.0.0.1.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::hub::{publish_text_tower, publish_tiny, sha256_hex, TestHub};
use common::server::{b64, free_port, Http};
use common::*;
use serde_json::{json, Value};

const MODEL: &str = "org/tiny-capivara";

/// `capivara` reaching only `endpoint`, with its hub cache in `cache`.
fn capivara(endpoint: &str, cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capivara"));
    c.env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_CACHE", cache)
        .env("HF_TOKEN_PATH", "/nonexistent-capivara-token")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HOME")
        .env_remove("CAPIVARA_MODEL")
        .env_remove("RUST_LOG");
    c
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_out(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status,
        stderr(out)
    );
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(text.lines().count(), 1, "one JSON object on stdout: {text}");
    serde_json::from_str(&text).unwrap()
}

/// The failure's last stderr line (the error; download warnings may come
/// before it).
fn failure(out: &Output) -> String {
    assert!(!out.status.success(), "should fail: {}", stderr(out));
    assert!(out.stdout.is_empty(), "nothing on stdout when failing");
    let err = stderr(out);
    let last = err
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(last.starts_with("error: "), "{err}");
    last
}

fn texts() -> Vec<String> {
    reference().texts[..3].to_vec()
}

const IMAGES: [&str; 2] = ["photo.jpg", "palette.png"];

fn embed_args(cmd: &mut Command, model: &str) {
    cmd.args(["embed", "--model", model]);
    for t in texts() {
        cmd.arg("--text").arg(t);
    }
    for i in IMAGES {
        cmd.arg("--image").arg(fixtures().join("images").join(i));
    }
}

/// `capivara embed` of the texts and images from a local directory, offline.
fn embed_local(dir: &Path) -> Value {
    let mut c = capivara(
        "http://127.0.0.1:9",
        Path::new("/nonexistent-capivara-cache"),
    );
    c.env("HF_HUB_OFFLINE", "1");
    embed_args(&mut c, dir.to_str().unwrap());
    json_out(&c.output().unwrap())
}

/// A model directory holding the tiny model's configs and only `weights`
/// (named `as_name`).
fn local_copy(dir: &Path, weights: &str, as_name: &str) {
    let t = tiny_dir();
    for f in [
        "open_clip_config.json",
        "text_config.json",
        "tokenizer.json",
    ] {
        std::fs::copy(t.join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(t.join(weights), dir.join(as_name)).unwrap();
}

fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// The cache holds `file` of `repo` at the hub's commit the standard way: a
/// relative link from the snapshot to a blob named by its hash, whose bytes
/// are the hub's.
fn assert_cached(cache: &Path, hub: &TestHub, repo: &str, file: &str) {
    let dir = repo_dir(cache, repo);
    let commit = hub.commit(repo);
    assert_eq!(
        std::fs::read_to_string(dir.join("refs/main")).unwrap(),
        commit
    );
    let f = hub.file(repo, file);
    let etag = if f.lfs { &f.sha256 } else { &f.git_sha1 };
    let pointer = dir.join("snapshots").join(&commit).join(file);
    let target = std::fs::read_link(&pointer)
        .unwrap_or_else(|e| panic!("{} is not a link: {e}", pointer.display()));
    assert_eq!(target, Path::new("../../blobs").join(etag));
    let bytes = std::fs::read(dir.join("blobs").join(etag)).unwrap();
    assert_eq!(sha256_hex(&bytes), f.sha256, "{repo}/{file}: cached bytes");
}

/// No download in progress or lock left in a repo's blobs.
fn assert_no_leftovers(cache: &Path, repo: &str) {
    for e in std::fs::read_dir(repo_dir(cache, repo).join("blobs")).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !n.ends_with(".incomplete") && !n.ends_with(".lock"),
            "left in the cache: {n}"
        );
    }
}

/// `capivara serve` as a child with its stderr in a file.
struct Served {
    child: Child,
    http: Http,
    log: PathBuf,
}

impl Served {
    fn spawn(cmd: Command, model: &str, dir: &Path, extra: &[&str]) -> Self {
        let mut args = vec!["serve", "--model", model];
        args.extend_from_slice(extra);
        Self::start(cmd, &args, dir)
    }

    /// `capivara ARGS --addr <free port> --data-dir DIR/data`.
    fn start(mut cmd: Command, args: &[&str], dir: &Path) -> Self {
        let port = free_port();
        let log = dir.join(format!("serve-{port}.log"));
        cmd.args(args)
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .args(["--data-dir", dir.join("data").to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().unwrap();
        Self {
            child,
            http: Http::new(format!("127.0.0.1:{port}").parse().unwrap()),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for /readyz 200; fails with the log if the process ends first.
    fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!("capivara serve exited ({s}): {}", self.log());
            }
            if std::net::TcpStream::connect(self.http.base.trim_start_matches("http://")).is_ok()
                && self.http.get("/readyz").status == 200
            {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "not ready after {timeout:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < Duration::from_secs(30), "no exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn matrix(v: &Value) -> Vec<Vec<f32>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// The served model's embeddings of the texts and images.
fn served_embeddings(http: &Http) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let t = http.post_json("/embed/text", &json!({ "texts": texts() }));
    assert_eq!(t.status, 200, "{}", t.text);
    let images: Vec<String> = IMAGES.iter().map(|i| b64(&image_bytes(i))).collect();
    let i = http.post_json("/embed/image", &json!({ "images": images }));
    assert_eq!(i.status, 200, "{}", i.text);
    (
        matrix(&t.json()["embeddings"]),
        matrix(&i.json()["embeddings"]),
    )
}

#[test]
fn serve_downloads_a_hub_model_caches_it_and_restarts_without_a_request() {
    let hub = TestHub::start();
    publish_tiny(
        &hub,
        MODEL,
        "open_clip_model.safetensors",
        "open_clip_model.safetensors",
    );
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let local = embed_local(&tiny_dir());

    let mut s = Served::spawn(capivara(&hub.endpoint, &cache), MODEL, tmp.path(), &[]);
    s.wait_ready(Duration::from_secs(120));
    // Bit-identical to the same model from a directory.
    let (t, i) = served_embeddings(&s.http);
    assert_eq!(t, matrix(&local["texts"]));
    assert_eq!(i, matrix(&local["images"]));
    let ready = s.http.get("/readyz").json();
    assert_eq!(ready["models"][MODEL], "ready");

    // The standard layout: what open_clip's hub client would find.
    assert_cached(&cache, &hub, MODEL, "open_clip_config.json");
    assert_cached(&cache, &hub, MODEL, "open_clip_model.safetensors");
    assert_cached(&cache, &hub, "xlm-roberta-base", "config.json");
    assert_cached(&cache, &hub, "xlm-roberta-base", "tokenizer.json");
    assert_no_leftovers(&cache, MODEL);
    assert_no_leftovers(&cache, "xlm-roberta-base");
    // Only what the model needs: not the README, not the SentencePiece model.
    let log = hub.log();
    for skipped in ["README.md", ".gitattributes", "sentencepiece.bpe.model"] {
        assert!(
            !log.iter().any(|l| l.path.ends_with(skipped)),
            "{skipped} was fetched: {log:?}"
        );
    }
    // The weights came from the storage (the redirect), without the token
    // header (none was set here, and none may leak there anyway).
    assert!(log.iter().any(|l| l.server == "cdn"), "{log:?}");
    assert!(log
        .iter()
        .filter(|l| l.server == "cdn")
        .all(|l| l.authorization.is_none()));
    s.stop();

    // A second start: everything is cached, the hub hears nothing.
    hub.clear_log();
    let mut s = Served::spawn(capivara(&hub.endpoint, &cache), MODEL, tmp.path(), &[]);
    s.wait_ready(Duration::from_secs(120));
    assert_eq!(served_embeddings(&s.http).0, t);
    assert!(hub.log().is_empty(), "requests: {:?}", hub.log());
    s.stop();
}

/// `capivara embed` of a hub repo holding `weights` (as `as_name`): the
/// embeddings of a local directory holding the same file, bit for bit.
fn embed_from_hub_matches_local(weights: &str, as_name: &str) {
    let hub = TestHub::start();
    publish_tiny(&hub, MODEL, weights, as_name);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let dir = tmp.path().join("local");
    std::fs::create_dir_all(&dir).unwrap();
    local_copy(&dir, weights, as_name);
    let local = embed_local(&dir);

    let mut c = capivara(&hub.endpoint, &cache);
    embed_args(&mut c, MODEL);
    let got = json_out(&c.output().unwrap());
    assert_eq!(got["model"], MODEL);
    assert_eq!(got["texts"], local["texts"]);
    assert_eq!(got["images"], local["images"]);
    // And the reference open_clip computed.
    let r = reference();
    assert!(max_abs_diff(&matrix(&got["texts"]), &r.text_embeddings[..3]) <= 1e-4);
    assert_cached(&cache, &hub, MODEL, as_name);
    assert_no_leftovers(&cache, MODEL);
}

#[test]
fn embed_downloads_open_clip_pytorch_model_bin() {
    embed_from_hub_matches_local("open_clip_pytorch_model.bin", "open_clip_pytorch_model.bin");
}

#[test]
fn embed_downloads_a_lightning_ckpt_as_capivara_publishes_it() {
    embed_from_hub_matches_local("lightning.ckpt", "2kmj76gi.ckpt");
}

#[test]
fn embed_downloads_open_clip_model_safetensors() {
    embed_from_hub_matches_local("open_clip_model.safetensors", "open_clip_model.safetensors");
}

#[test]
fn a_cut_connection_is_resumed_and_the_file_verified() {
    let hub = TestHub::start();
    let weights = "open_clip_model.safetensors";
    publish_tiny(&hub, MODEL, weights, weights);
    // The weights' connection drops twice, the tokenizer's once.
    hub.cut(weights, 400_000, 2);
    hub.cut("tokenizer.json", 10_000, 1);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let mut c = capivara(&hub.endpoint, &cache);
    embed_args(&mut c, MODEL);
    let out = c.output().unwrap();
    let got = json_out(&out);
    let local = embed_local(&tiny_dir());
    assert_eq!(got["texts"], local["texts"]);
    assert_eq!(got["images"], local["images"]);
    // Resumed where each transfer stopped, not started over.
    let sha = hub.file(MODEL, weights).sha256;
    let ranges: Vec<Option<String>> = hub
        .log()
        .into_iter()
        .filter(|l| l.server == "cdn" && l.path.ends_with(&sha))
        .map(|l| l.range)
        .collect();
    assert_eq!(
        ranges,
        vec![
            None,
            Some("bytes=400000-".to_string()),
            Some("bytes=800000-".to_string())
        ]
    );
    assert!(
        stderr(&out).contains("resuming at byte 400000"),
        "{}",
        stderr(&out)
    );
    assert_cached(&cache, &hub, MODEL, weights);
    assert_cached(&cache, &hub, "xlm-roberta-base", "tokenizer.json");
    assert_no_leftovers(&cache, MODEL);

    // The link dies for good after 400 kB: the run gives up, keeps what it
    // received, and the next run resumes from there.
    let other = tempfile::tempdir().unwrap();
    hub.cut(weights, 400_000, 1);
    hub.cut(weights, 0, 5);
    let mut c = capivara(&hub.endpoint, other.path());
    embed_args(&mut c, MODEL);
    let err = failure(&c.output().unwrap());
    assert!(err.contains("failed 5 times in a row"), "{err}");
    assert!(err.contains("the 400000 bytes received are kept"), "{err}");
    let part = repo_dir(other.path(), MODEL)
        .join("blobs")
        .join(format!("{sha}.incomplete"));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 400_000);
    hub.clear_log();
    let mut c = capivara(&hub.endpoint, other.path());
    embed_args(&mut c, MODEL);
    assert_eq!(json_out(&c.output().unwrap())["texts"], local["texts"]);
    let ranges: Vec<Option<String>> = hub
        .log()
        .into_iter()
        .filter(|l| l.server == "cdn" && l.path.ends_with(&sha))
        .map(|l| l.range)
        .collect();
    assert_eq!(ranges, vec![Some("bytes=400000-".to_string())]);
    assert_cached(other.path(), &hub, MODEL, weights);
    assert!(!part.exists());
}

#[test]
fn corrupted_bytes_are_never_cached() {
    let hub = TestHub::start();
    let weights = "open_clip_model.safetensors";
    publish_tiny(&hub, MODEL, weights, weights);
    let sha = hub.file(MODEL, weights).sha256;
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let blob = repo_dir(&cache, MODEL).join("blobs").join(&sha);
    let pointer = repo_dir(&cache, MODEL)
        .join("snapshots")
        .join(hub.commit(MODEL))
        .join(weights);

    // Every transfer is corrupted: it fails, and nothing is kept.
    hub.corrupt(weights, 5);
    let mut c = capivara(&hub.endpoint, &cache);
    embed_args(&mut c, MODEL);
    let err = failure(&c.output().unwrap());
    assert!(err.contains("do not match the hub's checksum"), "{err}");
    assert!(err.contains(&sha), "{err}");
    assert!(err.contains("nothing was cached"), "{err}");
    assert!(!blob.exists(), "a corrupt blob was cached");
    assert!(std::fs::symlink_metadata(&pointer).is_err());
    assert_no_leftovers(&cache, MODEL);

    // Corrupted once: retried, and the cache ends up right.
    hub.corrupt(weights, 1);
    let mut c = capivara(&hub.endpoint, &cache);
    embed_args(&mut c, MODEL);
    let got = json_out(&c.output().unwrap());
    assert_eq!(got["texts"], embed_local(&tiny_dir())["texts"]);
    assert_cached(&cache, &hub, MODEL, weights);

    // A stale partial download longer than the file is thrown away.
    let other = tempfile::tempdir().unwrap();
    let blobs = repo_dir(other.path(), MODEL).join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(
        blobs.join(format!("{sha}.incomplete")),
        vec![0u8; 2_000_000],
    )
    .unwrap();
    let mut c = capivara(&hub.endpoint, other.path());
    embed_args(&mut c, MODEL);
    json_out(&c.output().unwrap());
    assert_cached(other.path(), &hub, MODEL, weights);
}

#[test]
fn refusals_name_the_repo_and_say_whether_a_token_is_needed() {
    let hub = TestHub::start();
    publish_tiny(
        &hub,
        "org/private",
        "open_clip_model.safetensors",
        "open_clip_model.safetensors",
    );
    hub.require_token("org/private", "hf_secret");
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let embed = |model: &str, token: Option<&str>| {
        let mut c = capivara(&hub.endpoint, &cache);
        if let Some(t) = token {
            c.env("HF_TOKEN", t);
        }
        c.args(["embed", "--model", model, "--text", "uma capivara"]);
        c.output().unwrap()
    };

    let err = failure(&embed("org/private", None));
    assert!(err.contains("`org/private`"), "{err}");
    assert!(err.contains("401"), "{err}");
    assert!(err.contains("no token was sent"), "{err}");
    assert!(err.contains("HF_TOKEN"), "{err}");

    let err = failure(&embed("org/private", Some("hf_wrong")));
    assert!(err.contains("`org/private`"), "{err}");
    assert!(err.contains("a token was sent"), "{err}");

    hub.clear_log();
    json_out(&embed("org/private", Some("hf_secret")));
    let log = hub.log();
    assert!(log
        .iter()
        .filter(|l| l.server == "hub")
        .all(|l| l.authorization.as_deref() == Some("Bearer hf_secret")));
    // The token never goes to the storage the hub redirects to.
    assert!(log.iter().any(|l| l.server == "cdn"));
    assert!(log
        .iter()
        .filter(|l| l.server == "cdn")
        .all(|l| l.authorization.is_none()));

    hub.refuse("org/gone", 404);
    let err = failure(&embed("org/gone", None));
    assert!(err.contains("no repo `org/gone`"), "{err}");
    assert!(err.contains("HF_TOKEN"), "{err}");

    // A repo that is not an open_clip model says what it holds.
    publish_text_tower(&hub);
    let err = failure(&embed("xlm-roberta-base", None));
    assert!(err.contains("no such directory"), "{err}"); // no `/`: not a hub id
    hub.add_repo(
        "org/no-weights",
        &[("open_clip_config.json", b"{}".to_vec())],
    );
    let err = failure(&embed("org/no-weights", None));
    assert!(err.contains("the repo has no weights"), "{err}");
    assert!(err.contains("open_clip_config.json"), "{err}");
}

#[test]
fn without_network_the_error_says_so_and_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    // A closed port on the loopback stands for "no network".
    let start = Instant::now();
    let mut c = capivara("http://127.0.0.1:9", &cache);
    c.args(["embed", "--model", MODEL, "--text", "uma capivara"]);
    let err = failure(&c.output().unwrap());
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(
        err.contains("cannot reach the Hugging Face hub at http://127.0.0.1:9"),
        "{err}"
    );
    assert!(err.contains("--model DIR"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE=1"), "{err}");

    // `serve` says the same and exits.
    let mut s = Served::spawn(
        capivara("http://127.0.0.1:9", &cache),
        MODEL,
        tmp.path(),
        &[],
    );
    let status = s.child.wait().unwrap();
    assert!(!status.success());
    let log = s.log();
    assert!(log.contains("cannot reach the Hugging Face hub"), "{log}");
    assert!(log.contains("HF_HUB_OFFLINE=1"), "{log}");

    // Offline with nothing cached: what to run first.
    let mut c = capivara("http://127.0.0.1:9", &cache);
    c.env("HF_HUB_OFFLINE", "1")
        .args(["embed", "--model", MODEL, "--text", "x"]);
    let err = failure(&c.output().unwrap());
    assert!(err.contains("HF_HUB_OFFLINE is set"), "{err}");
    assert!(err.contains(&format!("capivara pull {MODEL}")), "{err}");
}

/// `downloading: DONE of TOTAL bytes` in a /readyz message.
fn download_state(message: &str) -> Option<(u64, u64)> {
    let rest = message.split("downloading: ").nth(1)?;
    let mut it = rest.split_whitespace();
    let done = it.next()?.parse().ok()?;
    let _of = it.next()?;
    let total = it.next()?.parse().ok()?;
    Some((done, total))
}

#[test]
fn readyz_reports_the_download_while_healthz_answers() {
    let hub = TestHub::start();
    let weights = "open_clip_model.safetensors";
    publish_tiny(&hub, MODEL, weights, weights);
    // A slow link: about 7 s for the 1.7 MB to download.
    hub.throttle(Some(250_000));
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let mut cmd = capivara(&hub.endpoint, &cache);
    cmd.env("RUST_LOG", "info");
    let mut s = Served::spawn(cmd, MODEL, tmp.path(), &[]);
    let expected_total = (hub.file(MODEL, weights).bytes.len()
        + hub.file("xlm-roberta-base", "config.json").bytes.len()
        + hub.file("xlm-roberta-base", "tokenizer.json").bytes.len())
        as u64;
    let start = Instant::now();
    let mut seen: Vec<u64> = Vec::new();
    loop {
        assert!(start.elapsed() < Duration::from_secs(120), "{}", s.log());
        if let Some(st) = s.child.try_wait().unwrap() {
            panic!("exited {st}: {}", s.log());
        }
        if std::net::TcpStream::connect(s.http.base.trim_start_matches("http://")).is_err() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        assert_eq!(s.http.get("/healthz").status, 200);
        let r = s.http.get("/readyz");
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503);
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        if let Some((done, total)) = download_state(&msg) {
            assert!(msg.contains(&format!("model `{MODEL}`")), "{msg}");
            assert_eq!(total, expected_total, "{msg}");
            assert!(done <= total);
            if seen.last() != Some(&done) {
                seen.push(done);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(seen.len() >= 3, "download progress seen: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(
        seen.iter().any(|&d| d > 0 && d < expected_total),
        "{seen:?}"
    );
    // The log says how it goes every few seconds, and when it is done.
    let log = s.log();
    let lines = log
        .lines()
        .filter(|l| l.contains(&format!("downloading {MODEL}:")) && l.contains("%"))
        .count();
    assert!(lines >= 1, "no progress lines: {log}");
    assert!(log.contains("verified"), "{log}");
    s.stop();
}

#[test]
fn pull_downloads_ahead_and_models_lists_the_cache() {
    let hub = TestHub::start();
    let weights = "open_clip_model.safetensors";
    publish_tiny(&hub, MODEL, weights, weights);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let size = |repo: &str, f: &str| hub.file(repo, f).bytes.len() as u64;

    let out = capivara(&hub.endpoint, &cache)
        .arg("models")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no models cached"), "{text}");

    let pulled = json_out(
        &capivara(&hub.endpoint, &cache)
            .args(["pull", MODEL])
            .output()
            .unwrap(),
    );
    let m = &pulled["models"][0];
    assert_eq!(m["model"], MODEL);
    assert_eq!(m["revision"], hub.commit(MODEL));
    let all = size(MODEL, "open_clip_config.json")
        + size(MODEL, weights)
        + size("xlm-roberta-base", "config.json")
        + size("xlm-roberta-base", "tokenizer.json");
    assert_eq!(m["bytes"], all);
    // The config is fetched before the plan; the rest is counted.
    assert_eq!(
        m["downloaded_bytes"].as_u64().unwrap(),
        all - size(MODEL, "open_clip_config.json")
    );

    let listed = json_out(
        &capivara(&hub.endpoint, &cache)
            .args(["models", "--json"])
            .output()
            .unwrap(),
    );
    let repos = listed["models"].as_array().unwrap();
    assert_eq!(repos.len(), 2, "{listed}");
    assert_eq!(repos[0]["repo"], MODEL);
    assert_eq!(repos[0]["kind"], "open_clip model");
    assert_eq!(
        repos[0]["bytes"],
        size(MODEL, "open_clip_config.json") + size(MODEL, weights)
    );
    assert_eq!(repos[0]["revision"], hub.commit(MODEL));
    assert_eq!(repos[1]["repo"], "xlm-roberta-base");
    assert_eq!(repos[1]["kind"], "text tower");
    let out = capivara(&hub.endpoint, &cache)
        .arg("models")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(MODEL) && table.contains("1.6 MB"), "{table}");

    // Offline, the pulled model serves embeddings without a request.
    hub.clear_log();
    let mut c = capivara("http://127.0.0.1:9", &cache);
    c.env("HF_HUB_OFFLINE", "1");
    embed_args(&mut c, MODEL);
    assert_eq!(
        json_out(&c.output().unwrap())["texts"],
        embed_local(&tiny_dir())["texts"]
    );
    assert!(hub.log().is_empty());

    // Pulling again asks the hub for its revision and downloads nothing.
    let again = json_out(
        &capivara(&hub.endpoint, &cache)
            .args(["pull", MODEL])
            .output()
            .unwrap(),
    );
    assert_eq!(again["models"][0]["downloaded_bytes"], 0);
    let log = hub.log();
    assert!(log.iter().any(|l| l.path.starts_with("/api/models/")));
    assert!(!log.iter().any(|l| l.server == "cdn"), "{log:?}");

    // A new commit on the hub: pull moves refs/main to it.
    let t = tiny_dir();
    hub.add_repo(
        MODEL,
        &[
            (
                "open_clip_config.json",
                std::fs::read(t.join("open_clip_config.json")).unwrap(),
            ),
            (weights, std::fs::read(t.join(weights)).unwrap()),
            ("README.md", b"# a new revision\n".to_vec()),
        ],
    );
    let again = json_out(
        &capivara(&hub.endpoint, &cache)
            .args(["pull", MODEL])
            .output()
            .unwrap(),
    );
    assert_eq!(again["models"][0]["revision"], hub.commit(MODEL));
    assert_cached(&cache, &hub, MODEL, weights);

    let out = capivara(&hub.endpoint, &cache)
        .args(["pull", tiny_dir().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(failure(&out).contains("downloads hub repos"));
}

/// The commands of the README's Quick start, run as written against the
/// test hub (which publishes the tiny model as `hiaac-nlp/CAPIVARA`, laid
/// out as the real repo is): the page and a classification answer.
#[test]
fn readme_quick_start_works_against_the_test_hub() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("## Quick start")
        .expect("a Quick start section");
    let end = readme[start + 3..]
        .find("\n## ")
        .map(|i| start + 3 + i)
        .unwrap_or(readme.len());
    let section = &readme[start..end];
    let mut commands = Vec::new();
    let mut in_sh = false;
    for line in section.lines() {
        if line.starts_with("```") {
            in_sh = line.trim() == "```sh" && !in_sh;
            continue;
        }
        // A command, without its trailing comment.
        let l = line.split(" #").next().unwrap().trim();
        if in_sh && !l.is_empty() && !l.starts_with('#') {
            commands.push(l.to_string());
        }
    }
    let runs: Vec<Vec<String>> = commands
        .iter()
        .filter_map(|c| c.strip_prefix("cargo run --release -- "))
        .map(|rest| rest.split_whitespace().map(String::from).collect())
        .collect();
    assert!(
        runs.iter().any(|r| r == &["serve".to_string()]),
        "the quick start runs `cargo run --release -- serve`: {commands:?}"
    );
    assert!(
        runs.iter()
            .any(|r| r.first().map(String::as_str) == Some("pull")),
        "the quick start shows `pull`: {commands:?}"
    );

    let hub = TestHub::start();
    publish_tiny(
        &hub,
        "hiaac-nlp/CAPIVARA",
        "lightning.ckpt",
        "2kmj76gi.ckpt",
    );
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let mut served = 0;
    for (n, args) in runs.iter().enumerate() {
        let mut args = args.clone();
        // Each command in its own data directory, on a free port.
        let dir = tmp.path().join(format!("run-{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(i) = args.iter().position(|a| a == "--data-dir") {
            args.remove(i);
            args.remove(i);
        }
        if args[0] == "serve" {
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut s = Served::start(capivara(&hub.endpoint, &cache), &argv, &dir);
            s.wait_ready(Duration::from_secs(120));
            let (status, ct, page) = s.http.get_bytes("/");
            assert_eq!(status, 200);
            assert!(ct.starts_with("text/html"), "{ct}");
            assert!(String::from_utf8_lossy(&page).contains("capivara"));
            let r = s.http.post_json(
                "/classify",
                &json!({
                    "image": b64(&image_bytes("photo.jpg")),
                    "labels": ["gato", "cachorro", "capivara"],
                }),
            );
            assert_eq!(r.status, 200, "{}", r.text);
            let p = r.json()["predictions"].as_array().unwrap().clone();
            assert_eq!(p.len(), 3);
            let sum: f64 = p.iter().map(|x| x["score"].as_f64().unwrap()).sum();
            assert!((sum - 1.0).abs() < 1e-3, "{p:?}");
            s.stop();
            served += 1;
        } else {
            let out = capivara(&hub.endpoint, &cache)
                .args(&args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        }
    }
    assert!(served >= 2, "both quick-start servers ran");
    // The hub model came from the test hub, once.
    let cdn = hub.log().into_iter().filter(|l| l.server == "cdn").count();
    assert!(cdn >= 1);
}
