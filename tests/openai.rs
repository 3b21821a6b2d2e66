//! The ecosystem: the OpenAI-compatible embeddings API (driven by the
//! official `openai` Python package too), several models in one server,
//! a query model for search, and reads behind the API key.

mod common;

use base64::Engine as _;
use common::server::*;
use common::*;
use serde_json::{json, Value};

/// The OpenAI error shape, and its `code`.
fn openai_error(r: &Resp) -> (String, String, Value) {
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e.get("param").is_some(), "{v}");
    (
        e["type"].as_str().unwrap().to_string(),
        e["code"].as_str().unwrap().to_string(),
        e["param"].clone(),
    )
}

/// Two models: `tiny` (the default) and `other` (another embedding space).
fn two_models(
    dir: &std::path::Path,
    configure: impl FnOnce(&mut capivara::server::ServeConfig),
) -> TestServer {
    let other = dir.join("other");
    other_tiny_model(&other);
    TestServer::start(|c| {
        c.models = vec![
            capivara::server::ModelSpec::parse(&format!("tiny={}", tiny_dir().display())).unwrap(),
            capivara::server::ModelSpec::parse(&format!("other={}", other.display())).unwrap(),
        ];
        configure(c);
    })
}

#[test]
fn embeddings_in_openai_shape_from_each_model() {
    let dir = tempfile::tempdir().unwrap();
    let s = two_models(dir.path(), |_| {});
    let texts = ["uma capivara", "um gato preto", "Preço: R$ 10,00"];
    // Models listed, and readiness by model.
    let m = s.http.get("/v1/models").json();
    assert_eq!(m["object"], "list");
    let ids: Vec<&str> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "other"]);
    assert_eq!(s.http.get("/v1/models/other").json()["id"], "other");
    assert_eq!(
        s.http.get("/readyz").json()["models"],
        json!({"tiny": "ready", "other": "ready"})
    );
    for model in ["tiny", "other"] {
        let ours = s
            .http
            .post_json("/embed/text", &json!({"texts": texts, "model": model}));
        assert_eq!(ours.status, 200, "{}", ours.text);
        let want = rows(&ours.json(), "embeddings");
        let r = s.http.post_json(
            "/v1/embeddings",
            &json!({"model": model, "input": texts, "user": "x"}),
        );
        assert_eq!(r.status, 200, "{}", r.text);
        let v = r.json();
        assert_eq!(
            (v["object"].as_str(), v["model"].as_str()),
            (Some("list"), Some(model))
        );
        let got: Vec<Vec<f32>> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, d)| {
                assert_eq!(
                    (d["object"].as_str(), d["index"].as_u64()),
                    (Some("embedding"), Some(i as u64))
                );
                floats(&d["embedding"])
            })
            .collect();
        assert!(max_abs_diff(&got, &want) <= 1e-6);
        let tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(tokens >= 3 * 3, "{v}");
        assert_eq!(v["usage"]["total_tokens"].as_u64(), Some(tokens));
        // base64: little-endian f32.
        let r = s.http.post_json(
            "/v1/embeddings",
            &json!({"model": model, "input": texts[0], "encoding_format": "base64"}),
        );
        let b = base64::engine::general_purpose::STANDARD
            .decode(r.json()["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        let decoded: Vec<f32> = b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(decoded, want[0]);
    }
    // The two models do answer differently.
    let a = s
        .http
        .post_json("/embed/text", &json!({"texts": ["gato"], "model": "tiny"}))
        .json();
    let b = s
        .http
        .post_json("/embed/text", &json!({"texts": ["gato"], "model": "other"}))
        .json();
    assert!(max_abs_diff(&rows(&a, "embeddings"), &rows(&b, "embeddings")) > 0.01);
    // Images, as infinity takes them: data URIs.
    let img = image_bytes("photo.jpg");
    let uri = format!("data:image/jpeg;base64,{}", b64(&img));
    let r = s.http.post_json(
        "/v1/embeddings",
        &json!({"model": "other", "input": [uri], "modality": "image"}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let ours = s.http.post_json(
        "/embed/image",
        &json!({"images": [b64(&img)], "model": "other"}),
    );
    assert!(
        max_abs_diff(
            &[floats(&r.json()["data"][0]["embedding"])],
            &rows(&ours.json(), "embeddings")
        ) <= 1e-6
    );
    // /classify by model, and the default model when none is named.
    let body = |m: Option<&str>| {
        let mut b = json!({"image": b64(&img), "labels": ["gato", "praia"]});
        if let Some(m) = m {
            b["model"] = json!(m);
        }
        s.http.post_json("/classify", &b).json()
    };
    assert_eq!(body(None), body(Some("tiny")));
    assert_ne!(body(Some("tiny")), body(Some("other")));
    // Metrics by model.
    let metrics = s.http.get("/metrics").text;
    for model in ["tiny", "other"] {
        let line = format!("capivara_batch_size_count{{model=\"{model}\",tower=\"text\"}}");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&line) && !l.ends_with(" 0")),
            "{line}"
        );
    }
}

#[test]
fn openai_errors_in_openai_shape() {
    let dir = tempfile::tempdir().unwrap();
    let s = two_models(dir.path(), |_| {});
    for (body, status, ty, code, param) in [
        (
            json!({"model": "gpt-4", "input": "x"}),
            404,
            "invalid_request_error",
            "model_not_found",
            json!("model"),
        ),
        (
            json!({"input": [1, 2, 3]}),
            400,
            "invalid_request_error",
            "invalid_input",
            json!("input"),
        ),
        (
            json!({"input": [[1, 2], [3]]}),
            400,
            "invalid_request_error",
            "invalid_input",
            json!("input"),
        ),
        (
            json!({"input": "x", "encoding_format": "int8"}),
            400,
            "invalid_request_error",
            "invalid_encoding_format",
            json!("encoding_format"),
        ),
        (
            json!({"input": "x", "dimensions": 7}),
            400,
            "invalid_request_error",
            "invalid_dimensions",
            json!("model"),
        ),
        (
            json!({"input": "x", "modality": "audio"}),
            400,
            "invalid_request_error",
            "invalid_modality",
            json!("modality"),
        ),
        (
            json!({"input": []}),
            400,
            "invalid_request_error",
            "invalid_input",
            json!("input"),
        ),
        (
            json!({"input": ["%%%"], "modality": "image"}),
            400,
            "invalid_request_error",
            "invalid_base64",
            json!("input"),
        ),
        (
            json!({"model": "tiny"}),
            400,
            "invalid_request_error",
            "invalid_json",
            Value::Null,
        ),
    ] {
        let r = s.http.post_json("/v1/embeddings", &body);
        assert_eq!(r.status, status, "{body}: {}", r.text);
        let (t, c, p) = openai_error(&r);
        assert_eq!((t.as_str(), c.as_str(), &p), (ty, code, &param), "{body}");
    }
    let r = s.http.get("/v1/models/nope");
    assert_eq!(r.status, 404);
    assert_eq!(openai_error(&r).1, "model_not_found");
    // Not JSON; and the other routes keep capivara's own shape.
    let r = s
        .http
        .post_raw("/v1/embeddings", "text/plain", b"x".to_vec(), None);
    assert_eq!(
        (r.status, openai_error(&r).1.as_str()),
        (415, "unsupported_media_type")
    );
    let r = s
        .http
        .post_json("/embed/text", &json!({"texts": ["x"], "model": "gpt-4"}));
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (404, "model_not_found")
    );
    assert!(r.json()["error"].get("type").is_none());
    // Still serving.
    assert_eq!(
        s.http
            .post_json("/v1/embeddings", &json!({"input": "ok"}))
            .status,
        200
    );
}

#[test]
fn the_api_key_guards_reads_when_asked() {
    let s = TestServer::start(|c| {
        c.api_key = Some("s3cret".into());
        c.api_key_reads = true;
    });
    let body = json!({"input": "uma capivara"});
    let r = s.http.post_json("/v1/embeddings", &body);
    assert_eq!(r.status, 401);
    let (ty, code, _) = openai_error(&r);
    assert_eq!(
        (ty.as_str(), code.as_str()),
        ("authentication_error", "unauthorized")
    );
    assert_eq!(
        s.http
            .post_json_key("/v1/embeddings", &body, "wrong")
            .status,
        401
    );
    assert_eq!(
        s.http
            .post_json_key("/v1/embeddings", &body, "s3cret")
            .status,
        200
    );
    for path in ["/v1/models", "/metrics", "/images/x"] {
        assert_eq!(s.http.get(path).status, 401, "{path}");
    }
    assert_eq!(s.http.get_key("/v1/models", "s3cret").status, 200);
    let r = s.http.post_json("/search", &json!({"query": "gato"}));
    assert_eq!((r.status, r.error_code().as_str()), (401, "unauthorized"));
    for path in ["/healthz", "/readyz", "/", "/app.js", "/openapi.json"] {
        assert_eq!(s.http.get(path).status, 200, "{path} stays open");
    }
    // Without --api-key-reads reads stay open, writes need the key.
    let s = TestServer::start(|c| c.api_key = Some("s3cret".into()));
    assert_eq!(s.http.post_json("/v1/embeddings", &body).status, 200);
    let r = s.http.post_json(
        "/images",
        &json!({"images": [{"image": b64(&test_png(1))}]}),
    );
    assert_eq!(r.status, 401);
}

#[test]
fn a_query_model_must_share_the_index_models_images() {
    let dir = tempfile::tempdir().unwrap();
    let student = dir.path().join("student");
    text_variant_tiny_model(&student);
    let other = dir.path().join("other");
    other_tiny_model(&other);
    let spec = |s: &str| capivara::server::ModelSpec::parse(s).unwrap();
    let models = vec![
        spec(&format!("teacher={}", tiny_dir().display())),
        spec(&format!("student={}", student.display())),
        spec(&format!("other={}", other.display())),
    ];
    let s = TestServer::start(|c| {
        c.models = models.clone();
        c.query_model = Some("student".into());
    });
    for i in 0..20u32 {
        let r = s.http.post_json(
            "/images",
            &json!({"images": [{"image": b64(&test_png(i)), "id": format!("i{i}")}]}),
        );
        assert_eq!(r.status, 200);
    }
    // Text queries go to the student by default; by name to the teacher.
    let q = "um quadrado azul";
    let by = |model: Option<&str>| {
        let mut b = json!({"query": q, "k": 5});
        if let Some(m) = model {
            b["model"] = json!(m);
        }
        let r = s.http.post_json("/search", &b);
        assert_eq!(r.status, 200, "{}", r.text);
        r.json()
    };
    assert_eq!(by(None), by(Some("student")));
    let student_v = rows(
        &s.http
            .post_json("/embed/text", &json!({"texts": [q], "model": "student"}))
            .json(),
        "embeddings",
    );
    let teacher_v = rows(
        &s.http
            .post_json("/embed/text", &json!({"texts": [q], "model": "teacher"}))
            .json(),
        "embeddings",
    );
    assert!(
        max_abs_diff(&student_v, &teacher_v) > 1e-4,
        "the student differs"
    );
    let r = s
        .http
        .post_json("/search", &json!({"vector": student_v[0], "k": 5}));
    assert_eq!(r.json()["results"], by(None)["results"]);
    // A model of another image space cannot query this index.
    let r = s
        .http
        .post_json("/search", &json!({"query": q, "model": "other"}));
    assert_eq!((r.status, r.error_code().as_str()), (400, "invalid_model"));
    drop(s);
    // Nor be the query model.
    let data = dir.path().join("data2");
    let mut cfg =
        capivara::server::ServeConfig::new("unused", "127.0.0.1:0".parse().unwrap(), &data);
    cfg.models = models;
    cfg.query_model = Some("other".into());
    let err = load_error(cfg);
    assert!(
        err.contains("--query-model other") && err.contains("image tower"),
        "{err}"
    );
}

#[test]
fn model_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_dir().display().to_string();
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_capivara"))
            .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    for (args, needle) in [
        (
            vec![
                "--model",
                &format!("a={tiny}"),
                "--model",
                &format!("a={tiny}"),
            ],
            "given twice",
        ),
        (vec!["--model", "bad name=x"], "not a model name"),
        (vec!["--model", "a="], "no model after the name"),
        (
            vec!["--model", &tiny, "--index-model", "nope"],
            "--index-model nope",
        ),
        (
            vec!["--model", &tiny, "--query-model", "nope"],
            "--query-model nope",
        ),
        (vec!["--api-key-reads"], "--api-key-reads needs --api-key"),
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // Commands other than serve take one model.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capivara"))
        .args(["embed", "--text", "x", "--model", &tiny, "--model", &tiny])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("takes one model"));
}

/// The official `openai` Python package against the server: the same
/// vectors as `/embed/text`, base64 too, and an image through `modality`.
#[test]
fn the_openai_python_sdk_works_unchanged() {
    let Some(python) = common::python_with("openai") else {
        return;
    };
    let s = TestServer::start(|c| {
        c.api_key = Some("sk-capivara".into());
        c.api_key_reads = true;
    });
    let texts = ["uma capivara na beira do rio", "um gato"];
    let want = rows(
        &s.http
            .post_json_key("/embed/text", &json!({"texts": texts}), "sk-capivara")
            .json(),
        "embeddings",
    );
    let img = image_bytes("photo.jpg");
    let want_img = rows(
        &s.http
            .post_json_key(
                "/embed/image",
                &json!({"images": [b64(&img)]}),
                "sk-capivara",
            )
            .json(),
        "embeddings",
    );
    let dir = tempfile::tempdir().unwrap();
    let img_path = dir.path().join("photo.jpg");
    std::fs::write(&img_path, &img).unwrap();
    let script = r#"
import base64, json, sys
import numpy as np
from openai import OpenAI
base, texts, image = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
client = OpenAI(base_url=base + "/v1", api_key="sk-capivara", max_retries=0)
models = [m.id for m in client.models.list()]
floats = client.embeddings.create(model=models[0], input=texts, encoding_format="float")
b64 = client.embeddings.create(model=models[0], input=texts)  # the SDK's default: base64
uri = "data:image/jpeg;base64," + base64.b64encode(open(image, "rb").read()).decode()
img = client.embeddings.create(model=models[0], input=[uri], extra_body={"modality": "image"})
try:
    client.embeddings.create(model="no-such-model", input="x")
    error = None
except Exception as e:
    error = {"class": type(e).__name__, "status": e.status_code, "code": e.code, "type": e.type}
print(json.dumps({
    "models": models,
    "float": [d.embedding for d in floats.data],
    "base64": [list(map(float, d.embedding)) for d in b64.data],
    "image": [d.embedding for d in img.data],
    "usage": floats.usage.prompt_tokens,
    "error": error,
}))
"#;
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            script,
            &s.http.base,
            &serde_json::to_string(&texts).unwrap(),
        ])
        .arg(&img_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"], json!(["tiny"]));
    assert!(max_abs_diff(&rows(&v, "float"), &want) <= 1e-6);
    assert!(max_abs_diff(&rows(&v, "base64"), &want) <= 1e-6);
    assert!(max_abs_diff(&rows(&v, "image"), &want_img) <= 1e-6);
    assert!(v["usage"].as_u64().unwrap() > 0);
    assert_eq!(
        v["error"],
        json!({"class": "NotFoundError", "status": 404, "code": "model_not_found", "type": "invalid_request_error"})
    );
}
