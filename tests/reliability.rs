//! Overload, faults and hostile clients, on the tiny fixture model over real
//! HTTP: 10x more concurrent requests than the queue holds, kill -9 in a
//! loop during concurrent ingest, a full disk, CORS and request timeouts.
//! Each test prints its figures (run with `--nocapture` to see them; README's
//! "Reliability and security" section quotes them).

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::server::*;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn vm_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn probs(v: &Value) -> Vec<(String, f64)> {
    v["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["label"].as_str().unwrap().to_string(),
                p["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// 10x more concurrent requests than the queue holds: the excess gets 503
/// (with Retry-After) before the accepted ones finish, every 200 is the
/// right answer, memory stays bounded and the server serves on.
#[test]
fn overload_ten_times_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let queue = 4;
    let server = ChildServer::spawn(
        dir.path(),
        &[
            "--queue-capacity",
            &queue.to_string(),
            "--max-batch-size",
            "1",
            "--max-batch-wait-ms",
            "0",
        ],
    );
    let image = b64(&image_bytes("photo.jpg"));
    let labels: Vec<String> = (0..10).map(|i| format!("rótulo {i}")).collect();
    let body = json!({"image": image, "labels": labels});
    // The answer, alone (this also caches the label embeddings).
    let alone = server.http.post_json("/classify", &body);
    assert_eq!(alone.status, 200, "{}", alone.text);
    let expected = probs(&alone.json());
    let pid = server.child.id();
    let rss_before = vm_kb(pid, "VmRSS:");

    let requests = 10 * queue;
    let http = Arc::new(Http::new(
        server
            .http
            .base
            .trim_start_matches("http://")
            .parse()
            .unwrap(),
    ));
    let start = Arc::new(std::sync::Barrier::new(requests));
    let handles: Vec<_> = (0..requests)
        .map(|_| {
            let (http, body, start) = (http.clone(), body.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let t = Instant::now();
                let r = http.post_json("/classify", &body);
                (r, t.elapsed())
            })
        })
        .collect();
    let results: Vec<(Resp, Duration)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok: Vec<&(Resp, Duration)> = results.iter().filter(|(r, _)| r.status == 200).collect();
    let busy: Vec<&(Resp, Duration)> = results.iter().filter(|(r, _)| r.status == 503).collect();
    assert_eq!(
        ok.len() + busy.len(),
        requests,
        "only 200 and 503 expected: {:?}",
        results.iter().map(|(r, _)| r.status).collect::<Vec<_>>()
    );
    assert!(
        !busy.is_empty(),
        "a queue of {queue} cannot take {requests} at once"
    );
    assert!(ok.len() >= queue, "at least the queue's worth is served");
    for (r, _) in &ok {
        let got = probs(&r.json());
        assert_eq!(got.len(), expected.len());
        for ((la, pa), (lb, pb)) in got.iter().zip(&expected) {
            assert_eq!(la, lb);
            assert!((pa - pb).abs() < 1e-5, "{la}: {pa} vs {pb} alone");
        }
    }
    for (r, _) in &busy {
        assert_eq!(r.error_code(), "overloaded");
        assert_eq!(r.retry_after.as_deref(), Some("1"));
    }
    let slowest_refusal = busy.iter().map(|(_, t)| *t).max().unwrap();
    let slowest_answer = ok.iter().map(|(_, t)| *t).max().unwrap();
    assert!(
        slowest_refusal < slowest_answer,
        "refusals must not wait for the model: slowest 503 {slowest_refusal:?}, slowest 200 {slowest_answer:?}"
    );
    let peak = vm_kb(pid, "VmHWM:");
    println!(
        "overload: {requests} concurrent /classify on a queue of {queue}: {} answered 200 \
         (slowest {slowest_answer:?}), {} refused 503 (slowest {slowest_refusal:?}); \
         RSS {} MB before, peak {} MB",
        ok.len(),
        busy.len(),
        rss_before / 1024,
        peak / 1024
    );
    assert!(
        peak < rss_before + 256 * 1024,
        "peak RSS {peak} kB grew more than 256 MB over {rss_before} kB"
    );
    let again = server.http.post_json("/classify", &body);
    assert_eq!(again.status, 200, "the server serves on after the burst");
}

on_each_store!(kill9_in_a_loop_during_concurrent_ingest);

/// kill -9 at random moments during concurrent ingest and deletes, 20
/// times: after every restart every acknowledged image is there and
/// searchable, every acknowledged delete stays deleted, and the log replayed
/// (the server would refuse to start on a corrupt one).
fn kill9_in_a_loop_during_concurrent_ingest(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let Some(place) = Place::fresh(store, dir.path()) else {
        return;
    };
    let kills = 20;
    let mut rng = StdRng::seed_from_u64(7);
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let deleted: Arc<Mutex<HashSet<String>>> = Arc::default();
    // Ids whose delete was sent but not acknowledged: either state is right.
    let uncertain: Arc<Mutex<HashSet<String>>> = Arc::default();
    // Images sent, acknowledged or not: one cut by the kill may still have
    // been committed, so the index can hold more live images than `acked`.
    let sent_images: Arc<AtomicUsize> = Arc::default();
    // The picture of each acknowledged id (its seed), to search by example.
    let seeds: Arc<Mutex<std::collections::HashMap<String, u32>>> = Arc::default();
    let mut seed = 1000u32;
    let mut writes = 0usize;
    for round in 0..=kills {
        let server = ChildServer::spawn_at(&place, &[], &[]);
        // Everything acknowledged so far survived.
        {
            let acked = acked.lock().unwrap();
            let deleted = deleted.lock().unwrap();
            let uncertain = uncertain.lock().unwrap();
            for id in acked.iter() {
                if uncertain.contains(id) {
                    continue;
                }
                let want = if deleted.contains(id) { 404 } else { 200 };
                let got = server.http.get(&format!("/images/{id}")).status;
                assert_eq!(
                    got,
                    want,
                    "round {round}: {id} (deleted: {})",
                    deleted.contains(id)
                );
            }
            if let Some(last) = acked
                .iter()
                .rev()
                .find(|id| !deleted.contains(*id) && !uncertain.contains(*id))
            {
                // Searched by its own picture, k covering every image that
                // can be live (acknowledged or cut by a kill but committed).
                let n = sent_images.load(Ordering::SeqCst).min(1000);
                let s = seeds.lock().unwrap()[last];
                let r = server
                    .http
                    .post_json("/search", &json!({"image": b64(&test_png(s)), "k": n}));
                assert_eq!(r.status, 200, "{}", r.text);
                let found = r.json()["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|h| h["id"] == last.as_str());
                assert!(found, "round {round}: {last} is not searchable");
            }
        }
        if round == kills {
            break;
        }
        // Two writers until the kill.
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2u32)
            .map(|w| {
                let http = Http::new(server.http.base.trim_start_matches("http://").parse().unwrap());
                let (acked, deleted, uncertain, stop) =
                    (acked.clone(), deleted.clone(), uncertain.clone(), stop.clone());
                let (sent_images, seeds) = (sent_images.clone(), seeds.clone());
                let first_seed = seed + w * 100;
                std::thread::spawn(move || {
                    let mut n = 0u32;
                    let mut sent = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        if n.is_multiple_of(5) {
                            // Delete one of the acknowledged images.
                            // Chosen and marked in-flight under the locks, so
                            // that the two writers never delete the same id.
                            let victim = {
                                let a = acked.lock().unwrap();
                                let d = deleted.lock().unwrap();
                                let mut u = uncertain.lock().unwrap();
                                let v = a
                                    .iter()
                                    .rev()
                                    .find(|id| !d.contains(*id) && !u.contains(*id))
                                    .cloned();
                                if let Some(v) = &v {
                                    u.insert(v.clone());
                                }
                                v
                            };
                            let Some(victim) = victim else { continue };
                            match http.try_delete(&format!("/images/{victim}")) {
                                Some(r) if r.status == 200 => {
                                    deleted.lock().unwrap().insert(victim.clone());
                                    uncertain.lock().unwrap().remove(&victim);
                                }
                                Some(r) => panic!("delete {victim}: {} {}", r.status, r.text),
                                None => break,
                            }
                            sent += 1;
                            continue;
                        }
                        let batch: Vec<(String, u32)> = (0..1 + n % 3)
                            .map(|j| (format!("r{round}-w{w}-{n}-{j}"), first_seed + n * 3 + j))
                            .collect();
                        let images: Vec<Value> = batch
                            .iter()
                            .map(|(id, s)| json!({"image": b64(&test_png(*s)), "id": id, "metadata": {"s": s}}))
                            .collect();
                        sent_images.fetch_add(batch.len(), Ordering::SeqCst);
                        match http.try_post_json("/images", &json!({"images": images})) {
                            Some(r) if r.status == 200 => {
                                seeds.lock().unwrap().extend(batch.iter().cloned());
                                acked.lock().unwrap().extend(batch.into_iter().map(|(id, _)| id));
                            }
                            Some(r) => panic!("ingest: {} {}", r.status, r.text),
                            None => break, // killed
                        }
                        sent += 1;
                    }
                    sent
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(30..400)));
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            writes += w.join().unwrap();
        }
        seed += 1000;
    }
    let acked = acked.lock().unwrap().len();
    let deleted = deleted.lock().unwrap().len();
    println!(
        "kill -9: {kills} kills survived; {writes} requests acknowledged or cut, \
         {acked} images acknowledged, {deleted} deletes acknowledged, none lost"
    );
    assert!(
        acked > 2 * kills as usize,
        "too little was written to mean anything: {acked}"
    );
}

/// A data directory on a small tmpfs (in a private mount namespace made with
/// `unshare`): ingest until the disk is full. The answer is 507, never a 500;
/// what was acknowledged stays readable, searching works, and after a clean
/// stop a new server on the same full disk opens the index with everything
/// acknowledged in it.
#[test]
fn full_disk_answers_507_and_keeps_the_index() {
    let probe = Command::new("unshare")
        .args(["-rm", "true"])
        .status()
        .expect("unshare (util-linux) is needed for the full-disk test");
    assert!(
        probe.success(),
        "this machine does not allow user mount namespaces (unshare -rm)"
    );
    let mnt = tempfile::tempdir().unwrap();
    let (p1, p2) = (free_port(), free_port());
    let bin = env!("CARGO_BIN_EXE_capivara");
    let serve = |port: u16| {
        format!(
            "'{bin}' serve --model '{}' --addr 127.0.0.1:{port} --data-dir \"$1/data\"",
            tiny_dir().display()
        )
    };
    // The first server runs until SIGTERM, then a second one on the same disk.
    let script = format!(
        "mount -t tmpfs -o size=768k tmpfs \"$1\" || exit 90; {}; {}",
        serve(p1),
        serve(p2)
    );
    let mut shell = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script, "sh"])
        .arg(mnt.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let pid = self.0.id();
            let _ = Command::new("pkill")
                .args(["-KILL", "-P", &pid.to_string()])
                .status();
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let http = Http::new(format!("127.0.0.1:{p1}").parse().unwrap());
    http.wait_ready(Duration::from_secs(60));
    let shell_pid = shell.id();
    let mut acked = Vec::new();
    let mut full = None;
    let metadata = json!({"nota": "x".repeat(8000)});
    for i in 0..2000u32 {
        let id = format!("f{i}");
        let r = http.post_json(
            "/images",
            &json!({"images": [{"image": b64(&test_png(5000 + i)), "id": id, "metadata": metadata}]}),
        );
        match r.status {
            200 => acked.push(id),
            507 => {
                assert_eq!(r.error_code(), "insufficient_storage");
                full = Some(i);
                break;
            }
            s => panic!("ingest {i}: {s} {}", r.text),
        }
    }
    let full = full.expect("the 768 KiB disk never filled");
    assert!(!acked.is_empty());
    // Still full: the same clear answer; reads and searches work.
    for i in 0..3u32 {
        let r = http.post_json(
            "/images",
            &json!({"images": [{"image": b64(&test_png(9000 + i)), "metadata": metadata}]}),
        );
        assert_eq!(r.status, 507, "{}", r.text);
    }
    for id in &acked {
        assert_eq!(http.get(&format!("/images/{id}")).status, 200, "{id}");
    }
    let r = http.post_json("/search", &json!({"query": "x", "k": 1000}));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["results"].as_array().unwrap().len(), acked.len());
    // Stop the first server (SIGTERM, inside the namespace) and open the
    // same data directory again.
    let children = std::fs::read_to_string(format!("/proc/{shell_pid}/task/{shell_pid}/children"))
        .unwrap_or_default();
    let first: u32 = children
        .split_whitespace()
        .next()
        .expect("the first server")
        .parse()
        .unwrap();
    Command::new("kill")
        .args(["-TERM", &first.to_string()])
        .status()
        .unwrap();
    let http2 = Http::new(format!("127.0.0.1:{p2}").parse().unwrap());
    http2.wait_ready(Duration::from_secs(60));
    for id in &acked {
        assert_eq!(http2.get(&format!("/images/{id}")).status, 200, "{id} lost");
    }
    let r = http2.post_json("/search", &json!({"query": "x", "k": 1000}));
    assert_eq!(r.json()["results"].as_array().unwrap().len(), acked.len());
    println!(
        "full disk: 768 KiB tmpfs filled after {} images; every later ingest got 507; \
         all {} acknowledged images readable, searchable and there after a restart",
        full,
        acked.len()
    );
    let _guard = Kill(std::mem::replace(
        &mut shell,
        Command::new("true").spawn().unwrap(),
    ));
    let _ = shell.wait();
}

/// CORS is off by default (no header lets another origin read answers);
/// `--cors-origins` allows exactly the listed origins, preflight included.
#[test]
fn cors_is_off_by_default_and_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let origin = "https://fotos.example.com";
    let plain = ChildServer::spawn(dir.path(), &[]);
    let (status, h) = plain
        .http
        .request_headers("GET", "/healthz", &[("Origin", origin)]);
    assert_eq!(status, 200);
    assert!(!h.contains_key("access-control-allow-origin"), "{h:?}");
    let (_, h) = plain.http.request_headers(
        "OPTIONS",
        "/search",
        &[
            ("Origin", origin),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type"),
        ],
    );
    assert!(!h.contains_key("access-control-allow-origin"), "{h:?}");
    drop(plain);

    let dir = tempfile::tempdir().unwrap();
    let cors = ChildServer::spawn(dir.path(), &["--cors-origins", origin]);
    let (status, h) = cors
        .http
        .request_headers("GET", "/healthz", &[("Origin", origin)]);
    assert_eq!(status, 200);
    assert_eq!(
        h.get("access-control-allow-origin").map(String::as_str),
        Some(origin)
    );
    let (status, h) = cors.http.request_headers(
        "OPTIONS",
        "/images",
        &[
            ("Origin", origin),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization, content-type",
            ),
        ],
    );
    assert!(status == 200 || status == 204, "preflight: {status}");
    assert_eq!(
        h.get("access-control-allow-origin").map(String::as_str),
        Some(origin)
    );
    let methods = h
        .get("access-control-allow-methods")
        .cloned()
        .unwrap_or_default();
    assert!(
        methods.contains("POST") && methods.contains("DELETE"),
        "{methods}"
    );
    let allowed = h
        .get("access-control-allow-headers")
        .cloned()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
    // Another origin is not let in.
    let (_, h) =
        cors.http
            .request_headers("GET", "/healthz", &[("Origin", "https://evil.example")]);
    assert!(!h.contains_key("access-control-allow-origin"), "{h:?}");
}

/// A client that sends its headers and then stalls mid-body gets 408 (JSON)
/// after `--request-timeout-secs`, and the server serves others meanwhile.
#[test]
fn a_stalled_upload_times_out_with_408() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn(dir.path(), &["--request-timeout-secs", "1"]);
    let addr = server.http.base.trim_start_matches("http://").to_string();
    let mut sock = std::net::TcpStream::connect(&addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        sock,
        "POST /images HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 100000\r\n\r\n{{\"images\": [{{\"image\": \"AAAA"
    )
    .unwrap();
    let t = Instant::now();
    // Meanwhile others are served.
    assert_eq!(server.http.get("/healthz").status, 200);
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") || !raw.ends_with(b"}") {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => panic!("no answer after {:?}: {e}", t.elapsed()),
        }
    }
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["code"], "request_timeout");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    // Nothing was ingested.
    let m = server.http.get("/metrics").text;
    assert!(m.contains("capivara_index_size 0"), "{m}");
}

/// Ids that would reach outside the data directory are refused everywhere
/// ids are taken, and nothing is written for them.
#[test]
fn ids_cannot_escape_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn(dir.path(), &[]);
    let png = b64(&test_png(1));
    for id in ["../x", "..", "a/b", "a\\b", ".", "%2e%2e", "a b", ""] {
        let r = server
            .http
            .post_json("/images", &json!({"images": [{"image": png, "id": id}]}));
        assert_eq!(r.status, 400, "{id:?}: {}", r.text);
        assert_eq!(r.error_code(), "invalid_id", "{id:?}");
    }
    for path in [
        "/images/..%2Fx/thumbnail",
        "/images/..%2F..%2Fetc%2Fpasswd",
        "/images/%2E%2E",
    ] {
        let status = server.http.get(path).status;
        assert!(status == 400 || status == 404, "{path}: {status}");
    }
    let names: Vec<String> = walk(dir.path());
    assert!(
        names.iter().all(|n| !n.contains("..")),
        "unexpected files: {names:?}"
    );
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.display().to_string());
        if p.is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

/// Bad values of the new security flags stop the start with a clear message
/// instead of serving with a surprising setting.
#[test]
fn bad_timeout_or_cors_flags_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    for (args, says) in [
        (
            vec!["--request-timeout-secs", "0"],
            "--request-timeout-secs",
        ),
        (vec!["--request-timeout-secs=-3"], "--request-timeout-secs"),
        (
            vec!["--cors-origins", "https://a.example\u{1}"],
            "--cors-origins",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_capivara"))
            .arg("serve")
            .arg("--model")
            .arg(tiny_dir())
            .arg("--addr")
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--data-dir")
            .arg(dir.path())
            .args(&args)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
