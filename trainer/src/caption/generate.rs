//! Autoregressive decoding shared by the captioner and the translator:
//! greedy, beam search and nucleus sampling, step for step as transformers'
//! `generate` does them (same logits processors, same beam bookkeeping:
//! `2 x beams` candidates, finished hypotheses scored `sum_logprobs /
//! new_len^length_penalty`, the early-stop heuristic of `early_stopping=False`),
//! so that the token ids match on the same weights.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

/// A decoder that keeps its own caches: it is fed the running sequences'
/// next tokens and returns their next-token logits.
pub trait Decoder {
    /// `tokens`: `(rows, t)` u32 on the CPU, the new tokens of every running
    /// row (the whole prompt on the first call, one token after). Returns the
    /// logits of the last position, `(rows, vocab)`.
    fn step(&mut self, tokens: &Tensor) -> candle_core::Result<Tensor>;
    /// Keeps rows `idx` of the caches, in that order (beam reordering, or
    /// dropping finished rows).
    fn select(&mut self, idx: &[u32]) -> candle_core::Result<()>;
}

/// Nucleus sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub top_p: f32,
    pub top_k: usize,
    pub temperature: f32,
}

/// How to decode.
#[derive(Debug, Clone, PartialEq)]
pub struct GenConfig {
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    /// 1: greedy (or sampling); more: beam search.
    pub num_beams: usize,
    pub length_penalty: f64,
    pub eos: u32,
    pub pad: u32,
    /// Tokens never generated (transformers' single-token `bad_words_ids`).
    pub banned: Vec<u32>,
    /// Forced as the last token at the length limit.
    pub forced_eos: Option<u32>,
}

/// Logits processors in transformers' order: min new tokens, bad words,
/// forced EOS at the limit. `cur` and `prompt` are sequence lengths.
fn process(cfg: &GenConfig, row: &mut [f32], cur: usize, prompt: usize) {
    if cur - prompt < cfg.min_new_tokens {
        row[cfg.eos as usize] = f32::NEG_INFINITY;
    }
    for &b in &cfg.banned {
        if let Some(v) = row.get_mut(b as usize) {
            *v = f32::NEG_INFINITY;
        }
    }
    if let Some(e) = cfg.forced_eos {
        if cur == prompt + cfg.max_new_tokens - 1 {
            for (i, v) in row.iter_mut().enumerate() {
                *v = if i == e as usize {
                    0.0
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
    }
}

fn log_softmax(row: &mut [f32]) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = row.iter().map(|v| (v - m).exp()).sum();
    let l = m + s.ln();
    for v in row.iter_mut() {
        *v -= l;
    }
}

fn rows(t: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    t.to_dtype(DType::F32)?.to_vec2::<f32>()
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// One sample from processed logits: temperature, top-k, top-p (transformers'
/// warpers, in that order), then a draw.
fn sample(row: &[f32], s: &Sampling, rng: &mut impl Rng) -> u32 {
    let t = s.temperature.max(1e-5);
    let mut idx: Vec<usize> = (0..row.len()).filter(|&i| row[i].is_finite()).collect();
    if idx.is_empty() {
        return argmax(row);
    }
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let m = row[idx[0]] / t;
    let p: Vec<f64> = idx
        .iter()
        .map(|&i| f64::from((row[i] / t - m).exp()))
        .collect();
    let total: f64 = p.iter().sum();
    // Keep the smallest prefix whose mass reaches top_p (at least one token).
    let mut keep = idx.len();
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        for (j, q) in p.iter().enumerate() {
            acc += q / total;
            if acc >= f64::from(s.top_p) {
                keep = j + 1;
                break;
            }
        }
    }
    let mass: f64 = p[..keep].iter().sum();
    let mut u = rng.random::<f64>() * mass;
    for (&i, q) in idx.iter().zip(&p).take(keep) {
        u -= q;
        if u <= 0.0 {
            return i as u32;
        }
    }
    idx[keep - 1] as u32
}

/// Greedy decoding (or sampling, with `sampling` and one RNG per row) of
/// `prompts.len()` rows that all start with the same-length prompt. Returns
/// the new tokens of each row, its EOS included when it produced one.
pub fn greedy(
    dec: &mut impl Decoder,
    prompts: &[Vec<u32>],
    cfg: &GenConfig,
    sampling: Option<(&Sampling, &mut [rand::rngs::StdRng])>,
) -> candle_core::Result<Vec<Vec<u32>>> {
    let n = prompts.len();
    let prompt_len = prompts.first().map_or(0, Vec::len);
    let mut out = vec![Vec::new(); n];
    if n == 0 || cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    let device_tokens = |rows: &[Vec<u32>]| -> candle_core::Result<Tensor> {
        let t = rows[0].len();
        let flat: Vec<u32> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), t), &candle_core::Device::Cpu)
    };
    let (sampling, mut rngs) = match sampling {
        Some((s, r)) => (Some(*s), Some(r)),
        None => (None, None),
    };
    // Rows still running, by their index in `out`.
    let mut live: Vec<usize> = (0..n).collect();
    let mut input = device_tokens(prompts)?;
    for step in 0..cfg.max_new_tokens {
        let logits = dec.step(&input)?;
        let mut next = Vec::with_capacity(live.len());
        for (r, mut row) in rows(&logits)?.into_iter().enumerate() {
            process(cfg, &mut row, prompt_len + step, prompt_len);
            let tok = match (&sampling, &mut rngs) {
                (Some(s), Some(rngs)) => sample(&row, s, &mut rngs[live[r]]),
                _ => argmax(&row),
            };
            out[live[r]].push(tok);
            next.push(tok);
        }
        let keep: Vec<u32> = (0..live.len() as u32)
            .filter(|&r| next[r as usize] != cfg.eos)
            .collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() < live.len() {
            // Finished rows leave the batch (their later tokens would be
            // padding, which cannot change the rows still running).
            dec.select(&keep)?;
            live = keep.iter().map(|&r| live[r as usize]).collect();
            next = keep.iter().map(|&r| next[r as usize]).collect();
        }
        input = Tensor::from_vec(next, (live.len(), 1), &candle_core::Device::Cpu)?;
    }
    Ok(out)
}

/// Beam search of `prompts.len()` inputs, `cfg.num_beams` rows each (the
/// decoder's rows are input-major: rows `b * beams .. (b + 1) * beams` are
/// input `b`'s beams, all starting with its prompt). Returns each input's best
/// finished sequence's new tokens, EOS included when it ended with one.
pub fn beam_search(
    dec: &mut impl Decoder,
    prompts: &[Vec<u32>],
    cfg: &GenConfig,
) -> candle_core::Result<Vec<Vec<u32>>> {
    let nb = cfg.num_beams.max(1);
    let batch = prompts.len();
    if batch == 0 || cfg.max_new_tokens == 0 {
        return Ok(vec![Vec::new(); batch]);
    }
    let prompt_len = prompts[0].len();
    let max_len = prompt_len + cfg.max_new_tokens;
    let keep_k = 2 * nb;
    // Per input: running (tokens, score), finished (tokens, score, finished?).
    let mut running: Vec<Vec<(Vec<u32>, f32)>> = prompts
        .iter()
        .map(|p| {
            (0..nb)
                .map(|j| (p.clone(), if j == 0 { 0.0 } else { -1.0e9 }))
                .collect()
        })
        .collect();
    let mut finished: Vec<Vec<(Vec<u32>, f32, bool)>> = prompts
        .iter()
        .map(|p| vec![(p.clone(), -1.0e9, false); nb])
        .collect();
    let mut unsatisfied = vec![true; batch];
    let flat: Vec<u32> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), nb).flatten())
        .collect();
    let mut input = Tensor::from_vec(flat, (batch * nb, prompt_len), &candle_core::Device::Cpu)?;
    let mut cur = prompt_len;
    loop {
        let logits = rows(&dec.step(&input)?)?;
        let vocab = logits[0].len();
        let mut reorder = Vec::with_capacity(batch * nb);
        let mut next_tokens = Vec::with_capacity(batch * nb);
        let mut any_continuation = false;
        for b in 0..batch {
            // Accumulated log-probabilities of every (beam, token).
            let mut acc = Vec::with_capacity(nb * vocab);
            for j in 0..nb {
                let mut row = logits[b * nb + j].clone();
                log_softmax(&mut row);
                process(cfg, &mut row, cur, prompt_len);
                let s = running[b][j].1;
                acc.extend(row.iter().map(|v| v + s));
            }
            let mut order: Vec<usize> = (0..acc.len()).collect();
            // torch.topk: largest first; equal values keep the lower index.
            order.sort_by(|&x, &y| acc[y].total_cmp(&acc[x]).then(x.cmp(&y)));
            order.truncate(keep_k);
            let cands: Vec<(usize, u32, f32, bool)> = order
                .iter()
                .map(|&i| {
                    let (beam, tok) = (i / vocab, (i % vocab) as u32);
                    let hits = tok == cfg.eos || cur + 1 >= max_len;
                    (beam, tok, acc[i], hits)
                })
                .collect();
            if cands.iter().any(|c| !c.3) {
                any_continuation = true;
            }
            // The next running beams: the best candidates that did not stop.
            let mut run_order: Vec<usize> = (0..cands.len()).collect();
            let run_score = |c: &(usize, u32, f32, bool)| c.2 + if c.3 { -1.0e9 } else { 0.0 };
            run_order.sort_by(|&x, &y| {
                run_score(&cands[y])
                    .total_cmp(&run_score(&cands[x]))
                    .then(x.cmp(&y))
            });
            let new_running: Vec<(Vec<u32>, f32)> = run_order[..nb]
                .iter()
                .map(|&i| {
                    let (beam, tok, _, _) = cands[i];
                    let mut seq = running[b][beam].0.clone();
                    seq.push(tok);
                    reorder.push((b * nb + beam) as u32);
                    next_tokens.push(tok);
                    (seq, run_score(&cands[i]))
                })
                .collect();
            // Finished hypotheses: the top `nb` candidates that stopped join
            // the finished ones; the best `nb` of all are kept.
            let denom = ((cur + 1 - prompt_len) as f64).powf(cfg.length_penalty) as f32;
            let mut merged: Vec<(Vec<u32>, f32, bool)> = finished[b].clone();
            for (i, c) in cands.iter().enumerate() {
                let just_finished = c.3 && i < nb;
                let mut score = c.2 / denom;
                if !unsatisfied[b] {
                    score += -1.0e9;
                }
                if !just_finished {
                    score += -1.0e9;
                }
                let mut seq = running[b][c.0].0.clone();
                seq.push(c.1);
                merged.push((seq, score, just_finished));
            }
            let mut m_order: Vec<usize> = (0..merged.len()).collect();
            m_order.sort_by(|&x, &y| merged[y].1.total_cmp(&merged[x].1).then(x.cmp(&y)));
            finished[b] = m_order[..nb].iter().map(|&i| merged[i].clone()).collect();
            running[b] = new_running;
        }
        cur += 1;
        for b in 0..batch {
            let best_running =
                running[b][0].1 / ((cur - prompt_len) as f64).powf(cfg.length_penalty) as f32;
            let worst = finished[b]
                .iter()
                .map(|f| f.1)
                .fold(f32::INFINITY, f32::min);
            let improvable = finished[b]
                .iter()
                .any(|f| best_running > if f.2 { worst } else { -1.0e9 });
            unsatisfied[b] = unsatisfied[b] && improvable;
        }
        if !unsatisfied.iter().any(|&u| u) || !any_continuation || cur >= max_len {
            break;
        }
        dec.select(&reorder)?;
        input = Tensor::from_vec(next_tokens, (batch * nb, 1), &candle_core::Device::Cpu)?;
    }
    Ok(finished
        .into_iter()
        .map(|f| f[0].0[prompt_len..].to_vec())
        .collect())
}

/// A reproducible RNG for one draw: the run's seed, the item's key and the
/// draw's number (independent of batching).
pub fn draw_rng(seed: u64, key: &str, draw: usize) -> rand::rngs::StdRng {
    // FNV-1a over the key, mixed with the seed and the draw number.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let s = seed ^ h.rotate_left(17) ^ (draw as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    rand::rngs::StdRng::seed_from_u64(s)
}
