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

    pub(crate) fn hits(&self, top: Vec<(usize, f32)>) -> Vec<Hit> {
        top.into_iter()
            .map(|(s, score)| Hit {
                id: self.slots[s].id.clone(),
                score,
                metadata: self.slots[s].metadata.clone(),
            })
            .collect()
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
