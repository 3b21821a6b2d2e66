//! The web page: `static/index.html` at `/`, its script and style sheet,
//! embedded in the binary at compile time (no CDN, no build step, nothing
//! read from disk at run time).

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::IntoResponse;

const INDEX: &str = include_str!("../../static/index.html");
const APP: &str = include_str!("../../static/app.js");
const STYLE: &str = include_str!("../../static/style.css");

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")],
        body,
    )
}

pub async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn app() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", APP)
}

pub async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE)
}
