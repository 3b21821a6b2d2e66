//! The HTTP server over real HTTP on 127.0.0.1 with the tiny fixture model:
//! every endpoint's success path checked against the model itself, batching,
//! durability across restarts and kill -9, and every kind of bad input.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device};
use capivara::Pipeline;
use common::server::*;
use common::*;
use serde_json::{json, Value};

fn pipeline() -> Pipeline {
    Pipeline::load(tiny_dir().to_str().unwrap(), &Device::Cpu, DType::F32).unwrap()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The zero-shot probabilities computed directly from the model.
fn expected_probs(p: &Pipeline, image: &[u8], labels: &[&str], templates: &[&str]) -> Vec<f32> {
    let img = p
        .embed_images(&[image])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
        .remove(0);
    let scale = p.clip.logit_scale_exp();
    let logits: Vec<f32> = labels
        .iter()
        .map(|l| {
            let prompts: Vec<String> = templates.iter().map(|t| t.replace("{}", l)).collect();
            let e = p.embed_texts(&prompts).unwrap().to_vec2::<f32>().unwrap();
            let mut m = vec![0f32; e[0].len()];
            for r in &e {
                m.iter_mut().zip(r).for_each(|(a, b)| *a += b);
            }
            let n = dot(&m, &m).sqrt();
            m.iter_mut().for_each(|x| *x /= n);
            scale * dot(&m, &img)
        })
        .collect();
    capivara::engine::softmax(&logits)
}

#[test]
fn classify_matches_the_model_json_and_multipart() {
    let s = TestServer::start(|_| {});
    let p = pipeline();
    let photo = image_bytes("photo.jpg");
    let labels = ["gato", "cachorro", "capivara", "praia"];
    let r = s.http.post_json(
        "/classify",
        &json!({"image": b64(&photo), "labels": labels}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let preds = r.json()["predictions"].as_array().unwrap().clone();
    assert_eq!(preds.len(), 4);
    let templates: Vec<&str> = capivara::server::DEFAULT_TEMPLATES.to_vec();
    let want = expected_probs(&p, &photo, &labels, &templates);
    let mut sum = 0.0;
    let mut last = f32::INFINITY;
    for pr in &preds {
        let label = pr["label"].as_str().unwrap();
        let score = pr["score"].as_f64().unwrap() as f32;
        let i = labels.iter().position(|l| *l == label).unwrap();
        assert!(
            (score - want[i]).abs() <= 1e-5,
            "{label}: {score} vs {}",
            want[i]
        );
        assert!(score <= last, "sorted best first");
        last = score;
        sum += score;
    }
    assert!((sum - 1.0).abs() < 1e-5);

    // Custom templates, top_k, and the multipart form give the same numbers.
    let r = s.http.post_json(
        "/classify",
        &json!({"image": b64(&photo), "labels": labels, "templates": ["uma foto de {}"], "top_k": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let preds = r.json()["predictions"].as_array().unwrap().clone();
    assert_eq!(preds.len(), 2);
    let want = expected_probs(&p, &photo, &labels, &["uma foto de {}"]);
    let best = want.iter().cloned().fold(0f32, f32::max);
    assert!((preds[0]["score"].as_f64().unwrap() as f32 - best).abs() <= 1e-5);

    let r = s.http.post_multipart(
        "/classify",
        &[
            ("image", Some("photo.jpg"), &photo),
            ("labels", None, b"gato, cachorro"),
            ("labels", None, b"[\"capivara\", \"praia\"]"),
            ("templates", None, b"uma foto de {}"),
        ],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let preds = r.json()["predictions"].as_array().unwrap().clone();
    assert_eq!(preds.len(), 4);
    for pr in &preds {
        let i = labels
            .iter()
            .position(|l| *l == pr["label"].as_str().unwrap())
            .unwrap();
        assert!((pr["score"].as_f64().unwrap() as f32 - want[i]).abs() <= 1e-5);
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn repeated_label_sets_cost_only_the_image_pass() {
    let s = TestServer::start(|_| {});
    let body = json!({"image": b64(&image_bytes("gray.png")), "labels": ["gato", "cachorro"]});
    assert_eq!(s.http.post_json("/classify", &body).status, 200);
    let m1 = s.http.get("/metrics").text;
    let texts_before = metric(
        &m1,
        "capivara_batch_size_sum{model=\"tiny\",tower=\"text\"}",
    );
    let images_before = metric(
        &m1,
        "capivara_batch_size_sum{model=\"tiny\",tower=\"image\"}",
    );
    assert!(
        texts_before >= 14.0,
        "2 labels x 7 templates embedded: {texts_before}"
    );
    assert_eq!(s.http.post_json("/classify", &body).status, 200);
    let m2 = s.http.get("/metrics").text;
    assert_eq!(
        metric(
            &m2,
            "capivara_batch_size_sum{model=\"tiny\",tower=\"text\"}"
        ),
        texts_before,
        "labels came from the cache"
    );
    assert_eq!(
        metric(
            &m2,
            "capivara_batch_size_sum{model=\"tiny\",tower=\"image\"}"
        ),
        images_before + 1.0
    );
}

on_each_store!(
    search_equals_brute_force_on_500_images,
    images_get_and_delete,
    restart_and_kill9_keep_acknowledged_images,
    api_key_guards_writes_only,
    thumbnails_follow_their_images,
    bulk_index_equals_http_ingest,
    an_index_refuses_another_models_embeddings,
    search_by_vector,
);

fn search_equals_brute_force_on_500_images(store: Store) {
    // The HNSW graph answers (not the exact path small indexes take).
    let Some(s) = TestServer::start_on(store, |c| {
        c.hnsw.exact_search_below = 0;
        c.hnsw.graph_above = 0;
        c.hnsw.background_build = false;
        c.pg.exact_search_below = 0;
    }) else {
        return;
    };
    let n = 500;
    let mut vectors = Vec::new();
    for chunk in (0..n).collect::<Vec<u32>>().chunks(50) {
        let images: Vec<Value> = chunk
            .iter()
            .map(|&i| json!({"image": b64(&test_png(i)), "id": format!("img-{i}"), "metadata": {"n": i}}))
            .collect();
        let r = s.http.post_json("/images", &json!({ "images": images }));
        assert_eq!(r.status, 200, "{}", r.text);
        let ids = r.json()["ids"].as_array().unwrap().clone();
        assert_eq!(ids.len(), chunk.len());
        let e = s.http.post_json(
            "/embed/image",
            &json!({"images": chunk.iter().map(|&i| b64(&test_png(i))).collect::<Vec<_>>()}),
        );
        assert_eq!(e.status, 200, "{}", e.text);
        for (i, v) in chunk.iter().zip(e.json()["embeddings"].as_array().unwrap()) {
            vectors.push((format!("img-{i}"), floats(v)));
        }
    }
    let m = s.http.get("/metrics").text;
    assert_eq!(metric(&m, "capivara_index_size"), n as f64);
    for (q, k) in [
        ("um quadrado vermelho", 10),
        ("uma foto azul", 1),
        ("capivara", 50),
        ("praia", 500),
    ] {
        let qv = floats(
            &s.http
                .post_json("/embed/text", &json!({"texts": [q]}))
                .json()["embeddings"][0],
        );
        let mut brute: Vec<(String, f32)> = vectors
            .iter()
            .map(|(id, v)| (id.clone(), dot(&qv, v)))
            .collect();
        brute.sort_by(|a, b| b.1.total_cmp(&a.1));
        let r = s.http.post_json("/search", &json!({"query": q, "k": k}));
        assert_eq!(r.status, 200, "{}", r.text);
        let results = r.json()["results"].as_array().unwrap().clone();
        assert_eq!(results.len(), k);
        for (got, want) in results.iter().zip(&brute) {
            let score = got["score"].as_f64().unwrap() as f32;
            assert!((score - want.1).abs() <= 1e-4, "{q}: {score} vs {}", want.1);
            // Ties aside, the same ids in the same order.
            if got["id"] != want.0.as_str() {
                let other = brute
                    .iter()
                    .find(|(id, _)| got["id"] == id.as_str())
                    .unwrap();
                assert!(
                    (other.1 - want.1).abs() <= 1e-5,
                    "{q}: {} instead of {}",
                    got["id"],
                    want.0
                );
            }
            let idn: u32 = got["id"].as_str().unwrap()[4..].parse().unwrap();
            assert_eq!(got["metadata"]["n"], idn);
        }
    }
    // Image queries search too.
    let r = s
        .http
        .post_json("/search", &json!({"image": b64(&test_png(7)), "k": 1}));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["results"][0]["id"], "img-7");
    assert!(r.json()["results"][0]["score"].as_f64().unwrap() > 0.999);
}

fn images_get_and_delete(store: Store) {
    let Some(s) = TestServer::start_on(store, |_| {}) else {
        return;
    };
    let r = s.http.post_json(
        "/images",
        &json!({"images": [{"image": b64(&test_png(1)), "id": "a.1", "metadata": {"caption": "um gato"}},
                            {"image": b64(&test_png(2))}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let ids = r.json()["ids"].clone();
    assert_eq!(ids[0], "a.1");
    let generated = ids[1].as_str().unwrap().to_string();
    assert_eq!(generated.len(), 16);
    let g = s.http.get("/images/a.1");
    assert_eq!(g.status, 200);
    assert_eq!(
        g.json(),
        json!({"id": "a.1", "metadata": {"caption": "um gato"}})
    );
    assert_eq!(
        s.http.get(&format!("/images/{generated}")).json()["metadata"],
        json!({})
    );
    // Multipart ingest with id and metadata.
    let png = test_png(3);
    let r = s.http.post_multipart(
        "/images",
        &[
            ("image", Some("x.png"), &png),
            ("id", None, b"mp"),
            ("metadata", None, b"{\"k\": 1}"),
        ],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(s.http.get("/images/mp").json()["metadata"]["k"], 1);
    // Delete: gone from GET and from search.
    assert_eq!(s.http.delete("/images/a.1", None).status, 200);
    assert_eq!(s.http.get("/images/a.1").status, 404);
    assert_eq!(s.http.delete("/images/a.1", None).status, 404);
    let r = s
        .http
        .post_json("/search", &json!({"image": b64(&test_png(1)), "k": 10}));
    assert!(r.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["id"] != "a.1"));
    assert_eq!(r.json()["results"].as_array().unwrap().len(), 2);
}

#[test]
fn embeddings_match_the_model() {
    let s = TestServer::start(|_| {});
    let p = pipeline();
    let r = reference();
    let t = s.http.post_json("/embed/text", &json!({"texts": r.texts}));
    assert_eq!(t.status, 200);
    let got: Vec<Vec<f32>> = t.embeddings();
    assert!(max_abs_diff(&got, &r.text_embeddings) <= 1e-4);
    let imgs = ["photo.jpg", "palette.png", "anim.gif"];
    let i = s.http.post_json(
        "/embed/image",
        &json!({"images": imgs.iter().map(|n| b64(&image_bytes(n))).collect::<Vec<_>>()}),
    );
    assert_eq!(i.status, 200);
    let got: Vec<Vec<f32>> = i.embeddings();
    let bytes: Vec<Vec<u8>> = imgs.iter().map(|n| image_bytes(n)).collect();
    let want = p.embed_images(&bytes).unwrap().to_vec2::<f32>().unwrap();
    assert!(max_abs_diff(&got, &want) <= 1e-5);
}

/// `serve --jpeg-draft`: a large JPEG is embedded from its drafted decode
/// (as the preprocessor with the draft embeds it), not the full one.
#[test]
fn jpeg_draft_serves_the_drafted_decode() {
    let s = TestServer::start(|c| c.jpeg_draft = true);
    let jpeg = gradient_jpeg(960, 900);
    let r = s
        .http
        .post_json("/embed/image", &json!({"images": [b64(&jpeg)]}));
    assert_eq!(r.status, 200);
    let got: Vec<Vec<f32>> = r.embeddings();
    let mut p = pipeline();
    let plain = p
        .embed_images(std::slice::from_ref(&jpeg))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    p.preprocessor = p.preprocessor.clone().with_jpeg_draft(true);
    let drafted = p.embed_images(&[jpeg]).unwrap().to_vec2::<f32>().unwrap();
    assert!(max_abs_diff(&got, &drafted) <= 1e-5);
    assert!(
        max_abs_diff(&got, &plain) > 1e-5,
        "the full decode would differ"
    );
}

#[test]
fn concurrent_requests_are_batched_and_answers_unchanged() {
    let s = Arc::new(TestServer::start(|c| {
        c.engine.text.max_wait = std::time::Duration::from_millis(50);
        c.engine.image.max_wait = std::time::Duration::from_millis(50);
    }));
    let texts: Vec<String> = (0..32).map(|i| format!("uma foto número {i}")).collect();
    let images: Vec<Vec<u8>> = (0..32).map(test_png).collect();
    // Unbatched answers, one at a time.
    let single_t: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| {
            floats(
                &s.http
                    .post_json("/embed/text", &json!({"texts": [t]}))
                    .json()["embeddings"][0],
            )
        })
        .collect();
    let single_i: Vec<Vec<f32>> = images
        .iter()
        .map(|b| {
            floats(
                &s.http
                    .post_json("/embed/image", &json!({"images": [b64(b)]}))
                    .json()["embeddings"][0],
            )
        })
        .collect();
    let before = s.http.get("/metrics").text;
    let handles: Vec<_> = (0..32)
        .map(|i| {
            let s = s.clone();
            let (t, b) = (texts[i].clone(), images[i].clone());
            std::thread::spawn(move || {
                let rt = s.http.post_json("/embed/text", &json!({"texts": [t]}));
                let ri = s
                    .http
                    .post_json("/embed/image", &json!({"images": [b64(&b)]}));
                assert_eq!((rt.status, ri.status), (200, 200));
                (
                    floats(&rt.json()["embeddings"][0]),
                    floats(&ri.json()["embeddings"][0]),
                )
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (t, im) = h.join().unwrap();
        assert!(max_abs_diff(&[t], &single_t[i..i + 1]) <= 1e-5);
        assert!(max_abs_diff(&[im], &single_i[i..i + 1]) <= 1e-5);
    }
    let after = s.http.get("/metrics").text;
    for tower in ["text", "image"] {
        let items = metric(
            &after,
            &format!("capivara_batch_size_sum{{model=\"tiny\",tower=\"{tower}\"}}"),
        ) - metric(
            &before,
            &format!("capivara_batch_size_sum{{model=\"tiny\",tower=\"{tower}\"}}"),
        );
        let passes = metric(
            &after,
            &format!("capivara_batch_size_count{{model=\"tiny\",tower=\"{tower}\"}}"),
        ) - metric(
            &before,
            &format!("capivara_batch_size_count{{model=\"tiny\",tower=\"{tower}\"}}"),
        );
        assert_eq!(items, 32.0, "{tower}");
        assert!(
            passes < 32.0,
            "{tower}: 32 requests in {passes} passes: some batches must be larger than 1"
        );
    }
}

fn restart_and_kill9_keep_acknowledged_images(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let Some(place) = Place::fresh(store, dir.path()) else {
        return;
    };
    // In-process, graceful stop, restart.
    {
        let s = TestServer::start_at(&place, |_| {});
        let r = s.http.post_json(
            "/images",
            &json!({"images": [{"image": b64(&test_png(10)), "id": "graceful"}]}),
        );
        assert_eq!(r.status, 200);
        s.stop();
    }
    // A child process killed with SIGKILL right after its acknowledgements.
    let child = ChildServer::spawn_at(&place, &[], &[]);
    assert_eq!(child.http.get("/images/graceful").status, 200);
    let mut acked = Vec::new();
    for i in 0..5u32 {
        let id = format!("k9-{i}");
        let r = child.http.post_json(
            "/images",
            &json!({"images": [{"image": b64(&test_png(100 + i)), "id": id}]}),
        );
        assert_eq!(r.status, 200, "{}", r.text);
        acked.push(id);
    }
    let r = child.http.delete("/images/k9-0", None);
    assert_eq!(r.status, 200);
    child.kill9();
    let child = ChildServer::spawn_at(&place, &[], &[]);
    for id in &acked[1..] {
        assert_eq!(
            child.http.get(&format!("/images/{id}")).status,
            200,
            "{id} lost"
        );
    }
    assert_eq!(
        child.http.get("/images/k9-0").status,
        404,
        "the delete was acknowledged too"
    );
    let r = child
        .http
        .post_json("/search", &json!({"image": b64(&test_png(103)), "k": 1}));
    assert_eq!(r.json()["results"][0]["id"], "k9-3");
    // SIGTERM: a clean exit, and nothing lost.
    assert!(child.terminate().success());
    let child = ChildServer::spawn_at(&place, &[], &[]);
    assert_eq!(child.http.get("/images/k9-4").status, 200);
}

fn api_key_guards_writes_only(store: Store) {
    let Some(s) = TestServer::start_on(store, |c| c.api_key = Some("s3cret".into())) else {
        return;
    };
    let body = json!({"images": [{"image": b64(&test_png(5)), "id": "x"}]});
    let r = s.http.post_json("/images", &body);
    assert_eq!((r.status, r.error_code().as_str()), (401, "unauthorized"));
    let r = s.http.post_json_key("/images", &body, "wrong");
    assert_eq!((r.status, r.error_code().as_str()), (401, "unauthorized"));
    assert_eq!(s.http.post_json_key("/images", &body, "s3cret").status, 200);
    assert_eq!(s.http.delete("/images/x", None).status, 401);
    assert_eq!(s.http.get("/images/x").status, 200, "reads need no key");
    assert_eq!(
        s.http
            .post_json("/search", &json!({"query": "gato"}))
            .status,
        200
    );
    assert_eq!(s.http.delete("/images/x", Some("s3cret")).status, 200);
}

#[test]
fn bad_inputs_get_their_4xx_and_the_server_keeps_serving() {
    let s = TestServer::start(|c| {
        c.limits.max_body_bytes = 200_000;
        c.limits.max_pixels = 100_000;
    });
    let img = b64(&image_bytes("gray.png"));
    let h = &s.http;
    let cases: Vec<(&str, Resp, u16, &str)> = vec![
        ("body too large", h.post_announced("/classify", "application/json", 300_000), 413, "payload_too_large"),
        ("too many pixels", h.post_json("/classify", &json!({"image": b64(&image_bytes("photo.jpg")), "labels": ["a"]})), 422, "image_too_large"),
        ("no labels", h.post_json("/classify", &json!({"image": img, "labels": []})), 400, "invalid_labels"),
        ("1001 labels", h.post_json("/classify", &json!({"image": img, "labels": (0..1001).map(|i| i.to_string()).collect::<Vec<_>>()})), 400, "invalid_labels"),
        ("label too long", h.post_json("/classify", &json!({"image": img, "labels": ["x".repeat(201)]})), 400, "invalid_labels"),
        ("duplicate labels", h.post_json("/classify", &json!({"image": img, "labels": ["a", "a"]})), 400, "invalid_labels"),
        ("top_k 0", h.post_json("/classify", &json!({"image": img, "labels": ["a"], "top_k": 0})), 400, "invalid_top_k"),
        ("bad base64", h.post_json("/classify", &json!({"image": "%%%not base64%%%", "labels": ["a"]})), 400, "invalid_base64"),
        ("not an image", h.post_json("/classify", &json!({"image": b64(b"hello world, not an image"), "labels": ["a"]})), 415, "unsupported_image"),
        ("corrupt image", h.post_json("/classify", &json!({"image": b64(&image_bytes("rgba.png")[..400]), "labels": ["a"]})), 400, "invalid_image"),
        ("invalid JSON", h.post_raw("/classify", "application/json", b"{not json".to_vec(), None), 400, "invalid_json"),
        ("missing field", h.post_json("/classify", &json!({"labels": ["a"]})), 400, "invalid_json"),
        ("text/plain", h.post_raw("/classify", "text/plain", b"hi".to_vec(), None), 415, "unsupported_media_type"),
        ("multipart without image", h.post_multipart("/classify", &[("labels", None, b"a")], None), 400, "missing_image"),
        ("empty query", h.post_json("/search", &json!({"query": "   "})), 400, "empty_query"),
        ("no query", h.post_json("/search", &json!({})), 400, "empty_query"),
        ("k 0", h.post_json("/search", &json!({"query": "gato", "k": 0})), 400, "invalid_k"),
        ("k 1001", h.post_json("/search", &json!({"query": "gato", "k": 1001})), 400, "invalid_k"),
        ("search multipart", h.post_multipart("/search", &[("query", None, b"gato")], None), 415, "unsupported_media_type"),
        ("unknown id", h.get("/images/nope"), 404, "not_found"),
        ("delete unknown id", h.delete("/images/nope", None), 404, "not_found"),
        ("invalid id", h.post_json("/images", &json!({"images": [{"image": img, "id": "../etc/passwd"}]})), 400, "invalid_id"),
        ("id with space", h.post_json("/images", &json!({"images": [{"image": img, "id": "a b"}]})), 400, "invalid_id"),
        ("duplicate ids", h.post_json("/images", &json!({"images": [{"image": img, "id": "d"}, {"image": img, "id": "d"}]})), 400, "invalid_id"),
        ("metadata not object", h.post_json("/images", &json!({"images": [{"image": img, "metadata": [1, 2]}]})), 400, "invalid_metadata"),
        ("metadata too big", h.post_json("/images", &json!({"images": [{"image": img, "metadata": {"x": "y".repeat(20_000)}}]})), 400, "invalid_metadata"),
        ("no images", h.post_json("/images", &json!({"images": []})), 400, "invalid_images"),
        ("no texts", h.post_json("/embed/text", &json!({"texts": []})), 400, "invalid_texts"),
        ("unknown route", h.get("/nope"), 404, "not_found"),
    ];
    for (what, r, status, code) in cases {
        assert_eq!(r.status, status, "{what}: {}", r.text);
        assert!(
            r.content_type.starts_with("application/json"),
            "{what}: {}",
            r.content_type
        );
        assert_eq!(r.error_code(), code, "{what}");
    }
    // A failed ingest wrote nothing.
    assert_eq!(h.get("/images/d").status, 404);
    let m = h.get("/metrics").text;
    assert_eq!(metric(&m, "capivara_index_size"), 0.0);
    // Still serving.
    assert_eq!(h.get("/healthz").status, 200);
    assert_eq!(
        h.post_json("/classify", &json!({"image": img, "labels": ["a", "b"]}))
            .status,
        200
    );
    // Errors are counted by route and status.
    let m = h.get("/metrics").text;
    assert!(
        m.contains(
            "capivara_http_requests_total{method=\"POST\",route=\"/classify\",status=\"413\"} 1"
        ),
        "{m}"
    );
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let s = Arc::new(TestServer::start(|c| {
        c.engine.queue_capacity = 1;
        c.engine.text.max_items = 1;
        c.engine.text.max_wait = std::time::Duration::from_millis(0);
    }));
    let big: Vec<String> = (0..200)
        .map(|i| format!("texto longo número {i} ").repeat(6))
        .collect();
    let handles: Vec<_> = (0..24)
        .map(|_| {
            let s = s.clone();
            let texts = big.clone();
            std::thread::spawn(move || s.http.post_json("/embed/text", &json!({"texts": texts})))
        })
        .collect();
    let results: Vec<Resp> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let busy: Vec<&Resp> = results.iter().filter(|r| r.status == 503).collect();
    assert!(
        !busy.is_empty(),
        "24 concurrent requests on a queue of 1 must overflow"
    );
    for r in &busy {
        assert_eq!(r.error_code(), "overloaded");
        assert_eq!(r.retry_after.as_deref(), Some("1"));
    }
    assert!(results.iter().any(|r| r.status == 200));
    assert!(results.iter().all(|r| r.status == 200 || r.status == 503));
    assert_eq!(s.http.get("/healthz").status, 200);
}

#[test]
fn health_readiness_metrics_docs_and_openapi() {
    let s = TestServer::start(|_| {});
    assert_eq!(s.http.get("/healthz").json()["status"], "ok");
    assert_eq!(s.http.get("/readyz").json()["status"], "ready");
    let m = s.http.get("/metrics");
    assert!(m.content_type.starts_with("text/plain"));
    for name in [
        "capivara_http_requests_total",
        "capivara_http_request_duration_seconds",
        "capivara_batch_size",
        "capivara_model_forward_seconds",
        "capivara_queue_depth",
        "capivara_index_size",
    ] {
        assert!(m.text.contains(name), "{name} missing from /metrics");
    }
    let served = s.http.get("/openapi.json").json();
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json"))
            .expect("openapi/openapi.json is committed (regenerate: capivara openapi > openapi/openapi.json)"),
    )
    .unwrap();
    assert_eq!(
        served, committed,
        "openapi/openapi.json is stale: run `capivara openapi > openapi/openapi.json`"
    );
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_capivara"))
        .arg("openapi")
        .output()
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&printed.stdout).unwrap(),
        committed
    );
    for path in [
        "/classify",
        "/search",
        "/images",
        "/images/{id}",
        "/embed/text",
        "/embed/image",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(served["paths"][path].is_object(), "{path} not documented");
    }
    // Swagger UI is served from the binary: no asset from elsewhere.
    let docs = s.http.get("/docs/");
    assert_eq!(docs.status, 200);
    assert!(docs.text.contains("swagger"), "{}", docs.text);
    assert!(
        !docs.text.contains("https://") && !docs.text.contains("http://"),
        "external asset in {}",
        docs.text
    );
    let init = s.http.get("/docs/swagger-initializer.js");
    assert_eq!(init.status, 200);
    assert!(init.text.contains("/openapi.json"));
    let css = s.http.get("/docs/swagger-ui.css");
    assert_eq!(css.status, 200);
    assert!(css.text.len() > 1000);
}

#[test]
fn flags_and_env_vars_configure_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let templates = dir.path().join("templates.txt");
    std::fs::write(&templates, "# one template per line\numa pintura de {}\n\n").unwrap();
    let child = ChildServer::spawn_env(
        &dir.path().join("data"),
        &[
            "--templates",
            templates.to_str().unwrap(),
            "--max-batch-size",
            "4",
        ],
        &[("CAPIVARA_API_KEY", "from-env")],
    );
    let photo = image_bytes("photo.jpg");
    let labels = ["gato", "cachorro", "capivara"];
    let r = child.http.post_json(
        "/classify",
        &json!({"image": b64(&photo), "labels": labels}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let want = expected_probs(&pipeline(), &photo, &labels, &["uma pintura de {}"]);
    for pr in r.json()["predictions"].as_array().unwrap() {
        let i = labels
            .iter()
            .position(|l| *l == pr["label"].as_str().unwrap())
            .unwrap();
        assert!(
            (pr["score"].as_f64().unwrap() as f32 - want[i]).abs() <= 1e-5,
            "the --templates file is used"
        );
    }
    let body = json!({"images": [{"image": b64(&test_png(1))}]});
    assert_eq!(
        child.http.post_json("/images", &body).status,
        401,
        "CAPIVARA_API_KEY is used"
    );
    assert_eq!(
        child
            .http
            .post_json_key("/images", &body, "from-env")
            .status,
        200
    );
    // Bad flags: a clear error and a non-zero exit, before serving anything.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capivara"))
        .args(["serve", "--model"])
        .arg(tiny_dir())
        .args([
            "--templates",
            "/no/such/templates.txt",
            "--addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/templates.txt"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capivara"))
        .args(["serve", "--model"])
        .arg(tiny_dir())
        .args(["--quantize", "int4", "--addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown quantization"));
}

/// `CAPIVARA_QUANTIZE=int8` serves int8 embeddings (close to f32, not equal),
/// or, on a CPU without AVX-512 VNNI, the server refuses to start, clearly.
#[test]
fn int8_serving_from_the_env_var() {
    if !capivara::kernels::qgemm::available() {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_capivara"))
            .args(["serve", "--model"])
            .arg(tiny_dir())
            .args(["--addr", "127.0.0.1:0"])
            .env("CAPIVARA_QUANTIZE", "int8")
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("AVX-512 VNNI"));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let child = ChildServer::spawn_env(
        &dir.path().join("data"),
        &[],
        &[("CAPIVARA_QUANTIZE", "int8")],
    );
    let texts = ["uma capivara na beira do rio", "um gato"];
    let r = child
        .http
        .post_json("/embed/text", &json!({ "texts": texts }));
    assert_eq!(r.status, 200, "{}", r.text);
    let got: Vec<Vec<f32>> = serde_json::from_value(r.json()["embeddings"].clone()).unwrap();
    let want = pipeline()
        .embed_texts(&texts)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (g, w) in got.iter().zip(&want) {
        let c: f32 = g.iter().zip(w).map(|(a, b)| a * b).sum();
        assert!((0.99..0.999_999_9).contains(&c), "cosine {c}");
    }
}

#[test]
fn not_ready_until_loaded() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        capivara::server::ServeConfig::new("unused", "127.0.0.1:0".parse().unwrap(), dir.path());
    let state = Arc::new(capivara::server::AppState::new(cfg));
    let app = capivara::server::router(state);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });
    let http = Http::new(addr);
    assert_eq!(http.get("/healthz").status, 200);
    let r = http.get("/readyz");
    assert_eq!((r.status, r.error_code().as_str()), (503, "not_ready"));
    let r = http.post_json("/search", &json!({"query": "gato"}));
    assert_eq!((r.status, r.error_code().as_str()), (503, "not_ready"));
}

#[test]
fn a_model_that_cannot_load_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capivara"))
        .args([
            "serve",
            "--model",
            "/no/such/model",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/model"));
}

/// Ingest keeps a thumbnail (longest side <= 256, aspect kept), served at
/// /images/{id}/thumbnail; a replacement updates it, a delete removes it.
fn thumbnails_follow_their_images(store: Store) {
    let Some(s) = TestServer::start_on(store, |_| {}) else {
        return;
    };
    let wide = {
        let img = image::RgbImage::from_fn(900, 300, |x, _| image::Rgb([(x % 256) as u8, 90, 200]));
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    let small = test_png(3);
    let r = s.http.post_json(
        "/images",
        &json!({"images": [{"image": b64(&wide), "id": "wide"}, {"image": b64(&small), "id": "small"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let jpeg_size = |b: &[u8]| mozjpeg::Decompress::new_mem(b).unwrap().size();
    let (status, ct, body) = s.http.get_bytes("/images/wide/thumbnail");
    assert_eq!((status, ct.as_str()), (200, "image/jpeg"));
    assert_eq!(jpeg_size(&body), (256, 85));
    // Small images are not enlarged.
    let (_, _, body) = s.http.get_bytes("/images/small/thumbnail");
    let orig = image::load_from_memory(&small).unwrap();
    assert_eq!(
        jpeg_size(&body),
        (orig.width() as usize, orig.height() as usize)
    );
    // Replacing the image replaces the thumbnail.
    let r = s.http.post_json(
        "/images",
        &json!({"images": [{"image": b64(&small), "id": "wide"}]}),
    );
    assert_eq!(r.status, 200);
    let (_, _, body) = s.http.get_bytes("/images/wide/thumbnail");
    assert_eq!(jpeg_size(&body).0, orig.width() as usize);
    // Deleted, unknown, invalid.
    assert_eq!(s.http.delete("/images/wide", None).status, 200);
    let r = s.http.get("/images/wide/thumbnail");
    assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
    assert_eq!(s.http.get("/images/nope/thumbnail").status, 404);
    let r = s.http.get("/images/bad%20id/thumbnail");
    assert_eq!((r.status, r.error_code().as_str()), (400, "invalid_id"));
    // A failed ingest (one undecodable image) leaves no thumbnail behind.
    let r = s.http.post_json(
        "/images",
        &json!({"images": [{"image": b64(&small), "id": "ok"}, {"image": b64(b"junk"), "id": "junk"}]}),
    );
    assert_eq!(r.status, 415);
    assert_eq!(s.http.get("/images/ok/thumbnail").status, 404);
    if store == Store::DataDir {
        let files: Vec<String> = std::fs::read_dir(s.data_dir.join("thumbnails"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files, ["small.jpg"]);
    }
}

#[test]
fn the_page_and_its_assets_are_served() {
    let s = TestServer::start(|_| {});
    for (path, ct, needle) in [
        ("/", "text/html", "<html"),
        ("/app.js", "text/javascript", ""),
        ("/style.css", "text/css", ""),
    ] {
        let r = s.http.get(path);
        assert_eq!(r.status, 200, "{path}");
        assert!(r.content_type.starts_with(ct), "{path}: {}", r.content_type);
        assert!(r.text.contains(needle) && !r.text.is_empty(), "{path}");
        // Everything the page loads comes from this server.
        assert!(
            !r.text.contains("https://") && !r.text.contains("http://"),
            "{path} links outside"
        );
    }
}

/// A second process on the same data directory is refused, clearly.
#[test]
fn one_server_per_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = ChildServer::spawn(&data, &[]);
    assert_eq!(first.http.get("/readyz").status, 200);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capivara"))
        .args(["serve", "--model"])
        .arg(tiny_dir())
        .args(["--addr", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another capivara process"), "{err}");
    assert!(err.contains(&format!("pid {}", first.child.id())), "{err}");
}

/// `capivara index` on a folder of 200 generated images gives the same
/// search results as ingesting them over HTTP; shards, skips, the lock.
fn bulk_index_equals_http_ingest(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let (Some(place_a), Some(place_b)) = (
        Place::fresh(store, &dir.path().join("a")),
        Place::fresh(store, &dir.path().join("b")),
    ) else {
        return;
    };
    let imgs = dir.path().join("imgs");
    std::fs::create_dir_all(imgs.join("sub")).unwrap();
    let mut expected: Vec<(String, String, Vec<u8>)> = Vec::new(); // id, path, bytes
    for i in 0..200u32 {
        let name = format!("img-{i:03}.png");
        let bytes = test_png(1000 + i);
        std::fs::write(imgs.join(&name), &bytes).unwrap();
        expected.push((name.clone(), name, bytes));
    }
    let sub = test_png(7);
    std::fs::write(imgs.join("sub/foto 1.png"), &sub).unwrap();
    expected.push(("sub-foto_1.png".into(), "sub/foto 1.png".into(), sub));
    std::fs::write(imgs.join("broken.png"), b"not a png").unwrap();
    std::fs::write(imgs.join("notes.txt"), b"ignored").unwrap();

    let run_index = |place: &Place, extra: &[&std::ffi::OsStr]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_capivara"))
            .arg("index")
            .arg("--model")
            .arg(tiny_dir())
            .args(place.args())
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let out = run_index(&place_a, &[imgs.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["indexed"], 201);
    assert_eq!(report["skipped"], 1);
    assert_eq!(report["index_size"], 201);
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.png"));

    // The same images over HTTP, with the ids and metadata `index` gave.
    let http = TestServer::start_on(store, |_| {}).expect("available above");
    for chunk in expected.chunks(32) {
        let images: Vec<Value> = chunk
            .iter()
            .map(|(id, path, b)| json!({"image": b64(b), "id": id, "metadata": {"path": path}}))
            .collect();
        let r = http.http.post_json("/images", &json!({ "images": images }));
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let served = ChildServer::spawn_at(&place_a, &[], &[]);
    let queries = [
        json!({"query": "um quadrado vermelho", "k": 10}),
        json!({"query": "uma capivara", "k": 201}),
        json!({"image": b64(&test_png(1042)), "k": 5}),
    ];
    for q in &queries {
        let (a, b) = (
            served.http.post_json("/search", q),
            http.http.post_json("/search", q),
        );
        assert_eq!((a.status, b.status), (200, 200), "{}", a.text);
        let (a, b) = (a.json()["results"].clone(), b.json()["results"].clone());
        let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x["id"], y["id"], "{q}");
            assert_eq!(x["metadata"], y["metadata"]);
            let (s, t) = (x["score"].as_f64().unwrap(), y["score"].as_f64().unwrap());
            assert!((s - t).abs() < 1e-5, "{s} vs {t}");
        }
    }
    let (status, ct, _) = served.http.get_bytes("/images/sub-foto_1.png/thumbnail");
    assert_eq!((status, ct.as_str()), (200, "image/jpeg"));

    let out = run_index(&place_a, &[imgs.as_os_str()]);
    match store {
        // The server holds the data directory: `index` is refused, clearly.
        Store::DataDir => {
            assert!(!out.status.success());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("in use by another capivara process"), "{err}");
        }
        // Postgres is shared: a bulk ingest beside a server is fine (the
        // same ids again: an upsert).
        Store::Postgres => {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let report: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(report["index_size"], 201);
            assert_eq!(
                metric(&served.http.get("/metrics").text, "capivara_index_size"),
                201.0
            );
        }
    }
    drop(served);

    // A webdataset shard: keys become ids, the sample JSON the metadata.
    let shard = dir.path().join("00000.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&shard).unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        add("000001.png", &test_png(1));
        add("000001.json", br#"{"captions-pt": ["um gato"]}"#);
        add("000002.png", &test_png(2));
        b.finish().unwrap();
    }
    let out = run_index(&place_b, &[shard.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let served = ChildServer::spawn_at(&place_b, &[], &[]);
    let r = served.http.get("/images/000001");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["metadata"],
        json!({"captions-pt": ["um gato"], "shard": "00000.tar", "key": "000001"})
    );
    assert_eq!(
        served.http.get("/images/000002").json()["metadata"]["key"],
        "000002"
    );
    drop(served);

    // Bad input: a missing path, a zero batch.
    let out = run_index(&place_b, &[std::ffi::OsStr::new("/no/such/folder")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/folder"));
    let out = run_index(
        &place_b,
        &[
            std::ffi::OsStr::new("--batch-size"),
            std::ffi::OsStr::new("0"),
            imgs.as_os_str(),
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--batch-size"));
}

/// `name;dur=ms` entries of a `Server-Timing` header.
fn stages(header: &str) -> std::collections::BTreeMap<String, f64> {
    header
        .split(',')
        .map(|e| {
            let (name, dur) = e.trim().split_once(";dur=").expect("name;dur=ms");
            (name.to_string(), dur.parse::<f64>().expect("milliseconds"))
        })
        .collect()
}

#[test]
fn every_request_reports_where_its_time_went() {
    let s = TestServer::start(|_| {});
    let body = json!({"image": b64(&image_bytes("photo.jpg")), "labels": ["gato", "cachorro"]});
    let r = s.http.post_json("/classify", &body);
    assert_eq!(r.status, 200);
    let t = stages(r.server_timing.as_deref().expect("a Server-Timing header"));
    for stage in [
        "decode",
        "tokenize",
        "image-queue",
        "image-inference",
        "text-queue",
        "text-inference",
        "total",
    ] {
        assert!(t.get(stage).is_some_and(|&d| d >= 0.0), "{stage}: {t:?}");
    }
    assert!(
        t["image-inference"] > 0.0 && t["text-inference"] > 0.0,
        "{t:?}"
    );
    assert!(t["decode"] <= t["total"] && t["image-inference"] <= t["total"]);
    // A search by text: no image work.
    let r = s.http.post_json("/search", &json!({"query": "um gato"}));
    assert_eq!(r.status, 200);
    let t = stages(r.server_timing.as_deref().unwrap());
    assert!(t.contains_key("tokenize") && t.contains_key("text-inference"));
    assert!(
        !t.contains_key("decode") && !t.contains_key("image-queue"),
        "{t:?}"
    );
    // Errors and plain routes carry the total alone.
    let r = s.http.get("/healthz");
    assert_eq!(stages(r.server_timing.as_deref().unwrap()).len(), 1);
    // The same split in the metrics, by route.
    let m = s.http.get("/metrics").text;
    for (route, stage) in [
        ("/classify", "decode"),
        ("/classify", "text-inference"),
        ("/search", "tokenize"),
        ("/search", "text-queue"),
    ] {
        let name =
            format!("capivara_request_stage_seconds_count{{model=\"tiny\",route=\"{route}\",stage=\"{stage}\"}}");
        assert!(metric(&m, &name) >= 1.0, "{name} missing:\n{m}");
    }
}

#[test]
fn text_passes_stay_within_the_token_budget() {
    let s = TestServer::start(|c| {
        c.engine.text.max_tokens = 24;
        c.engine.text.max_wait = std::time::Duration::from_millis(20);
    });
    let texts: Vec<String> = (0..12)
        .map(|i| format!("uma foto de um gato número {i} na praia"))
        .collect();
    let r = s.http.post_json("/embed/text", &json!({ "texts": texts }));
    assert_eq!(r.status, 200);
    let got: Vec<Vec<f32>> = r.embeddings();
    let want = pipeline()
        .embed_texts(&texts)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(max_abs_diff(&got, &want) <= 1e-5);
    let m = s.http.get("/metrics").text;
    let passes = metric(
        &m,
        "capivara_batch_tokens_count{model=\"tiny\",tower=\"text\"}",
    );
    let tokens = metric(
        &m,
        "capivara_batch_tokens_sum{model=\"tiny\",tower=\"text\"}",
    );
    // The warm-up pass is not observed; each text is > 8 tokens, so at most
    // two share a 24-token pass.
    assert!(passes >= 6.0, "{passes} passes for 12 texts");
    assert!(
        tokens / passes <= 24.0,
        "{tokens} tokens in {passes} passes"
    );
    assert_eq!(
        metric(&m, "capivara_batch_size_sum{model=\"tiny\",tower=\"text\"}"),
        12.0
    );
}

#[test]
fn every_route_is_documented_and_every_documented_route_is_served() {
    let s = TestServer::start(|_| {});
    let doc = s.http.get("/openapi.json").json();
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            operations += 1;
            let url = path.replace("{id}", "no-such-id");
            let r = match method.as_str() {
                "get" => s.http.get(&url),
                "delete" => s.http.delete(&url, None),
                "post" => s.http.post_json(&url, &json!({})),
                m => panic!("unexpected method {m}"),
            };
            // The fallback answers unknown routes with "no such route".
            assert!(
                !(r.status == 404 && r.text.contains("no such route")),
                "{method} {path} is documented but not served"
            );
        }
    }
    // Every handler annotated for the document is in it...
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/server");
    let annotated: usize = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .map(|text| text.matches("#[utoipa::path(").count())
        .sum();
    assert_eq!(
        annotated, operations,
        "a handler is missing from the document"
    );
    // ...and a route registered outside it must be one of the deliberate few.
    let router = std::fs::read_to_string(src.join("mod.rs")).unwrap();
    for (i, _) in router.match_indices(".route(\"") {
        let path = router[i + 8..].split('"').next().unwrap();
        assert!(
            capivara::server::UNDOCUMENTED.contains(&path),
            "route {path} is registered outside the OpenAPI document"
        );
    }
    for path in capivara::server::UNDOCUMENTED {
        assert!(doc["paths"].get(*path).is_none(), "{path}");
        let status = s.http.get(path).status;
        assert!(status == 200 || status == 303, "{path}: {status}");
    }
}

fn an_index_refuses_another_models_embeddings(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let Some(place) = Place::fresh(store, &dir.path().join("data")) else {
        return;
    };
    let s = TestServer::start_at(&place, |_| {});
    let body = json!({"images": [{"image": b64(&test_png(4)), "id": "gato"}]});
    assert_eq!(s.http.post_json("/images", &body).status, 200);
    s.stop();
    // Another model on the same index: the start fails, saying why.
    let other = dir.path().join("other-model");
    other_tiny_model(&other);
    let mut cfg = capivara::server::ServeConfig::new(
        other.to_str().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        &place.data_dir,
    );
    place.apply(&mut cfg);
    let err = load_error(cfg);
    assert!(
        err.contains("must not be mixed") && err.contains("other-model"),
        "{err}"
    );
    // The same for `capivara index`.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capivara"))
        .arg("index")
        .arg("--model")
        .arg(&other)
        .args(place.args())
        .arg(fixtures().join("images/photo.jpg"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must not be mixed"));
    // The index is untouched and its own model still serves it.
    let s = TestServer::start_at(&place, |_| {});
    assert_eq!(s.http.get("/images/gato").status, 200);
    assert_eq!(
        metric(&s.http.get("/metrics").text, "capivara_index_size"),
        1.0
    );
}

fn search_by_vector(store: Store) {
    let Some(s) = TestServer::start_on(store, |_| {}) else {
        return;
    };
    for i in 0..5u32 {
        let body = json!({"images": [{"image": b64(&test_png(i)), "id": format!("v{i}")}]});
        assert_eq!(s.http.post_json("/images", &body).status, 200);
    }
    let q = s
        .http
        .post_json("/embed/text", &json!({"texts": ["um quadrado"]}));
    let v = q.json()["embeddings"][0].clone();
    let by_text = s
        .http
        .post_json("/search", &json!({"query": "um quadrado", "k": 5}));
    // Any norm: the vector is normalised.
    let scaled: Vec<f32> = floats(&v).iter().map(|x| x * 3.0).collect();
    let by_vector = s
        .http
        .post_json("/search", &json!({"vector": scaled, "k": 5}));
    assert_eq!(by_vector.status, 200, "{}", by_vector.text);
    let (a, b) = (
        by_text.json()["results"].clone(),
        by_vector.json()["results"].clone(),
    );
    assert_eq!(a.as_array().unwrap().len(), 5);
    for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
        assert_eq!(x["id"], y["id"]);
        assert!((x["score"].as_f64().unwrap() - y["score"].as_f64().unwrap()).abs() < 1e-5);
    }
    for (bad, code) in [
        (json!({"vector": [1.0, 2.0], "k": 5}), "invalid_vector"),
        (
            json!({"vector": vec![0.0; floats(&v).len()]}),
            "invalid_vector",
        ),
        (json!({"vector": floats(&v), "query": "x"}), "invalid_query"),
        (json!({"vector": "abc"}), "invalid_json"),
    ] {
        let r = s.http.post_json("/search", &bad);
        assert_eq!((r.status, r.error_code().as_str()), (400, code), "{bad}");
    }
}
