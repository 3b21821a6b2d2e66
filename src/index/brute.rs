//! Exact search in memory, no persistence.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde_json::Value;

use super::store::Store;
use super::{normalized, validate_id, Hit, IndexError, Item, VectorIndex};

/// Exact (brute-force) cosine search over an in-memory table. `snapshot` and
/// `flush` do nothing.
pub struct BruteForceIndex {
    dim: usize,
    store: RwLock<Store>,
}

impl BruteForceIndex {
    pub fn new(dim: usize) -> Self {
        BruteForceIndex {
            dim,
            store: RwLock::new(Store::new(dim)),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Store> {
        self.store.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Store> {
        self.store.write().unwrap_or_else(|e| e.into_inner())
    }

    fn compact_if_needed(store: &mut Store) {
        if store.dead() > 0 && store.dead() * 4 > store.slot_count() {
            *store = store.compacted();
        }
    }
}

impl VectorIndex for BruteForceIndex {
    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.read().live()
    }

    fn insert(&self, items: Vec<Item>) -> Result<(), IndexError> {
        let mut ready = Vec::with_capacity(items.len());
        for item in items {
            validate_id(&item.id)?;
            let v = normalized(&item.vector, self.dim)?;
            ready.push((item.id, v, item.metadata));
        }
        let mut store = self.write();
        for (id, v, m) in ready {
            store.upsert(id, &v, m);
        }
        Self::compact_if_needed(&mut store);
        Ok(())
    }

    fn get(&self, id: &str) -> Option<Value> {
        self.read().get(id).cloned()
    }

    fn contains(&self, id: &str) -> bool {
        self.read().contains(id)
    }

    fn delete(&self, id: &str) -> Result<bool, IndexError> {
        validate_id(id)?;
        let mut store = self.write();
        let found = store.delete(id);
        Self::compact_if_needed(&mut store);
        Ok(found)
    }

    fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>, IndexError> {
        let q = normalized(query, self.dim)?;
        let store = self.read();
        let top = store.brute_force(&q, k);
        Ok(store.hits(top))
    }

    fn snapshot(&self) -> Result<(), IndexError> {
        Ok(())
    }

    fn flush(&self) -> Result<(), IndexError> {
        Ok(())
    }
}
