//! Prometheus metrics, in a registry of the app's own (several apps can live in
//! one process, as the tests do).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::engine::EngineObserver;
use crate::timing;

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    batch_size: HistogramVec,
    batch_tokens: HistogramVec,
    queue_depth: IntGaugeVec,
    forward: HistogramVec,
    stages: HistogramVec,
    pub index_size: IntGauge,
}

/// Buckets of durations, in seconds.
fn seconds_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("capivara".into()), None).expect("registry");
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "status"],
        )
        .expect("metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency by route",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["route"],
        )
        .expect("metric");
        let batch_size = HistogramVec::new(
            HistogramOpts::new("batch_size", "Items per model forward pass")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            &["model", "tower"],
        )
        .expect("metric");
        let batch_tokens = HistogramVec::new(
            HistogramOpts::new(
                "batch_tokens",
                "Padded tokens per text forward pass (items x the longest)",
            )
            .buckets(vec![
                16.0, 64.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
            ]),
            &["model", "tower"],
        )
        .expect("metric");
        let stages = HistogramVec::new(
            HistogramOpts::new(
                "request_stage_seconds",
                "Time of each stage of a request by route: decode, tokenize, \
                 <tower>-queue, <tower>-inference (as in the Server-Timing header)",
            )
            .buckets(seconds_buckets()),
            &["route", "stage", "model"],
        )
        .expect("metric");
        let queue_depth = IntGaugeVec::new(
            Opts::new("queue_depth", "Requests waiting per tower"),
            &["model", "tower"],
        )
        .expect("metric");
        let forward = HistogramVec::new(
            HistogramOpts::new("model_forward_seconds", "Duration of one forward pass").buckets(
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            ),
            &["model", "tower"],
        )
        .expect("metric");
        let index_size = IntGauge::new("index_size", "Live images in the index").expect("metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(batch_size.clone()),
            Box::new(batch_tokens.clone()),
            Box::new(queue_depth.clone()),
            Box::new(forward.clone()),
            Box::new(stages.clone()),
            Box::new(index_size.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Self {
            registry,
            requests,
            latency,
            batch_size,
            batch_tokens,
            queue_depth,
            forward,
            stages,
            index_size,
        }
    }

    /// Exports `model`'s per-tower series from the start, at zero.
    pub fn register_model(&self, model: &str) {
        for tower in ["text", "image"] {
            self.batch_size.with_label_values(&[model, tower]);
            if tower == "text" {
                self.batch_tokens.with_label_values(&[model, tower]);
            }
            self.forward.with_label_values(&[model, tower]);
            self.queue_depth.with_label_values(&[model, tower]).set(0);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding metrics");
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl EngineObserver for Metrics {
    fn batch(&self, model: &str, tower: &'static str, items: usize, tokens: usize, seconds: f64) {
        self.batch_size
            .with_label_values(&[model, tower])
            .observe(items as f64);
        if tower == "text" {
            self.batch_tokens
                .with_label_values(&[model, tower])
                .observe(tokens as f64);
        }
        self.forward
            .with_label_values(&[model, tower])
            .observe(seconds);
    }

    fn queue_depth(&self, model: &str, tower: &'static str, depth: usize) {
        self.queue_depth
            .with_label_values(&[model, tower])
            .set(depth as i64);
    }
}

/// Counts and times every request by its route template (not its raw path, so
/// ids do not explode the label set), and reports where its time went: a
/// `Server-Timing` header (`decode`, `tokenize`, `<tower>-queue`,
/// `<tower>-inference`, `total`, in milliseconds) and the same split in
/// `request_stage_seconds`.
pub async fn track(
    State(metrics): State<std::sync::Arc<Metrics>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let started = Instant::now();
    let (mut resp, timings) = timing::scope(next.run(req)).await;
    let total = started.elapsed();
    for (stage, d) in timings.stages() {
        metrics
            .stages
            .with_label_values(&[
                route.as_str(),
                stage.name().as_str(),
                timings.model().unwrap_or(""),
            ])
            .observe(d.as_secs_f64());
    }
    if let Ok(v) = axum::http::HeaderValue::from_str(&timings.server_timing(total)) {
        resp.headers_mut().insert("server-timing", v);
    }
    metrics
        .requests
        .with_label_values(&[&route, &method, resp.status().as_str()])
        .inc();
    metrics
        .latency
        .with_label_values(&[&route])
        .observe(total.as_secs_f64());
    resp
}

/// `GET /metrics`.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain")))]
pub async fn metrics(
    State(state): State<std::sync::Arc<super::state::AppState>>,
) -> impl IntoResponse {
    if let Ok(l) = state.loaded() {
        for m in &l.models {
            let (t, i) = m.embedder.queue_depths();
            for (tower, depth) in [("text", t), ("image", i)] {
                state
                    .metrics
                    .queue_depth
                    .with_label_values(&[m.name.as_str(), tower])
                    .set(depth as i64);
            }
        }
        if let Ok(n) = l.index.len().await {
            state.metrics.index_size.set(n as i64);
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}
