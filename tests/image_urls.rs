//! Images by URL (`--allow-image-urls`) against a real HTTP image host on
//! 127.0.0.1 (axum, in this process): the same answers as the bytes sent
//! inline, and each way a URL can go wrong refused with its own 4xx — no
//! fetch from a private address unless allow-listed, redirects re-checked,
//! slow and large bodies cut off — while the server keeps serving.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Query;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::server::*;
use common::*;
use serde_json::json;

/// Bytes the big routes send: more than the fetch limit below.
const LIMIT: usize = 1 << 20;

fn jpeg(b: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "image/jpeg")], b).into_response()
}

/// An image host on 127.0.0.1 with a route for each case.
struct ImageHost {
    addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

impl ImageHost {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let photo = image_bytes("photo.jpg");
        let redirect = |to: String| {
            Response::builder()
                .status(StatusCode::FOUND)
                .header(header::LOCATION, to)
                .body(Body::empty())
                .unwrap()
        };
        let p1 = photo.clone();
        let p2 = photo.clone();
        let p3 = photo.clone();
        let app = axum::Router::new()
            .route("/photo.jpg", get(move || async move { jpeg(p1) }))
            // No Content-Type at all: taken as bytes, decoded as an image.
            .route(
                "/untyped",
                get(move || async move { Response::new(Body::from(p2)) }),
            )
            .route(
                "/page.html",
                get(|| async { ([(header::CONTENT_TYPE, "text/html")], "<html></html>") }),
            )
            .route(
                "/slow.jpg",
                get(move || async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    jpeg(p3)
                }),
            )
            // Declares its size: refused before the body is read.
            .route(
                "/declared-big.jpg",
                get(|| async { jpeg(vec![0u8; 2 * LIMIT]) }),
            )
            // Streams without a length: cut off once past the limit.
            .route(
                "/streamed-big.jpg",
                get(|| async {
                    let chunks = (0..64).map(|_| Ok::<_, std::io::Error>(vec![0u8; LIMIT / 16]));
                    let body = Body::from_stream(futures_util::stream::iter(chunks));
                    Response::builder()
                        .header(header::CONTENT_TYPE, "image/jpeg")
                        .body(body)
                        .unwrap()
                }),
            )
            .route(
                "/not-an-image.jpg",
                get(|| async { ([(header::CONTENT_TYPE, "image/jpeg")], "plain words") }),
            )
            .route(
                "/redirect",
                get(
                    move |Query(q): Query<std::collections::HashMap<String, String>>| async move {
                        redirect(q["to"].clone())
                    },
                ),
            )
            .route(
                "/loop",
                get(move || async move { redirect("/loop".into()) }),
            );
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move { axum::serve(listener, app).await });
        Self { addr, _rt: rt }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A server that fetches URLs, 127.0.0.1 allow-listed.
fn fetching(host: &ImageHost) -> TestServer {
    let _ = host;
    TestServer::start(|c| {
        c.urls.enabled = true;
        c.urls.allow_hosts = vec!["127.0.0.1".parse().unwrap()];
        c.urls.timeout = Duration::from_secs(1);
        c.urls.max_bytes = LIMIT;
    })
}

fn classify(s: &TestServer, image: &str) -> Resp {
    s.http.post_json(
        "/classify",
        &json!({"image": image, "labels": ["uma capivara", "um gato", "uma praia"]}),
    )
}

#[test]
fn a_url_gives_the_same_answers_as_its_bytes() {
    let host = ImageHost::start();
    let s = fetching(&host);
    let photo = b64(&image_bytes("photo.jpg"));
    let by_url = classify(&s, &host.url("/photo.jpg"));
    assert_eq!(by_url.status, 200, "{}", by_url.text);
    assert_eq!(by_url.json(), classify(&s, &photo).json());
    // The fetch is timed like the other stages.
    let timing = by_url.server_timing.clone().unwrap_or_default();
    assert!(timing.contains("fetch;dur="), "{timing}");
    // A batch mixing URLs and inline bytes, in order.
    let r = s.http.post_json(
        "/embed/image",
        &json!({"images": [host.url("/photo.jpg"), b64(&image_bytes("one.png")), host.url("/untyped")]}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let want = s.http.post_json(
        "/embed/image",
        &json!({"images": [photo, b64(&image_bytes("one.png")), photo]}),
    );
    assert!(
        max_abs_diff(
            &rows(&r.json(), "embeddings"),
            &rows(&want.json(), "embeddings")
        ) <= 1e-6
    );
    // Search by an image URL, and ingest by URL.
    let r = s.http.post_json(
        "/images",
        &json!({"images": [{"image": host.url("/photo.jpg"), "id": "from-url"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s
        .http
        .post_json("/search", &json!({"image": host.url("/photo.jpg"), "k": 1}));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["results"][0]["id"], "from-url", "{}", r.text);
    // The OpenAI route takes URLs for images too.
    let r = s.http.post_json(
        "/v1/embeddings",
        &json!({"model": "tiny", "input": [host.url("/photo.jpg")], "modality": "image"}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let got = floats(&r.json()["data"][0]["embedding"]);
    assert!(max_abs_diff(&[got], &rows(&want.json(), "embeddings")[..1]) <= 1e-6);
}

#[test]
fn each_bad_url_is_refused_with_its_own_code_and_the_server_keeps_serving() {
    let host = ImageHost::start();
    let s = fetching(&host);
    let port = host.addr.port();
    let cases: Vec<(String, u16, &str)> = vec![
        (host.url("/page.html"), 415, "url_not_image"),
        (host.url("/not-an-image.jpg"), 415, "unsupported_image"),
        (host.url("/missing.jpg"), 400, "url_fetch_failed"),
        (host.url("/declared-big.jpg"), 413, "url_too_large"),
        (host.url("/streamed-big.jpg"), 413, "url_too_large"),
        (host.url("/slow.jpg"), 408, "url_timeout"),
        (host.url("/loop"), 400, "too_many_redirects"),
        // Redirects are checked again: to loopback addresses off the
        // allow-list, to another scheme.
        (
            host.url(&format!("/redirect?to=http://127.0.0.2:{port}/photo.jpg")),
            403,
            "url_not_allowed",
        ),
        (
            host.url(&format!("/redirect?to=http://[::1]:{port}/photo.jpg")),
            403,
            "url_not_allowed",
        ),
        (
            host.url(&format!("/redirect?to=http://127.0.0.3:{port}/photo.jpg")),
            403,
            "url_not_allowed",
        ),
        (
            host.url("/redirect?to=file:///etc/passwd"),
            400,
            "invalid_url",
        ),
        // A closed port on an allowed address.
        (
            "http://127.0.0.1:1/photo.jpg".into(),
            400,
            "url_fetch_failed",
        ),
        ("http://exa mple.com/x.jpg".into(), 400, "invalid_url"),
    ];
    for (url, status, code) in &cases {
        let started = Instant::now();
        let r = classify(&s, url);
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (*status, *code),
            "{url}: {}",
            r.text
        );
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("image"),
            "{}",
            r.text
        );
        // Within the 1 s fetch timeout (plus slack for this machine).
        assert!(started.elapsed() < Duration::from_secs(10), "{url}");
    }
    // One bad URL in a batch fails only that request, naming the field.
    let r = s.http.post_json(
        "/embed/image",
        &json!({"images": [host.url("/photo.jpg"), host.url("/page.html")]}),
    );
    assert_eq!((r.status, r.error_code().as_str()), (415, "url_not_image"));
    assert!(r.text.contains("images[1]"), "{}", r.text);
    // Still serving, and the good URL still works.
    assert_eq!(s.http.get("/readyz").status, 200);
    assert_eq!(classify(&s, &host.url("/photo.jpg")).status, 200);
}

#[test]
fn private_addresses_are_refused_unless_allow_listed() {
    let host = ImageHost::start();
    let port = host.addr.port();
    // No allow list: loopback addresses in every spelling, and names that
    // resolve to them, are refused before any connection. (Only loopback
    // targets here, so that a wrong answer connects nowhere else: the other
    // private, link-local, metadata and reserved ranges are unit tests of
    // the address checker, src/server/fetch.rs.)
    let s = TestServer::start(|c| c.urls.enabled = true);
    for url in [
        host.url("/photo.jpg"),
        format!("http://localhost:{port}/photo.jpg"),
        format!("http://[::1]:{port}/photo.jpg"),
        format!("http://[::ffff:127.0.0.1]:{port}/photo.jpg"),
        format!("http://127.0.0.2:{port}/photo.jpg"),
        format!("http://2130706433:{port}/photo.jpg"), // 127.0.0.1 as one number
        format!("http://0x7f.1:{port}/photo.jpg"),     // and in hex
    ] {
        let r = classify(&s, &url);
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (403, "url_not_allowed"),
            "{url}: {}",
            r.text
        );
        assert!(r.text.contains("--image-url-allow-hosts"), "{}", r.text);
    }
    for url in [
        "ftp://example.com/x.jpg",
        "file:///etc/passwd",
        "gopher://x/",
    ] {
        let r = classify(&s, url);
        // Not a URL we fetch: read as base64, which it is not.
        assert_eq!(r.status, 400, "{url}: {}", r.text);
    }
    // Allow-listed by name: that name only.
    let s = TestServer::start(|c| {
        c.urls.enabled = true;
        c.urls.allow_hosts = vec!["localhost".parse().unwrap()];
    });
    let r = classify(&s, &format!("http://localhost:{port}/photo.jpg"));
    assert_eq!(r.status, 200, "{}", r.text);
    let r = classify(&s, &host.url("/photo.jpg"));
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (403, "url_not_allowed")
    );
    // Allow-listed by network.
    let s = TestServer::start(|c| {
        c.urls.enabled = true;
        c.urls.allow_hosts = vec!["127.0.0.0/8".parse().unwrap()];
    });
    assert_eq!(classify(&s, &host.url("/photo.jpg")).status, 200);
}

#[test]
fn urls_are_refused_unless_the_server_was_asked_to_fetch_them() {
    let host = ImageHost::start();
    let s = TestServer::start(|_| {});
    let r = classify(&s, &host.url("/photo.jpg"));
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "image_urls_disabled")
    );
    assert!(r.text.contains("--allow-image-urls"), "{}", r.text);
    let r = s.http.post_json(
        "/v1/embeddings",
        &json!({"model": "tiny", "input": [host.url("/photo.jpg")], "modality": "image"}),
    );
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "image_urls_disabled");
}

#[test]
fn url_flags_are_checked() {
    let tiny = tiny_dir().display().to_string();
    for (args, needle) in [
        (
            vec![
                "--allow-image-urls",
                "--image-url-allow-hosts",
                "10.0.0.0/40",
            ],
            "--image-url-allow-hosts",
        ),
        (
            vec!["--allow-image-urls", "--image-url-allow-hosts", "bad host!"],
            "--image-url-allow-hosts",
        ),
        (
            vec!["--allow-image-urls", "--image-url-timeout-secs", "0"],
            "--image-url-timeout-secs",
        ),
        (
            vec!["--image-url-allow-hosts", "10.0.0.1"],
            "--allow-image-urls",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_capivara"))
            .args(["serve", "--model", &tiny, "--addr", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
