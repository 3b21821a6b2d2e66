//! The HTTP server: axum routes over the [`Embedder`] and the index.
//!
//! One file per resource (`classify`, `search`, `images`, `embed`, `health`),
//! `error` (the one JSON error shape), `metrics`, `openapi`, and `input`
//! (request parsing shared by the handlers).

pub mod classify;
pub mod embed;
pub mod error;
pub mod health;
pub mod images;
pub mod input;
pub mod metrics;
pub mod openapi;
mod page;
pub mod search;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use candle_core::{DType, Device};
use tokio::sync::watch;
use utoipa_swagger_ui::SwaggerUi;

use crate::engine::{Embedder, EngineConfig, EngineObserver};
use crate::index::{HnswIndex, HnswParams, VectorIndex};
use crate::pipeline::Pipeline;
pub use metrics::Metrics;

pub use crate::zeroshot::DEFAULT_TEMPLATES;

/// Bounds on what one request may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_labels: usize,
    pub max_label_chars: usize,
    pub max_templates: usize,
    pub max_query_chars: usize,
    pub max_k: usize,
    pub max_images: usize,
    pub max_texts: usize,
    pub max_metadata_bytes: usize,
    pub max_pixels: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            max_labels: 1000,
            max_label_chars: 200,
            max_templates: 100,
            max_query_chars: 2000,
            max_k: 1000,
            max_images: 64,
            max_texts: 256,
            max_metadata_bytes: 16 << 10,
            max_pixels: crate::preprocess::DEFAULT_MAX_PIXELS,
        }
    }
}

/// Everything `capivara serve` is configured with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: String,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub device: Device,
    pub dtype: DType,
    pub quantization: crate::model::Quantization,
    pub engine: EngineConfig,
    pub limits: Limits,
    pub api_key: Option<String>,
    pub templates: Vec<String>,
    pub hnsw: HnswParams,
    /// Origins allowed to call the API from a browser page served elsewhere
    /// (CORS); empty: none (the default: only the page at `/`, same origin);
    /// `*`: any.
    pub cors_origins: Vec<String>,
    /// Longest time a request may take, body upload included; then 408.
    pub request_timeout: std::time::Duration,
}

impl ServeConfig {
    /// Defaults for `model`, listening on `addr` with data in `data_dir`.
    pub fn new(model: impl Into<String>, addr: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            addr,
            data_dir: data_dir.into(),
            device: Device::Cpu,
            dtype: DType::F32,
            quantization: crate::model::Quantization::None,
            engine: EngineConfig::default(),
            limits: Limits::default(),
            api_key: None,
            templates: DEFAULT_TEMPLATES.iter().map(|s| s.to_string()).collect(),
            hnsw: HnswParams::default(),
            cors_origins: Vec::new(),
            request_timeout: std::time::Duration::from_secs(60),
        }
    }
}

/// The model and the index, once loaded.
pub struct Loaded {
    pub embedder: Arc<Embedder>,
    pub index: Arc<dyn VectorIndex>,
    pub thumbnails: crate::datadir::Thumbnails,
    /// The data directory is ours while this lives.
    _lock: crate::datadir::DataDirLock,
}

/// What every handler sees.
pub struct AppState {
    pub config: ServeConfig,
    pub metrics: Arc<Metrics>,
    loaded: OnceLock<Loaded>,
}

impl AppState {
    pub fn new(config: ServeConfig) -> Self {
        Self {
            config,
            metrics: Arc::new(Metrics::new()),
            loaded: OnceLock::new(),
        }
    }

    /// Loads the model, warms it up, opens the index. Blocking.
    pub fn load(&self) -> anyhow::Result<()> {
        let cfg = &self.config;
        // One process per data directory: refuse before any slow work.
        let lock = crate::datadir::lock(&cfg.data_dir)?;
        tracing::info!(model = %cfg.model, "loading the model");
        let mut pipeline =
            Pipeline::load_with(&cfg.model, &cfg.device, cfg.dtype, cfg.quantization)?;
        pipeline.preprocessor = pipeline
            .preprocessor
            .clone()
            .with_max_pixels(cfg.limits.max_pixels);
        let dim = pipeline.clip.embed_dim();
        // Warm-up: one pass per tower (first-call allocations, kernel selection).
        pipeline.embed_texts(&["uma foto de um gato."])?;
        let s = pipeline.preprocessor.image_size();
        let warm = vec![vec![0f32; 3 * s * s]];
        pipeline
            .clip
            .encode_image(&pipeline.preprocessor.batch(&warm, pipeline.clip.device())?)?;
        let observer: Arc<dyn EngineObserver> = self.metrics.clone();
        let thumbnails = crate::datadir::Thumbnails::open(&cfg.data_dir)?;
        let embedder = Arc::new(Embedder::new(pipeline, cfg.engine.clone(), Some(observer)));
        let index_dir = cfg.data_dir.join("index");
        tracing::info!(dir = %index_dir.display(), "opening the index");
        let index = HnswIndex::open(&index_dir, dim, cfg.hnsw.clone())?;
        self.metrics.index_size.set(index.len() as i64);
        let _ = self.loaded.set(Loaded {
            embedder,
            index: Arc::new(index),
            thumbnails,
            _lock: lock,
        });
        tracing::info!("ready");
        Ok(())
    }

    /// Finishes queued model work and makes the index durable.
    pub fn shutdown(&self) {
        if let Some(l) = self.loaded.get() {
            l.embedder.shutdown();
            if let Err(e) = l.index.flush() {
                tracing::error!("flushing the index: {e}");
            }
        }
    }
}

/// The routes.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.limits.max_body_bytes;
    let timeout = state.config.request_timeout;
    let api = Router::new()
        .route("/", get(page::index))
        .route("/app.js", get(page::app))
        .route("/style.css", get(page::style))
        .route("/classify", post(classify::classify))
        .route("/search", post(search::search))
        .route("/images", post(images::ingest))
        .route(
            "/images/{id}",
            get(images::get_image).delete(images::delete_image),
        )
        .route("/images/{id}/thumbnail", get(images::get_thumbnail))
        .route("/embed/text", post(embed::embed_text))
        .route("/embed/image", post(embed::embed_image))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::metrics))
        .fallback(|| async { error::ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            limit,
            refuse_announced_oversize,
        ))
        .with_state(state.clone());
    let app = Router::new()
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi::spec()))
        .merge(api)
        .layer(axum::middleware::from_fn_with_state(timeout, time_limit));
    let app = match cors_layer(&state.config.cors_origins) {
        Some(cors) => app.layer(cors),
        None => app,
    };
    app.layer(axum::middleware::from_fn_with_state(
        state.metrics.clone(),
        metrics::track,
    ))
}

/// The CORS layer for the configured origins, if any: simple and preflight
/// requests from those origins may call every route with any method and the
/// `Authorization` and `Content-Type` headers. Without it browsers keep pages
/// of other origins from reading any answer (and from sending JSON at all).
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{header, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// Answers 408 when a request (reading its body included) takes longer than
/// the limit. Work already handed to the model or the index finishes (an
/// ingest may then be applied though its answer was lost: posting it again
/// with the same ids is harmless), nothing is left half-written.
async fn time_limit(
    axum::extract::State(limit): axum::extract::State<std::time::Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => error::ApiError::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request took longer than {} s", limit.as_secs_f64()),
        )
        .into_response(),
    }
}

/// Answers 413 at once when `Content-Length` announces more than the limit,
/// before any of the body is read (the body limit alone would read up to
/// the limit first).
async fn refuse_announced_oversize(
    axum::extract::State(limit): axum::extract::State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let announced = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match announced {
        Some(n) if n > limit as u64 => error::ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is {n} bytes, more than the {limit} allowed"),
        )
        .into_response(),
        _ => next.run(req).await,
    }
}

/// A server bound to its address, running in the background.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Stops accepting, lets in-flight requests finish, drains the batchers,
    /// flushes the index.
    pub async fn shutdown(self) -> std::io::Result<()> {
        let _ = self.stop.send(true);
        let r = self.task.await.unwrap_or(Ok(()));
        let st = self.state.clone();
        let _ = tokio::task::spawn_blocking(move || st.shutdown()).await;
        r
    }
}

/// Binds `config.addr` and serves; the model loads in the background
/// (`/healthz` answers at once, `/readyz` once loaded). `loaded` resolves when
/// loading ends, with its error if it failed.
pub async fn start(
    config: ServeConfig,
) -> anyhow::Result<(RunningServer, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(AppState::new(config));
    let st = state.clone();
    let loaded = tokio::task::spawn_blocking(move || st.load());
    let (stop, mut stopped) = watch::channel(false);
    let app = router(state.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
    });
    let loaded = tokio::spawn(async move { loaded.await.map_err(|e| anyhow::anyhow!(e))? });
    Ok((
        RunningServer {
            addr,
            state,
            stop,
            task,
        },
        loaded,
    ))
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// `capivara serve`: runs until SIGINT/SIGTERM, then shuts down gracefully.
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let (server, loaded) = start(config).await?;
    tracing::info!(addr = %server.addr, "listening");
    let mut loaded = loaded;
    let result = tokio::select! {
        _ = shutdown_signal() => { tracing::info!("shutting down"); Ok(()) }
        r = &mut loaded => match r {
            Ok(Ok(())) => { shutdown_signal().await; tracing::info!("shutting down"); Ok(()) }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow::anyhow!(e)),
        },
    };
    server.shutdown().await?;
    tokio::time::sleep(Duration::from_millis(0)).await;
    result
}
