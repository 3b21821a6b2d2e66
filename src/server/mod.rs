//! The HTTP server: axum routes over the [`Embedder`](crate::engine::Embedder)
//! and the index backend.
//!
//! One file per resource (`classify`, `search`, `images`, `embed`, `health`),
//! `state` (what handlers share), `error` (the one JSON error shape),
//! `metrics`, `openapi`, and `input` (request parsing shared by the
//! handlers). Adding an endpoint: a handler with its `#[utoipa::path]` in its
//! resource's file, and one `routes!` line in [`api`] — which registers the
//! route and its OpenAPI entry together.

pub mod classify;
pub mod embed;
pub mod error;
pub mod fetch;
pub mod health;
pub mod images;
pub mod input;
pub mod metrics;
pub mod openai;
pub mod openapi;
mod page;
pub mod search;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

pub use metrics::Metrics;
pub use state::{AppState, Limits, Loaded, ModelSpec, ServeConfig};

pub use crate::zeroshot::DEFAULT_TEMPLATES;

/// Routes served besides the API, deliberately left out of the OpenAPI
/// document: the page and its assets, Swagger UI and the document itself.
pub const UNDOCUMENTED: &[&str] = &["/", "/app.js", "/style.css", "/docs", "/openapi.json"];

/// Every API route, each registered with its OpenAPI entry.
pub fn api() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(classify::classify))
        .routes(routes!(search::search))
        .routes(routes!(images::ingest))
        .routes(routes!(images::get_image, images::delete_image))
        .routes(routes!(images::get_thumbnail))
        .routes(routes!(embed::embed_text))
        .routes(routes!(embed::embed_image))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::metrics))
        .routes(routes!(openai::embeddings))
        .routes(routes!(openai::models))
        .routes(routes!(openai::model))
}

/// Routes open with `--api-key-reads` too: health and the page's own files.
const ALWAYS_OPEN: &[&str] = &["/healthz", "/readyz", "/", "/app.js", "/style.css"];

/// With `--api-key` and `--api-key-reads`, every request needs the key
/// (reads too), health checks and the page's own files aside. (Writes need
/// it with `--api-key` alone; their handlers check.)
async fn guard_reads(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = req.uri().path();
    let open = ALWAYS_OPEN.contains(&path) || path == "/openapi.json" || path.starts_with("/docs");
    if state.config.api_key_reads && !open {
        if let Err(e) = input::require_key(&state, req.headers()) {
            return e.into_response();
        }
    }
    next.run(req).await
}

/// The routes.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.limits.max_body_bytes;
    let timeout = state.config.request_timeout;
    let (api, doc) = api().split_for_parts();
    let api = api
        .route("/", get(page::index))
        .route("/app.js", get(page::app))
        .route("/style.css", get(page::style))
        .fallback(|| async { error::ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            limit,
            refuse_announced_oversize,
        ))
        .with_state(state.clone());
    let app = Router::new()
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi::finish(doc)))
        .merge(api)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard_reads,
        ))
        .layer(axum::middleware::from_fn_with_state(timeout, time_limit))
        .layer(axum::middleware::from_fn(openai::error_shape));
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
        self.state.shutdown().await;
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
    let loaded = tokio::spawn(async move { st.load().await });
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
