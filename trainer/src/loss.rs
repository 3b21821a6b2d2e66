//! The symmetric contrastive (InfoNCE) loss of CLIP against cached image
//! features, distillation's cosine loss, and GradCache: the gradient of a
//! batch of thousands computed in micro-batches with the memory of one
//! micro-batch.
//!
//! GradCache (Gao et al., 2021): (1) embed every text of the batch without
//! keeping a graph; (2) take the loss over the whole batch and its gradient
//! with respect to the text embeddings only (cheap: a B x B matrix); (3) run
//! each micro-batch again with the graph and back-propagate that slice of the
//! embedding gradient. By the chain rule the summed parameter gradients equal
//! the full-batch gradient; the LoRA dropout masks are replayed by seed, so
//! the two passes compute the same function.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var, D};

use crate::model::TrainModel;

/// Waits for the device to finish all the work queued so far (CUDA runs
/// asynchronously: without this the timings would be of the queueing).
fn sync(t: &Tensor) -> candle_core::Result<()> {
    t.device().synchronize()
}

/// `mean_i(logsumexp(logits_i) - logits_i[i])` over rows, differentiable.
fn cross_entropy_diag(logits: &Tensor) -> candle_core::Result<Tensor> {
    let n = logits.dim(0)?;
    let m = logits.max_keepdim(1)?.detach();
    let lse = logits
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(1)?
        .log()?
        .broadcast_add(&m)?;
    let idx = Tensor::arange(0u32, n as u32, logits.device())?.unsqueeze(1)?;
    let picked = logits.contiguous()?.gather(&idx, 1)?;
    (lse - picked)?.mean_all()
}

/// CLIP's symmetric loss: `(CE(s I T^T) + CE(s T I^T)) / 2` with
/// `s = exp(logit_scale)`, for row-aligned normalised `images` and `texts`.
pub fn clip_loss(
    images: &Tensor,
    texts: &Tensor,
    logit_scale: &Tensor,
) -> candle_core::Result<Tensor> {
    let s = logit_scale.to_dtype(DType::F32)?.exp()?;
    let logits = images.matmul(&texts.t()?)?.broadcast_mul(&s)?;
    let a = cross_entropy_diag(&logits)?;
    let b = cross_entropy_diag(&logits.t()?)?;
    (a + b)? / 2.0
}

/// `mean(1 - cos(a_i, b_i))` for row-aligned unit vectors.
pub fn cosine_loss(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let cos = (a * b)?.sum(D::Minus1)?;
    (cos.ones_like()? - cos)?.mean_all()
}

/// The gradients of one step, by variable name.
pub struct StepGrads {
    pub loss: f32,
    pub grads: HashMap<String, Tensor>,
    /// Where the step's time went, in seconds.
    pub timing: Timing,
}

/// Seconds spent in each phase of a step.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Timing {
    /// GradCache's first pass: every text embedded without a graph.
    pub embed: f64,
    /// The loss and its gradient with respect to the embeddings.
    pub loss: f64,
    /// The second pass's forward (with the graph).
    pub forward: f64,
    /// The second pass's backward.
    pub backward: f64,
}

/// Sets the replayable dropout before a forward pass over rows
/// `first_row..` of the batch of step `seed`.
fn set_dropout(model: &TrainModel, seed: u64, first_row: usize) {
    model.dropout.set(seed, first_row);
}

/// Adds the gradients `store` holds for `vars` (as f32) into `acc`, by name.
pub(crate) fn add_grads(
    acc: &mut HashMap<String, Tensor>,
    vars: &[(String, Var)],
    store: &candle_core::backprop::GradStore,
) -> anyhow::Result<()> {
    for (name, var) in vars {
        if let Some(g) = store.get(var.as_tensor()) {
            let g = g.to_dtype(DType::F32)?;
            let sum = match acc.remove(name) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            acc.insert(name.clone(), sum);
        }
    }
    Ok(())
}

/// The loss and gradient of one contrastive batch the plain way: one forward
/// pass with the graph over the whole batch (the reference GradCache must
/// equal; memory grows with the batch).
pub fn full_batch_grads(
    model: &TrainModel,
    captions: &[String],
    images: &Tensor,
    seed: u64,
) -> anyhow::Result<StepGrads> {
    let mut timing = Timing::default();
    let t = std::time::Instant::now();
    set_dropout(model, seed, 0);
    let texts = model.encode_texts(captions)?;
    sync(&texts)?;
    timing.forward = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let loss = clip_loss(images, &texts, &model.clip.logit_scale)?;
    let store = loss.backward()?;
    let mut grads = HashMap::new();
    add_grads(&mut grads, &model.vars(), &store)?;
    let loss = loss.to_scalar::<f32>()?;
    timing.backward = t.elapsed().as_secs_f64();
    Ok(StepGrads {
        loss,
        grads,
        timing,
    })
}

/// The loss and gradient of one contrastive batch by GradCache, in
/// micro-batches of `micro` texts. `images`: `(B, d)` normalised, on the device.
pub fn grad_cache(
    model: &TrainModel,
    captions: &[String],
    images: &Tensor,
    micro: usize,
    seed: u64,
) -> anyhow::Result<StepGrads> {
    let micro = micro.max(1);
    let b = captions.len();
    anyhow::ensure!(
        images.dim(0)? == b,
        "{} images for {b} captions",
        images.dim(0)?
    );
    if micro >= b {
        // One micro-batch holds the batch: no need for the extra pass.
        return full_batch_grads(model, captions, images, seed);
    }
    let mut timing = Timing::default();
    let clock = std::time::Instant::now;
    // (1) Every text embedding, no graph kept.
    let t = clock();
    let mut rows = Vec::with_capacity(b.div_ceil(micro));
    for (i, chunk) in captions.chunks(micro).enumerate() {
        set_dropout(model, seed, i * micro);
        rows.push(model.encode_texts(chunk)?.detach());
    }
    let texts = Var::from_tensor(&Tensor::cat(&rows, 0)?)?;
    sync(images)?;
    timing.embed = t.elapsed().as_secs_f64();
    // (2) The loss over the whole batch and d loss / d texts.
    let t = clock();
    let loss = clip_loss(images, texts.as_tensor(), &model.clip.logit_scale)?;
    let store = loss.backward()?;
    let vars = model.vars();
    let mut grads = HashMap::new();
    // Only the logit scale (when learned) gets a gradient here directly.
    add_grads(&mut grads, &vars, &store)?;
    let d_texts = store
        .get(texts.as_tensor())
        .ok_or_else(|| anyhow::anyhow!("no gradient reached the text embeddings"))?
        .detach();
    let loss = loss.to_scalar::<f32>()?;
    timing.loss = t.elapsed().as_secs_f64();
    // (3) Each micro-batch again, with the graph, back-propagating its slice.
    for (i, chunk) in captions.chunks(micro).enumerate() {
        set_dropout(model, seed, i * micro);
        let t = clock();
        let emb = model.encode_texts(chunk)?;
        sync(&emb)?;
        timing.forward += t.elapsed().as_secs_f64();
        let t = clock();
        let g = d_texts.narrow(0, i * micro, chunk.len())?;
        let surrogate = (emb * g)?.sum_all()?;
        let store = surrogate.backward()?;
        add_grads(&mut grads, &vars, &store)?;
        sync(&d_texts)?;
        timing.backward += t.elapsed().as_secs_f64();
    }
    Ok(StepGrads {
        loss,
        grads,
        timing,
    })
}
