//! What every handler sees: the configuration, the metrics, and — once
//! loaded — the model behind its batchers and the index backend. Handlers
//! import from here (and from `input`, `error`), never from each other.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use axum::http::StatusCode;
use candle_core::{DType, Device};

use super::error::ApiError;
use super::fetch::{Fetcher, UrlPolicy};
use super::metrics::Metrics;
use crate::engine::{Embedder, EngineConfig, EngineObserver};
use crate::index::postgres::PgOptions;
use crate::index::{Backend, Fingerprint, HnswParams};
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

/// One `--model`: the name requests use, and where the model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    /// A local directory or a Hugging Face repo id.
    pub source: String,
}

impl ModelSpec {
    /// `NAME=DIR_OR_HUB_ID`, or a bare `DIR_OR_HUB_ID`, named after itself: a
    /// hub id as it is (`hiaac-nlp/CAPIVARA`), a directory by its last
    /// component. Names are 1-100 characters of `A-Z a-z 0-9 . _ - / :`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let spec = spec.trim();
        let (name, source) = match spec.split_once('=') {
            Some((n, s)) => (n.trim().to_string(), s.trim().to_string()),
            None => {
                let looks_hub = spec.matches('/').count() == 1
                    && !spec.starts_with(['.', '/', '~'])
                    && !std::path::Path::new(spec).exists();
                let name = if looks_hub {
                    spec.to_string()
                } else {
                    std::path::Path::new(spec.trim_end_matches('/'))
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| spec.to_string())
                };
                (name, spec.to_string())
            }
        };
        if source.is_empty() {
            return Err(format!("`{spec}`: no model after the name"));
        }
        let ok = !name.is_empty()
            && name.len() <= 100
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/:".contains(c));
        if !ok {
            return Err(format!(
                "`{name}` is not a model name (1-100 characters of A-Z a-z 0-9 . _ - / :)"
            ));
        }
        Ok(Self { name, source })
    }
}

/// Everything `capivara serve` is configured with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The models served; the first is the default.
    pub models: Vec<ModelSpec>,
    /// The model whose embeddings the index holds (default: the first).
    pub index_model: Option<String>,
    /// The model that embeds `/search` text queries by default (default:
    /// the index model); it must share the index model's image tower.
    pub query_model: Option<String>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub device: Device,
    pub dtype: DType,
    pub quantization: crate::model::Quantization,
    /// JPEGs drafted before the resize (`--jpeg-draft`).
    pub jpeg_draft: bool,
    pub engine: EngineConfig,
    pub limits: Limits,
    pub api_key: Option<String>,
    /// With an API key: every request needs it, reads too (health and the
    /// page's own files aside).
    pub api_key_reads: bool,
    pub templates: Vec<String>,
    /// The embedded index's tuning (with the data directory).
    pub hnsw: HnswParams,
    /// `postgres://...`: the index in Postgres instead of the data directory.
    pub index_url: Option<String>,
    /// The Postgres backend's tuning.
    pub pg: PgOptions,
    /// Images given as URLs: whether, where, how much.
    pub urls: UrlPolicy,
    /// Origins allowed to call the API from a browser page served elsewhere
    /// (CORS); empty: none (the default: only the page at `/`, same origin);
    /// `*`: any.
    pub cors_origins: Vec<String>,
    /// Longest time a request may take, body upload included; then 408.
    pub request_timeout: std::time::Duration,
}

impl ServeConfig {
    /// Defaults for `model` (a `--model` value), listening on `addr` with
    /// data in `data_dir`.
    pub fn new(model: impl Into<String>, addr: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        let model = model.into();
        let spec = ModelSpec::parse(&model).unwrap_or(ModelSpec {
            name: "default".into(),
            source: model,
        });
        Self {
            models: vec![spec],
            index_model: None,
            query_model: None,
            addr,
            data_dir: data_dir.into(),
            device: Device::Cpu,
            dtype: DType::F32,
            quantization: crate::model::Quantization::None,
            jpeg_draft: false,
            engine: EngineConfig::default(),
            limits: Limits::default(),
            api_key: None,
            api_key_reads: false,
            templates: DEFAULT_TEMPLATES.iter().map(|s| s.to_string()).collect(),
            hnsw: HnswParams::default(),
            index_url: None,
            pg: PgOptions::default(),
            urls: UrlPolicy::default(),
            cors_origins: Vec::new(),
            request_timeout: std::time::Duration::from_secs(60),
        }
    }

    /// Serves one model (replacing the list).
    pub fn set_model(&mut self, spec: &str) {
        *self = Self {
            models: vec![ModelSpec::parse(spec).expect("a model spec")],
            ..self.clone()
        };
    }

    /// Position of model `name` in `models`.
    fn position(&self, name: &str, flag: &str) -> anyhow::Result<usize> {
        self.models
            .iter()
            .position(|m| m.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
                anyhow::anyhow!(
                    "{flag} {name}: no such model (models: {})",
                    names.join(", ")
                )
            })
    }
}

/// One loaded model behind its batchers.
pub struct LoadedModel {
    pub name: String,
    pub embedder: Arc<Embedder>,
    pub fingerprint: Fingerprint,
}

impl LoadedModel {
    /// Whether its image tower is the one of `other` (same image embeddings).
    fn same_images(&self, other: &LoadedModel) -> bool {
        let image_only = |f: &Fingerprint| Fingerprint {
            probe_text: vec![1.0],
            ..f.clone()
        };
        image_only(&self.fingerprint)
            .check(&image_only(&other.fingerprint))
            .is_ok()
    }
}

/// The models and the index, once loaded.
pub struct Loaded {
    pub models: Vec<LoadedModel>,
    pub index: Arc<dyn Backend>,
    index_model: usize,
    query_model: usize,
}

impl Loaded {
    /// The model a request names, or the default one (the first).
    pub fn model(&self, name: Option<&str>) -> Result<&LoadedModel, ApiError> {
        let m = self.find(name)?;
        crate::timing::set_model(&m.name);
        Ok(m)
    }

    fn find(&self, name: Option<&str>) -> Result<&LoadedModel, ApiError> {
        match name {
            None => Ok(&self.models[0]),
            Some(n) => self.models.iter().find(|m| m.name == n).ok_or_else(|| {
                let names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "model_not_found",
                    format!("no model `{n}` here (models: {})", names.join(", ")),
                )
            }),
        }
    }

    /// The model whose embeddings the index holds.
    pub fn index_model(&self) -> &LoadedModel {
        &self.models[self.index_model]
    }

    /// [`index_model`](Self::index_model), for a request that ingests.
    pub fn ingest_model(&self) -> &LoadedModel {
        let m = self.index_model();
        crate::timing::set_model(&m.name);
        m
    }

    /// The model that embeds a text query of `/search`: the one named (it
    /// must share the index model's image tower: its texts are in the
    /// index's space), else `--query-model`.
    pub fn query_model(&self, name: Option<&str>) -> Result<&LoadedModel, ApiError> {
        let m = match name {
            None => &self.models[self.query_model],
            Some(_) => self.find(name)?,
        };
        crate::timing::set_model(&m.name);
        if !m.same_images(self.index_model()) {
            return Err(ApiError::bad_request(
                "invalid_model",
                format!(
                    "model `{}` embeds in another space than the index's model `{}`: it cannot search this index",
                    m.name,
                    self.index_model().name
                ),
            ));
        }
        Ok(m)
    }
}

/// Sets model `name`'s state in `states`.
fn set_state(states: &Mutex<Vec<(String, String)>>, name: &str, state: String) {
    let mut states = states.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = states.iter_mut().find(|(n, _)| n == name) {
        s.1 = state;
    }
}

/// What every handler sees.
pub struct AppState {
    pub config: ServeConfig,
    pub metrics: Arc<Metrics>,
    /// Images given as URLs.
    pub fetcher: Fetcher,
    loaded: OnceLock<Loaded>,
    /// What loading is doing now, for `/readyz`.
    phase: Mutex<String>,
    /// Each model's state (`waiting`, `downloading: ...`, `loading`,
    /// `ready`, `failed: ...`); shared with the thread that downloads.
    model_states: Arc<Mutex<Vec<(String, String)>>>,
}

impl AppState {
    pub fn new(config: ServeConfig) -> Self {
        let model_states = config
            .models
            .iter()
            .map(|m| (m.name.clone(), "waiting".to_string()))
            .collect();
        let mut urls = config.urls.clone();
        urls.max_bytes = urls.max_bytes.min(config.limits.max_body_bytes);
        let metrics = Arc::new(Metrics::new());
        for m in &config.models {
            metrics.register_model(&m.name);
        }
        Self {
            fetcher: Fetcher::new(urls),
            config,
            metrics,
            loaded: OnceLock::new(),
            phase: Mutex::new("the model is still loading".into()),
            model_states: Arc::new(Mutex::new(model_states)),
        }
    }

    fn set_phase(&self, phase: impl Into<String>) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase.into();
    }

    fn set_model_state(&self, name: &str, state: impl Into<String>) {
        set_state(&self.model_states, name, state.into());
    }

    /// Each model's state, in `--model` order.
    pub fn model_states(&self) -> Vec<(String, String)> {
        self.model_states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The loaded models and index, or 503 while loading (saying what it is
    /// doing).
    pub fn loaded(&self) -> Result<&Loaded, ApiError> {
        self.loaded.get().ok_or_else(|| {
            let phase = self.phase.lock().unwrap_or_else(|e| e.into_inner()).clone();
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", phase)
        })
    }

    /// Loads one model (on the blocking pool) and warms it up.
    async fn load_model(&self, spec: &ModelSpec) -> anyhow::Result<LoadedModel> {
        let cfg = &self.config;
        tracing::info!(model = %spec.name, source = %spec.source, "loading a model");
        self.set_model_state(&spec.name, "loading");
        self.set_phase(format!("loading model `{}`", spec.name));
        let (source, device, dtype, quantization, max_pixels, jpeg_draft) = (
            spec.source.clone(),
            cfg.device.clone(),
            cfg.dtype,
            cfg.quantization,
            cfg.limits.max_pixels,
            cfg.jpeg_draft,
        );
        let (states, name) = (self.model_states.clone(), spec.name.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            // A hub model not cached yet downloads first: /readyz says how far.
            let on_progress = |p: &crate::hub::Progress| {
                let state = format!(
                    "downloading: {} of {} bytes ({})",
                    p.done,
                    p.total,
                    p.human()
                );
                set_state(&states, &name, state);
            };
            let opts = crate::resolve::ResolveOptions {
                refresh: false,
                progress: Some(&on_progress),
            };
            let (resolved, _) = crate::resolve::resolve_with(&source, opts)?;
            set_state(&states, &name, "loading".into());
            let mut pipeline =
                Pipeline::from_resolved_with(resolved, &device, dtype, quantization)?;
            pipeline.preprocessor = pipeline
                .preprocessor
                .clone()
                .with_max_pixels(max_pixels)
                .with_jpeg_draft(jpeg_draft);
            pipeline.warm_up()?;
            let fingerprint = pipeline.fingerprint()?;
            anyhow::Ok((pipeline, fingerprint))
        })
        .await?;
        let (pipeline, mut fingerprint) = match loaded {
            Ok(l) => l,
            Err(e) => {
                self.set_model_state(&spec.name, format!("failed: {e:#}"));
                return Err(e.context(format!("model `{}`", spec.name)));
            }
        };
        fingerprint.model = spec.source.clone();
        let observer: Arc<dyn EngineObserver> = self.metrics.clone();
        let embedder = Arc::new(Embedder::new(
            &spec.name,
            pipeline,
            cfg.engine.clone(),
            Some(observer),
        ));
        self.set_model_state(&spec.name, "ready");
        Ok(LoadedModel {
            name: spec.name.clone(),
            embedder,
            fingerprint,
        })
    }

    /// Loads the models, warms them up, opens (or connects to) the index and
    /// checks that the index holds the index model's embeddings.
    pub async fn load(&self) -> anyhow::Result<()> {
        let cfg = self.config.clone();
        anyhow::ensure!(!cfg.models.is_empty(), "no --model");
        for (i, m) in cfg.models.iter().enumerate() {
            anyhow::ensure!(
                !cfg.models[..i].iter().any(|o| o.name == m.name),
                "--model: the name `{}` is given twice",
                m.name
            );
        }
        let index_model = match &cfg.index_model {
            Some(n) => cfg.position(n, "--index-model")?,
            None => 0,
        };
        let query_model = match &cfg.query_model {
            Some(n) => cfg.position(n, "--query-model")?,
            None => index_model,
        };
        // One process per data directory: refuse before any slow work.
        let place = Location::from_flags(&cfg.data_dir, cfg.index_url.as_deref())?.reserve()?;
        let mut models = Vec::with_capacity(cfg.models.len());
        for spec in &cfg.models {
            models.push(self.load_model(spec).await?);
        }
        if !models[query_model].same_images(&models[index_model]) {
            anyhow::bail!(
                "--query-model {}: its image tower is not the one of the index model `{}` \
                 (its text queries would be in another embedding space)",
                models[query_model].name,
                models[index_model].name
            );
        }
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
        self.set_phase("opening the index");
        let index = place
            .open(models[index_model].fingerprint.dim, opts, |why| {
                self.set_phase(why)
            })
            .await?;
        index.claim(&models[index_model].fingerprint).await?;
        self.metrics.index_size.set(index.len().await? as i64);
        let _ = self.loaded.set(Loaded {
            models,
            index,
            index_model,
            query_model,
        });
        tracing::info!("ready");
        Ok(())
    }

    /// Finishes queued model work and makes the index durable.
    pub async fn shutdown(&self) {
        if let Some(l) = self.loaded.get() {
            let embedders: Vec<_> = l.models.iter().map(|m| m.embedder.clone()).collect();
            let _ =
                tokio::task::spawn_blocking(move || embedders.iter().for_each(|e| e.shutdown()))
                    .await;
            if let Err(e) = l.index.flush().await {
                tracing::error!("flushing the index: {e}");
            }
        }
    }
}
