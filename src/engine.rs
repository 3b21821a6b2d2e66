//! The embedder the server uses: the loaded model, one dynamic batcher per
//! tower, and a bounded cache of zero-shot class embeddings.
//!
//! Work is split as text-embeddings-inference splits it:
//! - CPU work on one request's inputs (image decoding, tokenization) runs
//!   before the queue, on the blocking pool, so a batcher only batches
//!   ready inputs (pixels, token ids);
//! - [`BatchPolicy`] decides what goes into one forward pass: at most
//!   `max_items` items, at most `max_tokens` padded tokens (texts are padded
//!   to the longest in the pass), and how long the first item waits for
//!   company (`max_wait`);
//! - the worker loop ([`Batcher`]) owns one bounded queue and one OS thread
//!   (model work never runs on the async runtime), forms passes by the
//!   policy, splits requests larger than a pass, and routes each row back to
//!   its request. A full queue answers [`EngineError::Overloaded`] at once.
//!
//! Errors stay per request: an input the model cannot take is refused at
//! submission with [`EngineError::Input`]; if a pass mixing several requests
//! fails, each request is run alone so only the one that fails gets the error.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::Error;
use crate::pipeline::Pipeline;
use crate::timing::{self, Stage};
use crate::zeroshot::mean_normalized;
pub use crate::zeroshot::{fill_template, softmax};

/// What goes into one forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Most items (texts or images) in one pass.
    pub max_items: usize,
    /// Most padded tokens in one text pass (items x the longest one's
    /// tokens); a single item always fits. Images count one each.
    pub max_tokens: usize,
    /// Longest time the first item of a pass waits for company.
    pub max_wait: Duration,
}

impl BatchPolicy {
    /// Whether a pass of `items` items whose longest costs `longest` takes
    /// one more of cost `cost`.
    pub fn admits(&self, items: usize, longest: usize, cost: usize) -> bool {
        items == 0
            || (items < self.max_items
                && (items + 1).saturating_mul(longest.max(cost)) <= self.max_tokens)
    }

    /// How many of `costs`, from the front, make the next pass.
    pub fn take(&self, costs: impl IntoIterator<Item = usize>) -> usize {
        let (mut n, mut longest) = (0, 0);
        for c in costs {
            if !self.admits(n, longest, c) {
                break;
            }
            n += 1;
            longest = longest.max(c);
        }
        n
    }
}

/// Batching and caching parameters.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub text: BatchPolicy,
    pub image: BatchPolicy,
    /// Requests waiting per tower before new ones are refused.
    pub queue_capacity: usize,
    /// Class embeddings (label x template set) kept in the LRU cache.
    pub label_cache: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let max_wait = Duration::from_millis(5);
        Self {
            text: BatchPolicy {
                max_items: 32,
                max_tokens: 4096,
                max_wait,
            },
            image: BatchPolicy {
                max_items: 32,
                max_tokens: usize::MAX,
                max_wait,
            },
            queue_capacity: 256,
            label_cache: 10_000,
        }
    }
}

/// Why an embedding request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The tower's queue is full: try again later.
    #[error("the {0} queue is full")]
    Overloaded(&'static str),
    /// The engine is shutting down.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The input was rejected (bad image, text the tokenizer refuses...).
    #[error(transparent)]
    Input(Arc<Error>),
    /// The model failed on a valid input.
    #[error("model error: {0}")]
    Model(String),
}

impl EngineError {
    /// An input error (the caller's fault, a 4xx) or a model error.
    fn from_run(e: Error) -> Self {
        match e {
            Error::Tokenizer(_)
            | Error::InvalidArgument(_)
            | Error::UnsupportedImage(_)
            | Error::ImageDecode(_)
            | Error::ImageTooLarge { .. } => EngineError::Input(Arc::new(e)),
            e => EngineError::Model(e.to_string()),
        }
    }
}

/// Observes the batchers (implemented by the server's Prometheus metrics).
pub trait EngineObserver: Send + Sync {
    /// A forward pass of `model`'s `tower` over `items` items (`tokens`
    /// padded tokens for texts) took `seconds`.
    fn batch(&self, model: &str, tower: &'static str, items: usize, tokens: usize, seconds: f64);
    /// The queue of `model`'s `tower` now holds `depth` requests not yet
    /// started.
    fn queue_depth(&self, model: &str, tower: &'static str, depth: usize);
}

struct NoObserver;
impl EngineObserver for NoObserver {
    fn batch(&self, _: &str, _: &'static str, _: usize, _: usize, _: f64) {}
    fn queue_depth(&self, _: &str, _: &'static str, _: usize) {}
}

/// The rows of one request, with where its time went.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    pub rows: Vec<Vec<f32>>,
    /// Enqueued -> its first pass starts.
    pub queue: Duration,
    /// Its first pass starts -> its last row is ready.
    pub inference: Duration,
}

type Reply = oneshot::Sender<Result<Embedded, EngineError>>;
/// A tower's check of one item.
pub type Validate<T> = Box<dyn Fn(&T) -> Result<(), Error> + Send + Sync>;
/// A tower's forward pass: one row per item.
pub type Run<T> = Box<dyn Fn(&[T]) -> Result<Vec<Vec<f32>>, Error> + Send>;
/// Items of a pass with their (request, index) keys.
type Part<T> = (Vec<(u64, usize)>, Vec<T>);

/// One request: a few items, answered together.
struct Job<T> {
    items: Vec<T>,
    reply: Reply,
    enqueued: Instant,
}

/// What a tower does with items: the model pass, and what it can take.
pub struct Tower<T> {
    pub name: &'static str,
    pub policy: BatchPolicy,
    /// An item's cost against `policy.max_tokens`.
    pub cost: fn(&T) -> usize,
    /// Checks one item at submission (before it can spoil a pass).
    pub validate: Validate<T>,
    /// One forward pass: one row per item, in order.
    pub run: Run<T>,
}

/// A bounded queue in front of one batching thread.
pub struct Batcher<T> {
    tx: Mutex<Option<SyncSender<Job<T>>>>,
    depth: Arc<AtomicUsize>,
    name: &'static str,
    validate: Validate<T>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts `model`'s tower thread with a queue of `capacity` requests.
    pub fn start(
        model: &str,
        tower: Tower<T>,
        capacity: usize,
        observer: Arc<dyn EngineObserver>,
    ) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Job<T>>(capacity.max(1));
        let depth = Arc::new(AtomicUsize::new(0));
        let name = tower.name;
        let Tower {
            policy,
            cost,
            validate,
            run,
            ..
        } = tower;
        let worker = Worker {
            model: model.into(),
            name,
            policy,
            cost,
            run,
            observer,
            depth: depth.clone(),
            waiting: VecDeque::new(),
            open: HashMap::new(),
            next_id: 0,
        };
        let thread = std::thread::Builder::new()
            .name(format!("capivara-{name}-batcher"))
            .spawn(move || worker.serve(rx))
            .expect("spawning a batcher thread");
        Self {
            tx: Mutex::new(Some(tx)),
            depth,
            name,
            validate,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Embeds `items` with other requests' items; an invalid item fails the
    /// request at once with [`EngineError::Input`].
    pub async fn submit(&self, items: Vec<T>) -> Result<Embedded, EngineError> {
        if items.is_empty() {
            return Ok(Embedded {
                rows: vec![],
                queue: Duration::ZERO,
                inference: Duration::ZERO,
            });
        }
        for (i, item) in items.iter().enumerate() {
            (self.validate)(item).map_err(|e| {
                EngineError::Input(Arc::new(match e {
                    Error::InvalidArgument(m) if items.len() > 1 => {
                        Error::InvalidArgument(format!("item {i}: {m}"))
                    }
                    e => e,
                }))
            })?;
        }
        let (reply, rx) = oneshot::channel();
        {
            let guard = self.tx.lock().map_err(|_| EngineError::ShuttingDown)?;
            let tx = guard.as_ref().ok_or(EngineError::ShuttingDown)?;
            self.depth.fetch_add(1, Ordering::SeqCst);
            let job = Job {
                items,
                reply,
                enqueued: Instant::now(),
            };
            match tx.try_send(job) {
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
        let out = rx.await.map_err(|_| EngineError::ShuttingDown)??;
        timing::record(Stage::Queue(self.name), out.queue);
        timing::record(Stage::Inference(self.name), out.inference);
        Ok(out)
    }

    /// Requests waiting, not yet started.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// Stops accepting requests, lets the thread finish what is queued, joins it.
    pub fn shutdown(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

impl<T> Drop for Batcher<T> {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

/// An item waiting for a pass: its request and its place in it.
struct Entry<T> {
    job: u64,
    index: usize,
    item: T,
}

/// A request with items not yet embedded.
struct Open {
    reply: Reply,
    rows: Vec<Option<Vec<f32>>>,
    left: usize,
    enqueued: Instant,
    started: Option<Instant>,
}

/// The batching thread's state: items waiting in arrival order, and the
/// requests they belong to.
struct Worker<T> {
    model: Arc<str>,
    name: &'static str,
    policy: BatchPolicy,
    cost: fn(&T) -> usize,
    run: Run<T>,
    observer: Arc<dyn EngineObserver>,
    depth: Arc<AtomicUsize>,
    waiting: VecDeque<Entry<T>>,
    open: HashMap<u64, Open>,
    next_id: u64,
}

impl<T> Worker<T> {
    fn serve(mut self, rx: Receiver<Job<T>>) {
        loop {
            if self.waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => self.admit(job),
                    Err(_) => return, // closed and drained
                }
            }
            // Wait for company until a pass is full or max_wait has passed.
            let deadline = Instant::now() + self.policy.max_wait;
            while !self.pass_is_full() {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(job) => self.admit(job),
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            self.drop_abandoned();
            let n = self
                .policy
                .take(self.waiting.iter().map(|e| (self.cost)(&e.item)));
            if n == 0 {
                continue;
            }
            let pass: Vec<Entry<T>> = self.waiting.drain(..n).collect();
            self.run_pass(pass);
        }
    }

    fn admit(&mut self, job: Job<T>) {
        let id = self.next_id;
        self.next_id += 1;
        let n = job.items.len();
        self.waiting.extend(
            job.items
                .into_iter()
                .enumerate()
                .map(|(index, item)| Entry {
                    job: id,
                    index,
                    item,
                }),
        );
        self.open.insert(
            id,
            Open {
                reply: job.reply,
                rows: vec![None; n],
                left: n,
                enqueued: job.enqueued,
                started: None,
            },
        );
    }

    /// Whether the waiting items already fill a pass.
    fn pass_is_full(&self) -> bool {
        let n = self
            .policy
            .take(self.waiting.iter().map(|e| (self.cost)(&e.item)));
        n < self.waiting.len() || n >= self.policy.max_items
    }

    /// A request leaves the queue count when it starts or ends unstarted.
    fn leave_queue(&self) {
        let d = self.depth.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        self.observer.queue_depth(&self.model, self.name, d);
    }

    /// Requests whose caller went away need no work.
    fn drop_abandoned(&mut self) {
        let gone: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, o)| o.reply.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.close(id, None);
        }
    }

    /// Ends request `id`: with `error`, or unanswered (its caller is gone).
    fn close(&mut self, id: u64, error: Option<EngineError>) {
        if let Some(o) = self.open.remove(&id) {
            if o.started.is_none() {
                self.leave_queue();
            }
            if let Some(e) = error {
                let _ = o.reply.send(Err(e));
            }
            self.waiting.retain(|e| e.job != id);
        }
    }

    fn run_pass(&mut self, pass: Vec<Entry<T>>) {
        let started = Instant::now();
        let (keys, items): (Vec<(u64, usize)>, Vec<T>) =
            pass.into_iter().map(|e| ((e.job, e.index), e.item)).unzip();
        let mut jobs: Vec<u64> = Vec::new();
        for (job, _) in &keys {
            if !jobs.contains(job) {
                jobs.push(*job);
            }
        }
        for id in &jobs {
            if let Some(o) = self.open.get_mut(id) {
                if o.started.is_none() {
                    o.started = Some(started);
                    self.leave_queue();
                }
            }
        }
        match self.forward(&items) {
            Ok(rows) => self.deliver(&keys, rows),
            Err(e) if jobs.len() == 1 => self.close(jobs[0], Some(e)),
            Err(_) => {
                // Isolate: each request's items of this pass alone.
                let mut parts: Vec<Part<T>> =
                    jobs.iter().map(|_| (Vec::new(), Vec::new())).collect();
                for (key, item) in keys.into_iter().zip(items) {
                    let k = jobs.iter().position(|&j| j == key.0).expect("listed");
                    parts[k].0.push(key);
                    parts[k].1.push(item);
                }
                for (id, (keys, items)) in jobs.into_iter().zip(parts) {
                    match self.forward(&items) {
                        Ok(rows) => self.deliver(&keys, rows),
                        Err(e) => self.close(id, Some(e)),
                    }
                }
            }
        }
    }

    /// One forward pass, timed and observed.
    fn forward(&self, items: &[T]) -> Result<Vec<Vec<f32>>, EngineError> {
        let tokens = items.len() * items.iter().map(|t| (self.cost)(t)).max().unwrap_or(0);
        let started = Instant::now();
        let out = (self.run)(items);
        self.observer.batch(
            &self.model,
            self.name,
            items.len(),
            tokens,
            started.elapsed().as_secs_f64(),
        );
        let rows = out.map_err(EngineError::from_run)?;
        if rows.len() != items.len() {
            return Err(EngineError::Model(format!(
                "{} rows for {} items",
                rows.len(),
                items.len()
            )));
        }
        Ok(rows)
    }

    /// Hands each row to its request; a complete request is answered.
    fn deliver(&mut self, keys: &[(u64, usize)], rows: Vec<Vec<f32>>) {
        let now = Instant::now();
        for (&(job, index), row) in keys.iter().zip(rows) {
            let Some(o) = self.open.get_mut(&job) else {
                continue;
            };
            o.rows[index] = Some(row);
            o.left -= 1;
            if o.left == 0 {
                let o = self.open.remove(&job).expect("present");
                let started = o.started.unwrap_or(now);
                let _ = o.reply.send(Ok(Embedded {
                    rows: o.rows.into_iter().map(|r| r.expect("filled")).collect(),
                    queue: started.saturating_duration_since(o.enqueued),
                    inference: now.saturating_duration_since(started),
                }));
            }
        }
    }
}

/// Class embeddings by (label, templates joined).
type LabelCache = lru::LruCache<(String, String), Arc<Vec<f32>>>;

/// The model behind two batchers, plus the class-embedding cache.
pub struct Embedder {
    pipeline: Arc<Pipeline>,
    text: Batcher<Vec<u32>>,
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

/// The text tower as the batcher sees it: token ids in, padded to the
/// longest of the pass.
fn text_tower(p: &Arc<Pipeline>, policy: BatchPolicy) -> Tower<Vec<u32>> {
    let (vocab, context) = (
        p.clip.text.hf_config().vocab_size,
        p.tokenizer.context_length(),
    );
    let run = p.clone();
    Tower {
        name: "text",
        policy,
        cost: |ids| ids.len(),
        validate: Box::new(move |ids: &Vec<u32>| {
            if ids.is_empty() || ids.len() > context {
                return Err(Error::InvalidArgument(format!(
                    "{} tokens; a text has 1 to {context}",
                    ids.len()
                )));
            }
            match ids.iter().find(|&&t| t as usize >= vocab) {
                Some(t) => Err(Error::InvalidArgument(format!(
                    "token id {t} is past the text tower's vocabulary of {vocab}"
                ))),
                None => Ok(()),
            }
        }),
        run: Box::new(move |ids: &[Vec<u32>]| Ok(run.embed_tokens(ids)?.to_vec2::<f32>()?)),
    }
}

/// The image tower as the batcher sees it: normalised `3 x S x S` pixels.
fn image_tower(p: &Arc<Pipeline>, policy: BatchPolicy) -> Tower<Vec<f32>> {
    let s = p.preprocessor.image_size();
    let run = p.clone();
    Tower {
        name: "image",
        policy,
        cost: |_| 1,
        validate: Box::new(move |px: &Vec<f32>| {
            if px.len() != 3 * s * s {
                return Err(Error::InvalidArgument(format!(
                    "{} values of pixels; the image tower takes 3 x {s} x {s}",
                    px.len()
                )));
            }
            Ok(())
        }),
        run: Box::new(move |px: &[Vec<f32>]| Ok(run.embed_pixels(px)?.to_vec2::<f32>()?)),
    }
}

impl Embedder {
    /// The model `name` (as metrics label it) behind its two batchers.
    pub fn new(
        name: &str,
        pipeline: Pipeline,
        cfg: EngineConfig,
        observer: Option<Arc<dyn EngineObserver>>,
    ) -> Self {
        let pipeline = Arc::new(pipeline);
        let observer = observer.unwrap_or_else(|| Arc::new(NoObserver));
        let text = Batcher::start(
            name,
            text_tower(&pipeline, cfg.text),
            cfg.queue_capacity,
            observer.clone(),
        );
        let image = Batcher::start(
            name,
            image_tower(&pipeline, cfg.image),
            cfg.queue_capacity,
            observer,
        );
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

    /// Token ids of `texts`, computed on the blocking pool (timed as
    /// `tokenize`).
    pub async fn tokenize(&self, texts: Vec<String>) -> Result<Vec<Vec<u32>>, EngineError> {
        if texts.is_empty() {
            return Ok(vec![]);
        }
        let p = self.pipeline.clone();
        timing::timed(Stage::Tokenize, async move {
            tokio::task::spawn_blocking(move || p.tokenize(&texts))
                .await
                .map_err(|e| EngineError::Model(format!("tokenizing: {e}")))?
                .map_err(EngineError::from_run)
        })
        .await
    }

    /// Normalised text embeddings, batched with other requests.
    pub async fn embed_texts(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EngineError> {
        Ok(self.embed_texts_counted(texts).await?.0)
    }

    /// [`embed_texts`](Self::embed_texts) and the number of tokens embedded
    /// (`<s>` and `</s>` included, padding not).
    pub async fn embed_texts_counted(
        &self,
        texts: Vec<String>,
    ) -> Result<(Vec<Vec<f32>>, usize), EngineError> {
        let ids = self.tokenize(texts).await?;
        let tokens = ids.iter().map(Vec::len).sum();
        Ok((self.text.submit(ids).await?.rows, tokens))
    }

    /// Normalised embeddings of preprocessed images, batched with other requests.
    pub async fn embed_pixels(&self, pixels: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, EngineError> {
        Ok(self.image.submit(pixels).await?.rows)
    }

    /// Image bytes -> normalised `3 x S x S` pixels. CPU work: call it from a
    /// blocking thread.
    pub fn preprocess(&self, bytes: &[u8]) -> Result<Vec<f32>, Error> {
        self.pipeline.preprocessor.preprocess(bytes)
    }

    /// [`preprocess`](Self::preprocess) and a JPEG thumbnail, from one decode.
    pub fn preprocess_with_thumbnail(&self, bytes: &[u8]) -> Result<(Vec<f32>, Vec<u8>), Error> {
        crate::thumbnail::pixels_and_thumbnail(
            &self.pipeline.preprocessor,
            bytes,
            crate::thumbnail::SIDE,
        )
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
        let scale = self.pipeline.clip.logit_scale_exp();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_bounds_items_and_padded_tokens() {
        let p = BatchPolicy {
            max_items: 4,
            max_tokens: 20,
            max_wait: Duration::ZERO,
        };
        assert_eq!(p.take([5, 5, 5, 5, 5]), 4); // 4 x 5 = 20 tokens
        assert_eq!(p.take([5, 5, 10]), 2); // a third would pad to 3 x 10
        assert_eq!(p.take([10, 2, 2]), 2); // 2 x 10 fits, 3 x 10 does not
        assert_eq!(p.take([30, 1]), 1); // one item always fits
        assert_eq!(p.take([1; 9]), 4); // max_items
        assert_eq!(p.take([]), 0);
    }

    /// A tower of numbers: a row is `[x]`; `13` makes the whole pass fail,
    /// `99` is refused at submission; every pass's items are recorded.
    fn numbers(policy: BatchPolicy, passes: Arc<Mutex<Vec<Vec<u32>>>>) -> Batcher<u32> {
        let tower = Tower {
            name: "numbers",
            policy,
            cost: |x: &u32| (*x as usize).max(1),
            validate: Box::new(|x: &u32| {
                if *x == 99 {
                    Err(Error::InvalidArgument("99 is refused".into()))
                } else {
                    Ok(())
                }
            }),
            run: Box::new(move |xs: &[u32]| {
                passes.lock().unwrap().push(xs.to_vec());
                if xs.contains(&13) {
                    return Err(Error::Tokenizer("13 spoils the pass".into()));
                }
                Ok(xs.iter().map(|&x| vec![x as f32]).collect())
            }),
        };
        Batcher::start("numbers", tower, 64, Arc::new(NoObserver))
    }

    fn rows(r: &Result<Embedded, EngineError>) -> Vec<f32> {
        r.as_ref().unwrap().rows.iter().map(|r| r[0]).collect()
    }

    #[tokio::test]
    async fn a_bad_item_fails_only_its_own_request() {
        let passes = Arc::new(Mutex::new(Vec::new()));
        let b = numbers(
            BatchPolicy {
                max_items: 32,
                max_tokens: usize::MAX,
                max_wait: Duration::from_millis(200),
            },
            passes.clone(),
        );
        let (a, bad, c, refused) = tokio::join!(
            b.submit(vec![1, 2]),
            b.submit(vec![13]),
            b.submit(vec![3]),
            b.submit(vec![4, 99]),
        );
        assert_eq!(rows(&a), [1.0, 2.0]);
        assert_eq!(rows(&c), [3.0]);
        // The spoiled pass is an input error of that request alone (4xx).
        assert!(matches!(bad, Err(EngineError::Input(_))), "{bad:?}");
        // Refused at submission: never reaches a pass.
        match refused {
            Err(EngineError::Input(e)) => assert!(e.to_string().contains("item 1"), "{e}"),
            other => panic!("{other:?}"),
        }
        let passes = passes.lock().unwrap().clone();
        assert!(!passes.iter().flatten().any(|&x| x == 4 || x == 99));
        // One shared pass that failed, then each request alone.
        assert_eq!(passes[0].len(), 4, "{passes:?}");
        assert_eq!(passes.len(), 4, "{passes:?}");
        assert_eq!(b.depth(), 0);
    }

    #[tokio::test]
    async fn passes_respect_the_token_budget_and_rows_come_back_in_order() {
        let passes = Arc::new(Mutex::new(Vec::new()));
        let b = numbers(
            BatchPolicy {
                max_items: 8,
                max_tokens: 20,
                max_wait: Duration::from_millis(50),
            },
            passes.clone(),
        );
        let big: Vec<u32> = (0..10).map(|i| 2 + i % 3).collect(); // costs 2, 3, 4
        let (x, y) = tokio::join!(b.submit(big.clone()), b.submit(vec![10, 1]));
        let want: Vec<f32> = big.iter().map(|&v| v as f32).collect();
        assert_eq!(rows(&x), want);
        assert_eq!(rows(&y), [10.0, 1.0]);
        let x = x.unwrap();
        assert!(x.inference > Duration::ZERO);
        for p in passes.lock().unwrap().iter() {
            let longest = *p.iter().max().unwrap() as usize;
            assert!(
                p.len() <= 8 && (p.len() == 1 || p.len() * longest <= 20),
                "{p:?}"
            );
        }
        let total: usize = passes.lock().unwrap().iter().map(Vec::len).sum();
        assert_eq!(total, 12, "every item exactly once");
    }

    #[tokio::test]
    async fn a_shut_down_batcher_refuses_new_work() {
        let b = numbers(
            BatchPolicy {
                max_items: 4,
                max_tokens: usize::MAX,
                max_wait: Duration::ZERO,
            },
            Arc::new(Mutex::new(Vec::new())),
        );
        assert_eq!(rows(&b.submit(vec![7]).await), [7.0]);
        b.shutdown();
        assert!(matches!(
            b.submit(vec![7]).await,
            Err(EngineError::ShuttingDown)
        ));
    }
}
