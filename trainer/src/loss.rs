//! The symmetric contrastive (InfoNCE) loss of CLIP against cached image
//! features, and GradCache: the gradient of a batch of thousands computed in
//! micro-batches with the memory of one micro-batch.
//!
//! GradCache (Gao et al., 2021): (1) embed every text of the batch without
//! keeping a graph; (2) take the loss over the whole batch and its gradient
//! with respect to the text embeddings only (cheap: a B x B matrix); (3) run
//! each micro-batch again with the graph and back-propagate that slice of the
//! embedding gradient. By the chain rule the summed parameter gradients equal
//! the full-batch gradient; the LoRA dropout masks are replayed by seed, so
//! the two passes compute the same function.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use crate::model::TrainModel;

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

/// The gradients of one step, by variable name.
pub struct StepGrads {
    pub loss: f32,
    pub grads: HashMap<String, Tensor>,
}

/// Sets the replayable dropout before a forward pass over rows
/// `first_row..` of the batch of step `seed`.
fn set_dropout(model: &TrainModel, seed: u64, first_row: usize) {
    model.dropout.set(seed, first_row);
}

fn add_grads(
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
    set_dropout(model, seed, 0);
    let texts = model.encode_texts(captions)?;
    let loss = clip_loss(images, &texts, &model.clip.logit_scale)?;
    let store = loss.backward()?;
    let mut grads = HashMap::new();
    add_grads(&mut grads, &model.vars(), &store)?;
    Ok(StepGrads {
        loss: loss.to_scalar::<f32>()?,
        grads,
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
    // (1) Every text embedding, no graph kept.
    let mut rows = Vec::with_capacity(b.div_ceil(micro));
    for (i, chunk) in captions.chunks(micro).enumerate() {
        set_dropout(model, seed, i * micro);
        rows.push(model.encode_texts(chunk)?.detach());
    }
    let texts = Var::from_tensor(&Tensor::cat(&rows, 0)?)?;
    // (2) The loss over the whole batch and d loss / d texts.
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
    // (3) Each micro-batch again, with the graph, back-propagating its slice.
    for (i, chunk) in captions.chunks(micro).enumerate() {
        set_dropout(model, seed, i * micro);
        let emb = model.encode_texts(chunk)?;
        let g = d_texts.narrow(0, i * micro, chunk.len())?;
        let surrogate = (emb * g)?.sum_all()?;
        let store = surrogate.backward()?;
        add_grads(&mut grads, &vars, &store)?;
    }
    Ok(StepGrads {
        loss: loss.to_scalar::<f32>()?,
        grads,
    })
}
