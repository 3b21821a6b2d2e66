//! Per-request timing: where a request's time went (decoding images,
//! tokenizing texts, waiting in a tower's queue, the forward pass), recorded
//! by the code that does the work and read back by whoever opened the scope
//! (the server, for its `Server-Timing` header and its metrics).
//!
//! A scope is task-local: [`scope`] wraps a request's future, [`record`]
//! adds to the scope of the task it is called from and does nothing outside
//! one. Work on other threads is timed by the awaiting task around it.

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

/// A stage of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Fetching images given as URLs.
    Fetch,
    /// Image bytes -> pixels (decode, resample, normalise, thumbnail).
    Decode,
    /// Texts -> token ids.
    Tokenize,
    /// Waiting in a tower's queue until the first forward pass with the
    /// request's items starts.
    Queue(&'static str),
    /// From that start until the request's last item is embedded.
    Inference(&'static str),
}

impl Stage {
    /// The stage's name in `Server-Timing` and in metrics labels:
    /// `decode`, `tokenize`, `image-queue`, `text-inference`...
    pub fn name(&self) -> String {
        match self {
            Stage::Fetch => "fetch".into(),
            Stage::Decode => "decode".into(),
            Stage::Tokenize => "tokenize".into(),
            Stage::Queue(tower) => format!("{tower}-queue"),
            Stage::Inference(tower) => format!("{tower}-inference"),
        }
    }
}

/// The time of each stage of one request, summed over its steps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    stages: Vec<(Stage, Duration)>,
    model: Option<String>,
}

impl Timings {
    pub fn add(&mut self, stage: Stage, d: Duration) {
        match self.stages.iter_mut().find(|(s, _)| *s == stage) {
            Some((_, total)) => *total += d,
            None => self.stages.push((stage, d)),
        }
    }

    /// The model the request used, if it named or defaulted to one.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Stages in the order they were first recorded.
    pub fn stages(&self) -> &[(Stage, Duration)] {
        &self.stages
    }

    pub fn get(&self, stage: Stage) -> Option<Duration> {
        self.stages
            .iter()
            .find(|(s, _)| *s == stage)
            .map(|(_, d)| *d)
    }

    /// The value of a `Server-Timing` header: `decode;dur=1.234, ...` in
    /// milliseconds, then `total`.
    pub fn server_timing(&self, total: Duration) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        self.stages
            .iter()
            .map(|(s, d)| format!("{};dur={:.3}", s.name(), ms(*d)))
            .chain(std::iter::once(format!("total;dur={:.3}", ms(total))))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

tokio::task_local! {
    static TIMINGS: RefCell<Timings>;
}

/// Runs `fut` with an empty timing scope; returns its output and the timings.
pub async fn scope<F: Future>(fut: F) -> (F::Output, Timings) {
    TIMINGS
        .scope(RefCell::new(Timings::default()), async move {
            let out = fut.await;
            let t = TIMINGS.with(|t| t.borrow().clone());
            (out, t)
        })
        .await
}

/// Adds `d` to `stage` in the current task's scope, if it has one.
pub fn record(stage: Stage, d: Duration) {
    let _ = TIMINGS.try_with(|t| t.borrow_mut().add(stage, d));
}

/// Says which model the current request uses (metrics label by it).
pub fn set_model(name: &str) {
    let _ = TIMINGS.try_with(|t| t.borrow_mut().model = Some(name.to_string()));
}

/// Times an awaited piece of work as `stage`.
pub async fn timed<F: Future>(stage: Stage, fut: F) -> F::Output {
    let started = std::time::Instant::now();
    let out = fut.await;
    record(stage, started.elapsed());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stages_add_up_inside_a_scope_and_nowhere_else() {
        record(Stage::Decode, Duration::from_millis(5)); // no scope: ignored
        let ((), t) = scope(async {
            record(Stage::Decode, Duration::from_millis(2));
            record(Stage::Queue("text"), Duration::from_micros(1500));
            record(Stage::Decode, Duration::from_millis(3));
        })
        .await;
        assert_eq!(t.get(Stage::Decode), Some(Duration::from_millis(5)));
        assert_eq!(t.get(Stage::Tokenize), None);
        assert_eq!(
            t.server_timing(Duration::from_millis(10)),
            "decode;dur=5.000, text-queue;dur=1.500, total;dur=10.000"
        );
        // Scopes do not leak into each other.
        let ((), t2) = scope(async {}).await;
        assert!(t2.stages().is_empty());
    }
}
