//! The index on Postgres + pgvector with several stateless replicas: what
//! one replica acknowledges another finds at once, writes of the same id
//! from two replicas end as one row, Postgres going away and coming back,
//! `capivara migrate` both ways, and bad `--index-url`s. A real Postgres 18
//! with pgvector on 127.0.0.1 (tests/common/postgres.rs); the end-to-end
//! tests of tests/server.rs also run on it.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::postgres::PgServer;
use common::server::*;
use common::*;
use serde_json::{json, Value};

fn ingest(http: &Http, id: &str, seed: u32, meta: Value) -> Resp {
    http.post_json(
        "/images",
        &json!({"images": [{"image": b64(&test_png(seed)), "id": id, "metadata": meta}]}),
    )
}

fn capivara(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_capivara"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

#[test]
fn two_replicas_share_one_index() {
    let dir = tempfile::tempdir().unwrap();
    let Some(place) = Place::fresh(Store::Postgres, dir.path()) else {
        return;
    };
    // Two replicas starting together on an empty database: the schema is
    // created once (advisory lock), both serve.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| TestServer::start_at(&place, |_| {}));
        let b = s.spawn(|| TestServer::start_at(&place, |_| {}));
        (a.join().unwrap(), b.join().unwrap())
    });
    // Acknowledged by A, found by B at once (by id and by search).
    assert_eq!(ingest(&a.http, "praia", 11, json!({"de": "a"})).status, 200);
    assert_eq!(b.http.get("/images/praia").json()["metadata"]["de"], "a");
    let r = b
        .http
        .post_json("/search", &json!({"image": b64(&test_png(11)), "k": 1}));
    assert_eq!(r.json()["results"][0]["id"], "praia");
    let (_, ct, jpeg) = b.http.get_bytes("/images/praia/thumbnail");
    assert_eq!(ct, "image/jpeg");
    assert!(jpeg.starts_with(&[0xFF, 0xD8]));
    // Deleted on B, gone on A.
    assert_eq!(b.http.delete("/images/praia", None).status, 200);
    assert_eq!(a.http.get("/images/praia").status, 404);

    // Both replicas write the same 40 ids at once, each with its own
    // metadata: every id ends as one row (last writer wins), and both
    // replicas see the same row.
    let ids: Vec<String> = (0..40).map(|i| format!("shared-{i}")).collect();
    std::thread::scope(|s| {
        for (name, server) in [("a", &a), ("b", &b)] {
            let ids = &ids;
            s.spawn(move || {
                for chunk in ids.chunks(4) {
                    let images: Vec<Value> = chunk
                        .iter()
                        .enumerate()
                        .map(|(j, id)| {
                            json!({"image": b64(&test_png(200 + j as u32)), "id": id,
                                   "metadata": {"by": name}})
                        })
                        .collect();
                    let r = server
                        .http
                        .post_json("/images", &json!({ "images": images }));
                    assert_eq!(r.status, 200, "{}", r.text);
                }
            });
        }
    });
    let m = a.http.get("/metrics").text;
    let size = m
        .lines()
        .find(|l| l.starts_with("capivara_index_size "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap();
    assert_eq!(size, 40.0, "one row per id");
    for id in &ids {
        let (x, y) = (
            a.http.get(&format!("/images/{id}")).json(),
            b.http.get(&format!("/images/{id}")).json(),
        );
        assert_eq!(x, y);
        assert!(
            x["metadata"]["by"] == "a" || x["metadata"]["by"] == "b",
            "{x}"
        );
    }
    let r = a
        .http
        .post_json("/search", &json!({"query": "uma imagem", "k": 100}));
    let found: HashSet<String> = r.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(found.len(), 40);
}

/// Postgres crash-stopped in the middle of a load and started again: while it
/// is down every request that needs it is a quick 503 `index_unavailable`
/// (never a 500, never a hang), `/readyz` says so, nothing acknowledged is
/// lost, and the server is ready again within seconds, by itself.
#[test]
fn postgres_going_away_and_coming_back() {
    let Some(mut pg) = PgServer::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let place = Place {
        data_dir: dir.path().to_path_buf(),
        index_url: Some(pg.create_database()),
    };
    let s = TestServer::start_at(&place, |c| {
        c.pg.connect_timeout = Duration::from_secs(2);
    });
    let base: std::net::SocketAddr = s.http.base.trim_start_matches("http://").parse().unwrap();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let statuses: Arc<Mutex<HashMap<u16, usize>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..3u32)
        .map(|w| {
            let (acked, statuses, stop) = (acked.clone(), statuses.clone(), stop.clone());
            std::thread::spawn(move || {
                let http = Http::new(base);
                let mut n = 0u32;
                let mut slowest = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let started = Instant::now();
                    let r = if w == 2 {
                        http.post_json("/search", &json!({"query": "uma foto", "k": 5}))
                    } else {
                        let id = format!("w{w}-{n}");
                        let r = ingest(&http, &id, w * 10_000 + n, json!({"n": n}));
                        if r.status == 200 {
                            acked.lock().unwrap().push(id);
                        }
                        r
                    };
                    slowest = slowest.max(started.elapsed());
                    if r.status != 200 {
                        assert_eq!(
                            (r.status, r.error_code().as_str()),
                            (503, "index_unavailable"),
                            "{}",
                            r.text
                        );
                        assert!(r.retry_after.is_some());
                    }
                    *statuses.lock().unwrap().entry(r.status).or_default() += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                slowest
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(600));
    pg.stop_immediate();
    std::thread::sleep(Duration::from_millis(800));
    let r = s.http.get("/readyz");
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (503, "index_unavailable")
    );
    assert_eq!(
        s.http.get("/healthz").status,
        200,
        "alive while Postgres is down"
    );
    let down_503 = statuses.lock().unwrap().get(&503).copied().unwrap_or(0);
    pg.start_again();
    let back = Instant::now();
    while s.http.get("/readyz").status != 200 {
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "not ready 10 s after Postgres came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ready_after = back.elapsed();
    std::thread::sleep(Duration::from_millis(600));
    stop.store(true, Ordering::Relaxed);
    let slowest = load.into_iter().map(|t| t.join().unwrap()).max().unwrap();
    let statuses = statuses.lock().unwrap().clone();
    println!(
        "Postgres down and back: {statuses:?}, ready {ready_after:?} after the restart, \
         slowest answer {slowest:?}"
    );
    assert!(
        down_503 > 0,
        "no request ran while Postgres was down: {statuses:?}"
    );
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > 10,
        "{statuses:?}"
    );
    assert!(
        slowest < Duration::from_secs(5),
        "a request took {slowest:?}"
    );
    // Every acknowledged image is there.
    for id in acked.lock().unwrap().iter() {
        assert_eq!(
            s.http.get(&format!("/images/{id}")).status,
            200,
            "{id} lost"
        );
    }
}

/// A server whose Postgres is not up yet waits for it (alive, not ready,
/// saying what it waits for), then serves.
#[test]
fn a_server_waits_for_its_database() {
    let Some(mut pg) = PgServer::start_or_skip() else {
        return;
    };
    let url = pg.create_database();
    pg.stop();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = capivara::server::ServeConfig::new(
        tiny_dir().to_str().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        dir.path(),
    );
    cfg.index_url = Some(url);
    let (server, loaded) = rt.block_on(capivara::server::start(cfg)).unwrap();
    let http = Http::new(server.addr);
    let start = Instant::now();
    loop {
        let r = http.get("/readyz");
        assert_eq!(r.status, 503);
        if r.text.contains("waiting for the index") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{}", r.text);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http.get("/healthz").status, 200);
    pg.start_again();
    rt.block_on(loaded).unwrap().unwrap();
    assert_eq!(http.get("/readyz").status, 200);
    rt.block_on(server.shutdown()).unwrap();
}

#[test]
fn bad_index_urls_stop_the_start_naming_the_flag() {
    let Some(pg) = PgServer::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let missing_db = pg.url_for("no_such_database");
    let tiny = tiny_dir().display().to_string();
    for (url, needle) in [
        ("mysql://h/db", "not a Postgres URL"),
        ("postgres://h/db?sslmode=sometimes", "sslmode"),
        (
            "postgres://h/db?sslrootcert=/no/such/ca.pem",
            "/no/such/ca.pem",
        ),
        (missing_db.as_str(), "no_such_database"),
    ] {
        for cmd in ["serve", "index"] {
            let mut args = vec![cmd, "--model", tiny.as_str()];
            args.extend(["--data-dir", data, "--index-url", url]);
            match cmd {
                "serve" => args.extend(["--addr", "127.0.0.1:0"]),
                _ => args.push(data),
            }
            let out = capivara(&args);
            assert!(!out.status.success(), "{cmd} {url}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("--index-url") && err.contains(needle),
                "{cmd} {url}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    // Other flags of the backend.
    let out = capivara(&[
        "serve",
        "--index-storage",
        "f8",
        "--addr",
        "127.0.0.1:0",
        "--data-dir",
        data,
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--index-storage"));
}

/// DIR -> Postgres -> DIR gives back the same vectors (bit for bit),
/// metadata and thumbnails; a destination holding another model's
/// embeddings is refused; halfvec storage serves searches too.
#[test]
fn migrate_round_trips_between_a_data_directory_and_postgres() {
    let Some(pg) = PgServer::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    {
        let s = TestServer::start_in(&src, |_| {});
        for i in 0..30u32 {
            let meta = json!({"n": i, "x": 0.5 + i as f64, "tags": ["a", {"b": null}], "t": "ção"});
            assert_eq!(
                ingest(&s.http, &format!("m-{i:02}"), 500 + i, meta).status,
                200
            );
        }
        s.stop();
    }
    let url = pg.create_database();
    let back = dir.path().join("back");
    let run = |from: &str, to: &str| {
        let out = capivara(&["migrate", "--from", from, "--to", to, "--batch-size", "7"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let r = run(src.to_str().unwrap(), &url);
    assert_eq!(
        (r["migrated"].as_u64(), r["index_size"].as_u64()),
        (Some(30), Some(30))
    );
    assert_eq!(r["with_thumbnail"], 30);
    assert!(!r["to"].as_str().unwrap().contains("://"), "{r}");
    let db = url.rsplit('/').next().unwrap().to_string();
    let has_hnsw = || {
        pg.psql_on(
            &db,
            "SELECT to_regclass('capivara_images_embedding') IS NOT NULL",
        )
    };
    assert_eq!(has_hnsw().trim(), "t", "built after the bulk copy");
    let r = run(&url, back.to_str().unwrap());
    assert_eq!(r["migrated"], 30);
    // An interrupted bulk load leaves no index: the next start builds it.
    pg.psql_on(&db, "DROP INDEX capivara_images_embedding");
    assert_eq!(has_hnsw().trim(), "f");

    // Compare both data directories through the backend interface.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dump = |d: &std::path::Path| {
        rt.block_on(async {
            let place = capivara::store::Location::DataDir(d.to_path_buf())
                .reserve()
                .unwrap();
            let fp = place.recorded().await.unwrap().unwrap();
            let b = place
                .open(fp.dim, Default::default(), |_| {})
                .await
                .unwrap();
            (fp, b.scan(None, 1000).await.unwrap())
        })
    };
    let (fp_a, a) = dump(&src);
    let (fp_b, b) = dump(&back);
    assert_eq!(fp_a, fp_b, "the fingerprint travels with the index");
    assert_eq!(a.len(), 30);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.id, y.id);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&x.vector), bits(&y.vector), "{}", x.id);
        assert_eq!(x.metadata, y.metadata);
        assert_eq!(x.thumbnail, y.thumbnail);
    }

    // Postgres served by the migrated index answers as the original.
    let served = TestServer::start_at(
        &Place {
            data_dir: dir.path().join("unused"),
            index_url: Some(url.clone()),
        },
        |_| {},
    );
    assert_eq!(has_hnsw().trim(), "t", "rebuilt at start");
    let original = TestServer::start_in(&src, |_| {});
    let q = json!({"query": "um quadrado", "k": 10});
    let (x, y) = (
        served.http.post_json("/search", &q).json()["results"].clone(),
        original.http.post_json("/search", &q).json()["results"].clone(),
    );
    assert_eq!(x.as_array().unwrap().len(), 10);
    for (h, g) in x.as_array().unwrap().iter().zip(y.as_array().unwrap()) {
        assert_eq!((&h["id"], &h["metadata"]), (&g["id"], &g["metadata"]));
        // pgvector sums the inner product in its own order: the last bit.
        let (a, b) = (h["score"].as_f64().unwrap(), g["score"].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
    }
    drop(served);
    original.stop();

    // Another model's index refuses the migration.
    let other = dir.path().join("other");
    {
        other_tiny_model(&dir.path().join("other-model"));
        let s = TestServer::start_in(&other, |c| {
            c.set_model(&dir.path().join("other-model").display().to_string());
        });
        assert_eq!(ingest(&s.http, "x", 1, json!({})).status, 200);
        s.stop();
    }
    let out = capivara(&["migrate", "--from", other.to_str().unwrap(), "--to", &url]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must not be mixed"));
    // Bad arguments.
    let out = capivara(&[
        "migrate",
        "--from",
        src.to_str().unwrap(),
        "--to",
        src.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let empty = dir.path().join("empty");
    let out = capivara(&["migrate", "--from", empty.to_str().unwrap(), "--to", &url]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("records no model"));

    // halfvec: half the bytes, the same nearest image.
    let half = pg.create_database();
    let out = capivara(&[
        "migrate",
        "--from",
        src.to_str().unwrap(),
        "--to",
        &half,
        "--index-storage",
        "halfvec",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = TestServer::start_at(
        &Place {
            data_dir: dir.path().join("unused2"),
            index_url: Some(half),
        },
        |_| {},
    );
    let r = s
        .http
        .post_json("/search", &json!({"image": b64(&test_png(507)), "k": 1}));
    assert_eq!(r.json()["results"][0]["id"], "m-07");
    assert!(r.json()["results"][0]["score"].as_f64().unwrap() > 0.999);
}

/// `--index-url`'s TLS, as libpq spells it, against a real server with SSL
/// (Debian's PostgreSQL: the pgvector wheel is built without SSL, and TLS
/// does not depend on the extension).
#[test]
fn tls_follows_libpq_sslmodes() {
    use capivara::index::postgres::{PgBackend, PgUrl};
    let Some(bin) = common::postgres::debian_pg_bin() else {
        if common::postgres::pg_required() {
            panic!("Debian's postgresql is not installed (.ci/run installs it)");
        }
        eprintln!("skipped: no /usr/lib/postgresql/*/bin");
        return;
    };
    let certs = tempfile::tempdir().unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(certs.path())
            .output()
            .expect("the openssl command");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        certs.path().join("san.ext"),
        "subjectAltName=IP:127.0.0.1\n",
    )
    .unwrap();
    for ca in ["ca", "other-ca"] {
        let (key, pem, subj) = (
            format!("{ca}.key"),
            format!("{ca}.pem"),
            format!("/CN={ca}"),
        );
        openssl(&[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &pem,
            "-days", "2", "-subj", &subj,
        ]);
    }
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    let read = |n: &str| std::fs::read(certs.path().join(n)).unwrap();
    let mut pg = PgServer::start_in(&bin);
    pg.reconfigure(
        "ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'",
        &[
            ("server.pem", &read("server.pem")),
            ("server.key", &read("server.key")),
        ],
        None,
    );
    let ca = certs.path().join("ca.pem").display().to_string();
    let other = certs.path().join("other-ca.pem").display().to_string();
    let base = pg.url();
    let local = base.replace("127.0.0.1", "localhost");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let probe =
        |url: String| rt.block_on(async { PgBackend::probe(&PgUrl::parse(&url).unwrap()).await });
    // Encrypted without checking the certificate (libpq's `require`).
    assert!(probe(format!("{base}?sslmode=require")).unwrap());
    assert!(probe(format!("{base}?sslmode=prefer")).unwrap());
    assert!(!probe(format!("{base}?sslmode=disable")).unwrap());
    // Checked against the right CA: the chain, and with verify-full the name.
    assert!(probe(format!("{base}?sslmode=verify-full&sslrootcert={ca}")).unwrap());
    assert!(probe(format!("{base}?sslmode=verify-ca&sslrootcert={ca}")).unwrap());
    assert!(probe(format!("{base}?sslmode=require&sslrootcert={ca}")).unwrap());
    // The certificate names 127.0.0.1, not localhost: only the name check fails.
    assert!(probe(format!("{local}?sslmode=verify-ca&sslrootcert={ca}")).unwrap());
    let err = probe(format!("{local}?sslmode=verify-full&sslrootcert={ca}")).unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    // Another CA, and the public roots (no sslrootcert): refused.
    for url in [
        format!("{base}?sslmode=verify-full&sslrootcert={other}"),
        format!("{base}?sslmode=verify-ca&sslrootcert={other}"),
        format!("{base}?sslmode=require&sslrootcert={other}"),
        format!("{base}?sslmode=verify-full"),
    ] {
        let err = probe(url.clone()).unwrap_err();
        assert!(err.to_string().contains("certificate"), "{url}: {err}");
    }
    // A server that only takes TLS refuses `disable`.
    pg.reconfigure(
        "",
        &[],
        Some("local all all trust\nhostssl all all 127.0.0.1/32 trust\n"),
    );
    assert!(probe(format!("{base}?sslmode=require")).unwrap());
    assert!(probe(format!("{base}?sslmode=disable")).is_err());
}

/// Large batches go through COPY into a staging table, small ones row by
/// row: both upsert the same way (the last occurrence of an id in a batch
/// wins) and keep vectors, metadata and thumbnails exactly.
#[test]
fn copy_and_row_inserts_store_the_same() {
    use capivara::index::postgres::{PgBackend, PgOptions, PgUrl, COPY_ABOVE};
    use capivara::index::{Backend, NewImage};
    let Some(pg) = PgServer::shared() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dim = 8;
    let image = |i: usize, version: u32| NewImage {
        id: format!("c{:03}", i % 150),
        vector: (0..dim)
            .map(|d| ((i * 7 + d * 3) % 11) as f32 + 0.5)
            .collect(),
        metadata: json!({"i": i, "version": version}),
        thumbnail: (!i.is_multiple_of(3)).then(|| vec![i as u8; 1 + i % 5]),
    };
    let (copied, rows) = rt.block_on(async {
        let mut out = Vec::new();
        for (batch, version) in [(2 * COPY_ABOVE + 80, 1), (10, 2)] {
            let b = PgBackend::connect(
                &PgUrl::parse(&pg.create_database()).unwrap(),
                dim,
                PgOptions::default(),
            )
            .await
            .unwrap();
            // 300 images, ids repeating after 150: every id written twice.
            let all: Vec<NewImage> = (0..300).map(|i| image(i, version)).collect();
            for chunk in all.chunks(batch) {
                b.insert(chunk.to_vec()).await.unwrap();
            }
            out.push(b.scan(None, 1000).await.unwrap());
        }
        (out.remove(0), out.remove(0))
    });
    // A bulk load into an empty table copies straight into it; a batch
    // meeting ids already there falls back to the upsert, whole.
    let bulk = rt.block_on(async {
        let b = PgBackend::connect(
            &PgUrl::parse(&pg.create_database()).unwrap(),
            dim,
            PgOptions::default(),
        )
        .await
        .unwrap();
        b.begin_bulk().await.unwrap();
        let first: Vec<NewImage> = (0..100).map(|i| image(i, 1)).collect();
        b.insert(first).await.unwrap();
        let second: Vec<NewImage> = (50..150).map(|i| image(i + 150, 2)).collect();
        b.insert(second).await.unwrap();
        b.end_bulk().await.unwrap();
        b.scan(None, 1000).await.unwrap()
    });
    assert_eq!(bulk.len(), 150);
    for im in &bulk {
        let n: usize = im.id[1..].parse().unwrap();
        let version = if n >= 50 { 2 } else { 1 };
        assert_eq!(im.metadata["version"], version, "{}", im.id);
    }
    assert_eq!(copied.len(), 150);
    assert_eq!(rows.len(), 150);
    for (c, r) in copied.iter().zip(&rows) {
        assert_eq!(c.id, r.id);
        assert_eq!(c.vector, r.vector);
        assert_eq!(c.thumbnail, r.thumbnail);
        // The later write of each id won, on both paths.
        assert_eq!(c.metadata["i"], r.metadata["i"]);
        assert!(c.metadata["i"].as_u64().unwrap() >= 150, "{}", c.metadata);
    }
}
