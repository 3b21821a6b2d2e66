//! The embedder the server uses: the loaded model, one dynamic batcher per
//! tower, and a bounded cache of zero-shot class embeddings.
//!
//! A batcher owns one bounded queue and one OS thread (model work never runs on
//! the async runtime): it takes the first request, waits at most `max_wait` for
//! more until `max_batch` items are gathered, runs one forward pass, and answers
//! each request on its own oneshot channel. A full queue answers
//! [`EngineError::Overloaded`] at once.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::Error;
use crate::pipeline::Pipeline;
use crate::zeroshot::mean_normalized;
pub use crate::zeroshot::{fill_template, softmax};

/// Batching and caching parameters.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most items (texts or images) in one forward pass.
    pub max_batch: usize,
    /// Longest time the first request of a batch waits for company.
    pub max_wait: Duration,
    /// Requests waiting per tower before new ones are refused.
    pub queue_capacity: usize,
    /// Class embeddings (label x template set) kept in the LRU cache.
    pub label_cache: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_wait: Duration::from_millis(5),
            queue_capacity: 256,
            label_cache: 10_000,
        }
    }
}

/// Why an embedding request failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The tower's queue is full: try again later.
    #[error("the {0} queue is full")]
    Overloaded(&'static str),
    /// The engine is shutting down.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The input was rejected (bad image, text the tokenizer refuses...).
    #[error(transparent)]
    Input(Error),
    /// The model failed on a valid input.
    #[error("model error: {0}")]
    Model(String),
}

/// Observes the batchers (implemented by the server's Prometheus metrics).
pub trait EngineObserver: Send + Sync {
    /// A forward pass of `items` items took `seconds`.
    fn batch(&self, tower: &'static str, items: usize, seconds: f64);
    /// The queue of `tower` now holds `depth` requests.
    fn queue_depth(&self, tower: &'static str, depth: usize);
}

struct NoObserver;
impl EngineObserver for NoObserver {
    fn batch(&self, _: &'static str, _: usize, _: f64) {}
    fn queue_depth(&self, _: &'static str, _: usize) {}
}

/// Class embeddings by (label, templates joined).
type LabelCache = lru::LruCache<(String, String), Arc<Vec<f32>>>;

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>;

/// One request: a few items (texts or preprocessed images), answered together.
struct Job<T> {
    items: Vec<T>,
    reply: Reply,
}

/// A bounded queue in front of one batching thread.
struct Batcher<T> {
    tx: Mutex<Option<SyncSender<Job<T>>>>,
    depth: Arc<AtomicUsize>,
    name: &'static str,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<T: Send + 'static> Batcher<T> {
    fn start(
        name: &'static str,
        cfg: &EngineConfig,
        observer: Arc<dyn EngineObserver>,
        run: impl Fn(Vec<T>) -> Result<Vec<Vec<f32>>, EngineError> + Send + 'static,
    ) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Job<T>>(cfg.queue_capacity);
        let depth = Arc::new(AtomicUsize::new(0));
        let (max_batch, max_wait) = (cfg.max_batch.max(1), cfg.max_wait);
        let d = depth.clone();
        let thread = std::thread::Builder::new()
            .name(format!("capivara-{name}-batcher"))
            .spawn(move || {
                let take = |job: &Job<T>| {
                    let n = d.fetch_sub(1, Ordering::SeqCst) - 1;
                    observer.queue_depth(name, n);
                    job.items.len()
                };
                while let Ok(first) = rx.recv() {
                    let mut count = take(&first);
                    let mut jobs = vec![first];
                    let deadline = Instant::now() + max_wait;
                    while count < max_batch {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match rx.recv_timeout(left) {
                            Ok(job) => {
                                count += take(&job);
                                jobs.push(job);
                            }
                            Err(RecvTimeoutError::Timeout)
                            | Err(RecvTimeoutError::Disconnected) => break,
                        }
                    }
                    // Requests whose caller went away need no work.
                    jobs.retain(|j| !j.reply.is_closed());
                    if jobs.is_empty() {
                        continue;
                    }
                    let sizes: Vec<usize> = jobs.iter().map(|j| j.items.len()).collect();
                    let mut items = Vec::with_capacity(sizes.iter().sum());
                    let mut replies = Vec::with_capacity(jobs.len());
                    for j in jobs {
                        items.extend(j.items);
                        replies.push(j.reply);
                    }
                    // One pass per `max_batch` items: a large request is split.
                    let mut out: Result<Vec<Vec<f32>>, EngineError> =
                        Ok(Vec::with_capacity(items.len()));
                    let mut rest = items;
                    while !rest.is_empty() {
                        let tail = rest.split_off(rest.len().min(max_batch));
                        let n = rest.len();
                        let started = Instant::now();
                        let r = run(std::mem::replace(&mut rest, tail));
                        observer.batch(name, n, started.elapsed().as_secs_f64());
                        match (r, &mut out) {
                            (Ok(v), Ok(acc)) => acc.extend(v),
                            (Err(e), _) => {
                                out = Err(e);
                                break;
                            }
                            _ => {}
                        }
                    }
                    match out {
                        Ok(all) => {
                            let mut it = all.into_iter();
                            for (reply, n) in replies.into_iter().zip(sizes) {
                                let _ = reply.send(Ok(it.by_ref().take(n).collect()));
                            }
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            for reply in replies {
                                let _ = reply.send(Err(EngineError::Model(msg.clone())));
                            }
                        }
                    }
                }
            })
            .expect("spawning a batcher thread");
        Self {
            tx: Mutex::new(Some(tx)),
            depth,
            name,
            thread: Mutex::new(Some(thread)),
        }
    }

    async fn submit(&self, items: Vec<T>) -> Result<Vec<Vec<f32>>, EngineError> {
        if items.is_empty() {
            return Ok(vec![]);
        }
        let (reply, rx) = oneshot::channel();
        {
            let guard = self.tx.lock().map_err(|_| EngineError::ShuttingDown)?;
            let tx = guard.as_ref().ok_or(EngineError::ShuttingDown)?;
            self.depth.fetch_add(1, Ordering::SeqCst);
            match tx.try_send(Job { items, reply }) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    self.depth.fetch_sub(1, Ordering::SeqCst);
                    return Err(EngineError::Overloaded(self.name));
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.depth.fetch_sub(1, Ordering::SeqCst);
                    return Err(EngineError::ShuttingDown);
                }
            }
        }
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }

    fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// Stops accepting requests, lets the thread finish what is queued, joins it.
    fn shutdown(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

/// The model behind two batchers, plus the class-embedding cache.
pub struct Embedder {
    pipeline: Arc<Pipeline>,
    text: Batcher<String>,
    image: Batcher<Vec<f32>>,
    labels: Mutex<LabelCache>,
    /// Requests decoding images now, and the most allowed (the image queue's
    /// capacity): beyond it a request is refused before its decode, so that
    /// an overload is answered at once and its images never held in memory.
    decoding: Arc<AtomicUsize>,
    max_decoding: usize,
}

/// A place among the requests decoding images; freed on drop.
pub struct DecodeSlot(Arc<AtomicUsize>);

impl Drop for DecodeSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Embedder {
    pub fn new(
        pipeline: Pipeline,
        cfg: EngineConfig,
        observer: Option<Arc<dyn EngineObserver>>,
    ) -> Self {
        let pipeline = Arc::new(pipeline);
        let observer = observer.unwrap_or_else(|| Arc::new(NoObserver));
        let p = pipeline.clone();
        let text = Batcher::start("text", &cfg, observer.clone(), move |texts: Vec<String>| {
            let t = p.embed_texts(&texts).map_err(|e| match e {
                Error::Tokenizer(_) => EngineError::Input(e),
                e => EngineError::Model(e.to_string()),
            })?;
            t.to_vec2::<f32>()
                .map_err(|e| EngineError::Model(e.to_string()))
        });
        let p = pipeline.clone();
        let image = Batcher::start("image", &cfg, observer, move |pixels: Vec<Vec<f32>>| {
            let run = || -> candle_core::Result<Vec<Vec<f32>>> {
                let batch = p.preprocessor.batch(&pixels, p.clip.device())?;
                p.clip.encode_image(&batch)?.to_vec2::<f32>()
            };
            run().map_err(|e| EngineError::Model(e.to_string()))
        });
        let cap = NonZeroUsize::new(cfg.label_cache.max(1)).expect("non-zero");
        Self {
            pipeline,
            text,
            image,
            labels: Mutex::new(lru::LruCache::new(cap)),
            decoding: Arc::new(AtomicUsize::new(0)),
            max_decoding: cfg.queue_capacity.max(1),
        }
    }

    /// A place for one request to decode its images, or `Overloaded` when
    /// as many requests as the image queue holds are decoding already.
    pub fn decode_slot(&self) -> Result<DecodeSlot, EngineError> {
        if self.decoding.fetch_add(1, Ordering::SeqCst) >= self.max_decoding {
            self.decoding.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Overloaded("image"));
        }
        Ok(DecodeSlot(self.decoding.clone()))
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    pub fn embed_dim(&self) -> usize {
        self.pipeline.clip.embed_dim()
    }

    /// Queue depths (text, image).
    pub fn queue_depths(&self) -> (usize, usize) {
        (self.text.depth(), self.image.depth())
    }

    /// Normalised text embeddings, batched with other requests.
    pub async fn embed_texts(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EngineError> {
        self.text.submit(texts).await
    }

    /// Image bytes -> normalised `3 x S x S` pixels. CPU work: call it from a
    /// blocking thread.
    pub fn preprocess(&self, bytes: &[u8]) -> Result<Vec<f32>, Error> {
        self.pipeline.preprocessor.preprocess(bytes)
    }

    /// [`preprocess`](Self::preprocess) and a JPEG thumbnail, from one decode.
    pub fn preprocess_with_thumbnail(&self, bytes: &[u8]) -> Result<(Vec<f32>, Vec<u8>), Error> {
        self.pipeline
            .preprocessor
            .preprocess_with_thumbnail(bytes, crate::datadir::THUMBNAIL_SIDE)
    }

    /// Normalised embeddings of preprocessed images, batched with other requests.
    pub async fn embed_pixels(&self, pixels: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, EngineError> {
        self.image.submit(pixels).await
    }

    /// The zero-shot class embedding of each label: the mean of the normalised
    /// embeddings of its prompts (`template` with `{}` replaced by the label),
    /// normalised again — CLIP's zero-shot recipe. Cached per (label, templates).
    pub async fn class_embeddings(
        &self,
        labels: &[String],
        templates: &[String],
    ) -> Result<Vec<Arc<Vec<f32>>>, EngineError> {
        let tkey = templates.join("\u{1f}");
        let mut out: Vec<Option<Arc<Vec<f32>>>> = {
            let mut cache = self.labels.lock().map_err(|_| EngineError::ShuttingDown)?;
            labels
                .iter()
                .map(|l| cache.get(&(l.clone(), tkey.clone())).cloned())
                .collect()
        };
        let missing: Vec<usize> = (0..labels.len()).filter(|&i| out[i].is_none()).collect();
        if !missing.is_empty() {
            let prompts: Vec<String> = missing
                .iter()
                .flat_map(|&i| templates.iter().map(move |t| fill_template(t, &labels[i])))
                .collect();
            let embs = self.embed_texts(prompts).await?;
            let mut cache = self.labels.lock().map_err(|_| EngineError::ShuttingDown)?;
            for (chunk, &i) in embs.chunks(templates.len()).zip(&missing) {
                let e = Arc::new(mean_normalized(chunk));
                cache.put((labels[i].clone(), tkey.clone()), e.clone());
                out[i] = Some(e);
            }
        }
        Ok(out.into_iter().map(|e| e.expect("filled")).collect())
    }

    /// `softmax(exp(logit_scale) * image . classes)`.
    pub fn zero_shot(&self, image: &[f32], classes: &[Arc<Vec<f32>>]) -> Vec<f32> {
        let scale = self.pipeline.clip.logit_scale_exp().unwrap_or(100.0);
        let logits: Vec<f32> = classes
            .iter()
            .map(|c| scale * c.iter().zip(image).map(|(a, b)| a * b).sum::<f32>())
            .collect();
        softmax(&logits)
    }

    /// Stops the batchers after the queued work is done.
    pub fn shutdown(&self) {
        self.text.shutdown();
        self.image.shutdown();
    }
}

impl Drop for Embedder {
    fn drop(&mut self) {
        self.shutdown();
    }
}
