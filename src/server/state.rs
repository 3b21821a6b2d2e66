//! What every handler sees: the configuration, the metrics, and — once
//! loaded — the model behind its batchers and the index backend. Handlers
//! import from here (and from `input`, `error`), never from each other.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use axum::http::StatusCode;
use candle_core::{DType, Device};

use super::error::ApiError;
use super::metrics::Metrics;
use crate::engine::{Embedder, EngineConfig, EngineObserver};
use crate::index::postgres::PgOptions;
use crate::index::{Backend, HnswParams};
use crate::pipeline::Pipeline;
use crate::store::{Location, OpenOptions};
use crate::zeroshot::DEFAULT_TEMPLATES;

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

impl Limits {
    /// 1 to `max` things of a list called `noun`, else 400 `code`.
    pub fn count(code: &'static str, noun: &str, n: usize, max: usize) -> Result<(), ApiError> {
        if n == 0 || n > max {
            return Err(ApiError::bad_request(
                code,
                format!("give 1 to {max} {noun} (got {n})"),
            ));
        }
        Ok(())
    }

    /// Every string of `items` non-blank and at most `max` characters, else
    /// 400 `code` ("each `noun` must be 1 to `max` characters").
    pub fn each_nonblank<S: AsRef<str>>(
        code: &'static str,
        noun: &str,
        items: &[S],
        max: usize,
    ) -> Result<(), ApiError> {
        if items
            .iter()
            .any(|s| s.as_ref().trim().is_empty() || s.as_ref().chars().count() > max)
        {
            return Err(ApiError::bad_request(
                code,
                format!("each {noun} must be 1 to {max} characters"),
            ));
        }
        Ok(())
    }

    /// Every string of `items` at most `max` characters (empty allowed).
    pub fn each_at_most<S: AsRef<str>>(
        code: &'static str,
        noun: &str,
        items: &[S],
        max: usize,
    ) -> Result<(), ApiError> {
        if items.iter().any(|s| s.as_ref().chars().count() > max) {
            return Err(ApiError::bad_request(
                code,
                format!("each {noun} must be at most {max} characters"),
            ));
        }
        Ok(())
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
    /// The embedded index's tuning (with the data directory).
    pub hnsw: HnswParams,
    /// `postgres://...`: the index in Postgres instead of the data directory.
    pub index_url: Option<String>,
    /// The Postgres backend's tuning.
    pub pg: PgOptions,
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
            index_url: None,
            pg: PgOptions::default(),
            cors_origins: Vec::new(),
            request_timeout: std::time::Duration::from_secs(60),
        }
    }
}

/// The model and the index, once loaded.
pub struct Loaded {
    pub embedder: Arc<Embedder>,
    pub index: Arc<dyn Backend>,
}

/// What every handler sees.
pub struct AppState {
    pub config: ServeConfig,
    pub metrics: Arc<Metrics>,
    loaded: OnceLock<Loaded>,
    /// What loading is doing now, for `/readyz`.
    phase: Mutex<String>,
}

impl AppState {
    pub fn new(config: ServeConfig) -> Self {
        Self {
            config,
            metrics: Arc::new(Metrics::new()),
            loaded: OnceLock::new(),
            phase: Mutex::new("the model is still loading".into()),
        }
    }

    fn set_phase(&self, phase: impl Into<String>) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase.into();
    }

    /// The loaded model and index, or 503 while loading (saying what it is
    /// doing).
    pub fn loaded(&self) -> Result<&Loaded, ApiError> {
        self.loaded.get().ok_or_else(|| {
            let phase = self.phase.lock().unwrap_or_else(|e| e.into_inner()).clone();
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", phase)
        })
    }

    /// Loads the model, warms it up, opens (or connects to) the index and
    /// checks that the index holds this model's embeddings.
    pub async fn load(&self) -> anyhow::Result<()> {
        let cfg = self.config.clone();
        // One process per data directory: refuse before any slow work.
        let place = Location::from_flags(&cfg.data_dir, cfg.index_url.as_deref())?.reserve()?;
        tracing::info!(model = %cfg.model, "loading the model");
        let c = cfg.clone();
        let (pipeline, fingerprint) = tokio::task::spawn_blocking(move || {
            let mut pipeline = Pipeline::load_with(&c.model, &c.device, c.dtype, c.quantization)?;
            pipeline.preprocessor = pipeline
                .preprocessor
                .clone()
                .with_max_pixels(c.limits.max_pixels);
            pipeline.warm_up()?;
            let fingerprint = pipeline.fingerprint()?;
            anyhow::Ok((pipeline, fingerprint))
        })
        .await??;
        let mut pg = cfg.pg.clone();
        // A request that waits on the database answers 503 before its own
        // time limit would answer 408.
        pg.operation_timeout = pg.operation_timeout.min(cfg.request_timeout.mul_f64(0.8));
        pg.connect_timeout = pg.connect_timeout.min(pg.operation_timeout);
        let opts = OpenOptions {
            hnsw: cfg.hnsw.clone(),
            pg,
            wait: true,
        };
        let index = place
            .open(pipeline.clip.embed_dim(), opts, |why| self.set_phase(why))
            .await?;
        index.claim(&fingerprint).await?;
        self.metrics.index_size.set(index.len().await? as i64);
        let observer: Arc<dyn EngineObserver> = self.metrics.clone();
        let embedder = Arc::new(Embedder::new(pipeline, cfg.engine, Some(observer)));
        let _ = self.loaded.set(Loaded { embedder, index });
        tracing::info!("ready");
        Ok(())
    }

    /// Finishes queued model work and makes the index durable.
    pub async fn shutdown(&self) {
        if let Some(l) = self.loaded.get() {
            let e = l.embedder.clone();
            let _ = tokio::task::spawn_blocking(move || e.shutdown()).await;
            if let Err(e) = l.index.flush().await {
                tracing::error!("flushing the index: {e}");
            }
        }
    }
}
