//! The in-memory item table shared by both indexes: vectors in one slab, one
//! slot per inserted vector; replaced and deleted slots become tombstones until
//! the store is compacted.

use std::collections::HashMap;

use serde_json::Value;

use super::Hit;

/// One write, as logged and applied.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op {
    /// `vector` is already validated and normalised.
    Upsert {
        id: String,
        vector: Vec<f32>,
        metadata: Value,
    },
    Delete {
        id: String,
    },
}

struct Slot {
    id: String,
    metadata: Value,
    live: bool,
}

pub(crate) struct Store {
    dim: usize,
    /// Slot `i` is `vectors[i * dim..(i + 1) * dim]`.
    vectors: Vec<f32>,
    /// The int8 copy of slot `i` for the quantized scan: `qvectors[i * dim..]`,
    /// `vector ~ qscales[i] * q`, `qsums[i] = sum(q)`.
    qvectors: Vec<i8>,
    qscales: Vec<f32>,
    qsums: Vec<i32>,
    slots: Vec<Slot>,
    by_id: HashMap<String, usize>,
    live: usize,
}

impl Store {
    pub(crate) fn new(dim: usize) -> Self {
        Self::with_capacity(dim, 0)
    }

    pub(crate) fn with_capacity(dim: usize, n: usize) -> Self {
        Store {
            dim,
            vectors: Vec::with_capacity(n.saturating_mul(dim)),
            qvectors: Vec::with_capacity(n.saturating_mul(dim)),
            qscales: Vec::with_capacity(n),
            qsums: Vec::with_capacity(n),
            slots: Vec::with_capacity(n),
            by_id: HashMap::with_capacity(n),
            live: 0,
        }
    }

    pub(crate) fn live(&self) -> usize {
        self.live
    }

    /// Slots, tombstones included.
    pub(crate) fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn dead(&self) -> usize {
        self.slots.len() - self.live
    }

    pub(crate) fn is_live(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(|s| s.live)
    }

    pub(crate) fn vector(&self, slot: usize) -> &[f32] {
        &self.vectors[slot * self.dim..(slot + 1) * self.dim]
    }

    pub(crate) fn get(&self, id: &str) -> Option<&Value> {
        self.by_id.get(id).map(|&s| &self.slots[s].metadata)
    }

    pub(crate) fn slot_of(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    pub(crate) fn apply(&mut self, op: Op) {
        match op {
            Op::Upsert {
                id,
                vector,
                metadata,
            } => self.upsert(id, &vector, metadata),
            Op::Delete { id } => {
                self.delete(&id);
            }
        }
    }

    /// A replaced item keeps no slot: the new version gets a fresh one, so a
    /// graph built over slots never sees a vector change under it.
    pub(crate) fn upsert(&mut self, id: String, vector: &[f32], metadata: Value) {
        debug_assert_eq!(vector.len(), self.dim);
        self.delete(&id);
        let slot = self.slots.len();
        self.vectors.extend_from_slice(vector);
        let (scale, sum) = quantize_i8(vector, &mut self.qvectors);
        self.qscales.push(scale);
        self.qsums.push(sum);
        self.slots.push(Slot {
            id: id.clone(),
            metadata,
            live: true,
        });
        self.by_id.insert(id, slot);
        self.live += 1;
    }

    pub(crate) fn delete(&mut self, id: &str) -> bool {
        match self.by_id.remove(id) {
            Some(slot) => {
                let s = &mut self.slots[slot];
                s.live = false;
                s.metadata = Value::Null;
                self.live -= 1;
                true
            }
            None => false,
        }
    }

    /// Live slots in slot order.
    pub(crate) fn live_slots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.slots.len()).filter(|&s| self.slots[s].live)
    }

    /// `(id, vector, metadata)` of every live item, in slot order.
    pub(crate) fn iter_live(&self) -> impl Iterator<Item = (&str, &[f32], &Value)> + '_ {
        self.live_slots().map(|s| {
            let slot = &self.slots[s];
            (slot.id.as_str(), self.vector(s), &slot.metadata)
        })
    }

    /// A copy without tombstones.
    pub(crate) fn compacted(&self) -> Store {
        let mut out = Store::with_capacity(self.dim, self.live);
        for (id, v, m) in self.iter_live() {
            out.upsert(id.to_owned(), v, m.clone());
        }
        out
    }

    /// Exact top-k over live slots: `(slot, score)`, best first.
    pub(crate) fn brute_force(&self, query: &[f32], k: usize) -> Vec<(usize, f32)> {
        let scored: Vec<(usize, f32)> = self
            .live_slots()
            .map(|s| (s, dot(query, self.vector(s))))
            .collect();
        top_k(scored, k)
    }

    /// Top-k over live slots by a scan of the int8 copies, the best
    /// candidates re-ranked exactly: `(slot, exact score)`, best first. Reads
    /// a quarter of the bytes of [`brute_force`](Self::brute_force), with
    /// VNNI dot products where the CPU has them.
    pub(crate) fn quantized_search(&self, query: &[f32], k: usize) -> Vec<(usize, f32)> {
        if k == 0 || self.live == 0 {
            return Vec::new();
        }
        let keep = (4 * k).max(k + 64).min(self.live);
        let mut qq = Vec::with_capacity(self.dim);
        let (qscale, _) = quantize_i8(query, &mut qq);
        // u8 for vpdpbusd: (q + 128) . x = q . x + 128 sum(x).
        let uq: Vec<u8> = qq.iter().map(|&v| (v as i16 + 128) as u8).collect();
        let n = self.slots.len();
        let parts = if n >= 16_384 {
            rayon::current_num_threads().max(1)
        } else {
            1
        };
        let per = n.div_ceil(parts);
        let scan =
            |part: usize| self.scan_range(&uq, qscale, part * per..((part + 1) * per).min(n), keep);
        let candidates: Vec<(usize, f32)> = if parts == 1 {
            scan(0)
        } else {
            use rayon::prelude::*;
            (0..parts).into_par_iter().flat_map(scan).collect()
        };
        let exact: Vec<(usize, f32)> = top_k(candidates, keep)
            .into_iter()
            .map(|(s, _)| (s, dot(query, self.vector(s))))
            .collect();
        top_k(exact, k)
    }

    /// The `keep` live slots of `range` with the highest approximate scores.
    fn scan_range(
        &self,
        uq: &[u8],
        qscale: f32,
        range: std::ops::Range<usize>,
        keep: usize,
    ) -> Vec<(usize, f32)> {
        use std::collections::BinaryHeap;
        #[derive(PartialEq)]
        struct Min(f32, usize);
        impl Eq for Min {}
        impl PartialOrd for Min {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Min {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                o.0.total_cmp(&self.0).then(o.1.cmp(&self.1))
            }
        }
        let dim = self.dim;
        let mut heap: BinaryHeap<Min> = BinaryHeap::with_capacity(keep + 1);
        for s in range {
            if !self.slots[s].live {
                continue;
            }
            let x = &self.qvectors[s * dim..(s + 1) * dim];
            let raw = dot_u8_i8(uq, x) - 128 * self.qsums[s];
            let score = raw as f32 * qscale * self.qscales[s];
            if heap.len() < keep {
                heap.push(Min(score, s));
            } else if heap.peek().is_some_and(|m| score > m.0) {
                heap.pop();
                heap.push(Min(score, s));
            }
        }
        heap.into_iter().map(|m| (m.1, m.0)).collect()
    }

    /// The hits of `top` (best first), equal scores ordered by id (as every
    /// index backend orders them).
    pub(crate) fn hits(&self, top: Vec<(usize, f32)>) -> Vec<Hit> {
        let mut hits: Vec<Hit> = top
            .into_iter()
            .map(|(s, score)| Hit {
                id: self.slots[s].id.clone(),
                score,
                metadata: self.slots[s].metadata.clone(),
            })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
        hits
    }
}

/// Best first; ties by slot, so results are deterministic.
fn by_score(a: &(usize, f32), b: &(usize, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

pub(crate) fn top_k(mut scored: Vec<(usize, f32)>, k: usize) -> Vec<(usize, f32)> {
    if k == 0 {
        return Vec::new();
    }
    if k < scored.len() {
        scored.select_nth_unstable_by(k - 1, by_score);
        scored.truncate(k);
    }
    scored.sort_unstable_by(by_score);
    scored
}

/// Appends the int8 quantization of `v` (symmetric, one scale: `v ~ s q`,
/// `|q| <= 127`) to `out`; returns `(s, sum(q))`.
fn quantize_i8(v: &[f32], out: &mut Vec<i8>) -> (f32, i32) {
    let amax = v.iter().fold(0f32, |m, &x| m.max(x.abs()));
    let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
    let mut sum = 0i32;
    out.extend(v.iter().map(|&x| {
        let q = (x / s).round_ties_even().clamp(-127.0, 127.0) as i8;
        sum += q as i32;
        q
    }));
    (s, sum)
}

/// `sum(u[i] * x[i])` of u8 and i8 vectors.
fn dot_u8_i8(u: &[u8], x: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::qgemm::available() {
        // SAFETY: AVX-512 F/BW/VNNI detected.
        return unsafe { dot_u8_i8_vnni(u, x) };
    }
    u.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_u8_i8_vnni(u: &[u8], x: &[i8]) -> i32 {
    use std::arch::x86_64::*;
    let n = u.len().min(x.len());
    let mut acc = _mm512_setzero_si512();
    let mut i = 0;
    while i + 64 <= n {
        let a = _mm512_loadu_si512(u.as_ptr().add(i) as *const _);
        let b = _mm512_loadu_si512(x.as_ptr().add(i) as *const _);
        acc = _mm512_dpbusd_epi32(acc, a, b);
        i += 64;
    }
    if i < n {
        let m: __mmask64 = (1u64 << (n - i)) - 1;
        let a = _mm512_maskz_loadu_epi8(m, u.as_ptr().add(i) as *const i8);
        let b = _mm512_maskz_loadu_epi8(m, x.as_ptr().add(i));
        acc = _mm512_dpbusd_epi32(acc, a, b);
    }
    _mm512_reduce_add_epi32(acc)
}

/// Dot product: sixteen independent lanes so that it vectorises, compiled
/// for AVX-512 and AVX2 and picked at run time (the search's inner loop).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::Isa;
        // SAFETY: the ISA comes from run-time detection.
        match crate::kernels::isa() {
            Some(Isa::Avx512) => return unsafe { dot_avx512(a, b) },
            Some(Isa::Avx2) => return unsafe { dot_avx2(a, b) },
            None => {}
        }
    }
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    let mut acc = [0f32; L];
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_and_clamped() {
        let scored = vec![(0, 0.1), (1, 0.9), (2, -0.5), (3, 0.9), (4, 0.3)];
        assert_eq!(top_k(scored.clone(), 3), vec![(1, 0.9), (3, 0.9), (4, 0.3)]);
        assert_eq!(top_k(scored.clone(), 10).len(), 5);
        assert!(top_k(scored, 0).is_empty());
    }

    #[test]
    fn dot_matches_naive_for_every_length() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.125).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-3, "n={n}");
        }
    }

    #[test]
    fn int8_dot_matches_integers_for_every_length() {
        for n in [0usize, 1, 7, 32, 63, 64, 65, 130, 512] {
            let u: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
            let x: Vec<i8> = (0..n)
                .map(|i| ((i * 53 % 255) as i32 - 127) as i8)
                .collect();
            let want: i32 = u.iter().zip(&x).map(|(&a, &b)| a as i32 * b as i32).sum();
            assert_eq!(dot_u8_i8(&u, &x), want, "n={n}");
        }
    }

    #[test]
    fn quantized_search_reranks_exactly() {
        let mut s = Store::new(24);
        let mut state = 7u64;
        let mut rnd = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for i in 0..3000 {
            let v: Vec<f32> = (0..24).map(|_| rnd()).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            let v: Vec<f32> = v.iter().map(|x| x / n).collect();
            s.upsert(format!("i{i}"), &v, Value::Null);
        }
        s.delete("i5");
        let mut found = 0;
        for q in 0..50 {
            let query = s.vector(q * 7).to_vec();
            let exact = s.brute_force(&query, 10);
            let got = s.quantized_search(&query, 10);
            assert_eq!(got.len(), 10);
            for (slot, score) in &got {
                assert!(s.is_live(*slot));
                assert_eq!(*score, dot(&query, s.vector(*slot)), "scores are exact");
            }
            found += got
                .iter()
                .filter(|g| exact.iter().any(|e| e.0 == g.0))
                .count();
        }
        assert!(
            found as f64 / 500.0 >= 0.99,
            "recall {}",
            found as f64 / 500.0
        );
        assert!(s.quantized_search(s.vector(0), 0).is_empty());
    }

    #[test]
    fn store_upsert_delete_compact() {
        let mut s = Store::new(2);
        s.upsert("a".into(), &[1.0, 0.0], Value::from(1));
        s.upsert("b".into(), &[0.0, 1.0], Value::from(2));
        s.upsert("a".into(), &[0.6, 0.8], Value::from(3));
        assert_eq!((s.live(), s.dead()), (2, 1));
        assert_eq!(s.get("a"), Some(&Value::from(3)));
        assert!(s.delete("b") && !s.delete("b"));
        let c = s.compacted();
        assert_eq!((c.live(), c.dead()), (1, 0));
        assert_eq!(
            c.brute_force(&[0.6, 0.8], 5),
            vec![(0, 0.6 * 0.6 + 0.8 * 0.8)]
        );
    }
}
