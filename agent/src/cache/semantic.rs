//! The semantic index: answers keyed by the meaning of a question within a
//! scope. A scope is the digest of everything that must match exactly (the
//! model, every output-changing parameter and, by default, the earlier
//! turns of the conversation); within it, the nearest stored vector by
//! cosine similarity answers when it reaches the policy's threshold. So two
//! conversations that differ in an earlier turn never share an answer.
//!
//! Bounds: entries and bytes (vector + answer) through one `moka` weigher —
//! every entry weighs at least `max_bytes / max_entries`, so the byte bound
//! also caps the count — a TTL, and at most [`MAX_PER_SCOPE`] entries per
//! scope, oldest dropped first. A lookup scans its scope only.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::CacheKey;

/// Most entries one scope keeps (a lookup compares against all of them).
pub const MAX_PER_SCOPE: usize = 4096;

struct Entry {
    scope: CacheKey,
    vector: Box<[f32]>,
    answer: Arc<[u8]>,
}

type Scopes = Arc<Mutex<HashMap<CacheKey, VecDeque<u64>>>>;

/// Vectors and answers by scope, bounded by entries, bytes and age.
pub struct SemanticIndex {
    entries: moka::sync::Cache<u64, Arc<Entry>>,
    scopes: Scopes,
    next_id: AtomicU64,
    threshold: f32,
}

/// A stored answer close enough to the question.
#[derive(Clone, Debug, PartialEq)]
pub struct SemanticHit {
    /// Cosine similarity to the question.
    pub similarity: f32,
    /// The stored answer.
    pub answer: Arc<[u8]>,
}

fn lock(scopes: &Scopes) -> std::sync::MutexGuard<'_, HashMap<CacheKey, VecDeque<u64>>> {
    scopes.lock().unwrap_or_else(|p| p.into_inner())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl SemanticIndex {
    /// An index of at most `max_entries` entries and `max_bytes` bytes,
    /// each living `ttl`; a hit needs cosine similarity ≥ `threshold`.
    pub fn new(max_entries: u64, max_bytes: u64, ttl: Duration, threshold: f32) -> Self {
        let floor = (max_bytes / max_entries.max(1)).max(1);
        let scopes: Scopes = Arc::default();
        let on_evict = scopes.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes.max(1))
            .time_to_live(ttl)
            .weigher(move |_id: &u64, e: &Arc<Entry>| {
                let size = (e.vector.len() * 4 + e.answer.len() + 64) as u64;
                u32::try_from(size.max(floor)).unwrap_or(u32::MAX)
            })
            .eviction_listener(move |id: Arc<u64>, entry: Arc<Entry>, _cause| {
                let mut scopes = lock(&on_evict);
                if let Some(ids) = scopes.get_mut(&entry.scope) {
                    ids.retain(|i| *i != *id);
                    if ids.is_empty() {
                        scopes.remove(&entry.scope);
                    }
                }
            })
            .build();
        Self {
            entries,
            scopes,
            next_id: AtomicU64::new(0),
            threshold,
        }
    }

    /// The closest answer in `scope` to the unit vector `question`, if it
    /// reaches the threshold.
    pub fn lookup(&self, scope: &CacheKey, question: &[f32]) -> Option<SemanticHit> {
        // Copy the ids out: the eviction listener takes the same lock and
        // may run inside `get`.
        let ids: Vec<u64> = lock(&self.scopes).get(scope)?.iter().copied().collect();
        let mut best: Option<SemanticHit> = None;
        for id in ids {
            let Some(entry) = self.entries.get(&id) else {
                continue;
            };
            if entry.vector.len() != question.len() {
                continue;
            }
            let similarity = dot(&entry.vector, question);
            if similarity >= self.threshold
                && best.as_ref().is_none_or(|b| similarity > b.similarity)
            {
                best = Some(SemanticHit {
                    similarity,
                    answer: entry.answer.clone(),
                });
            }
        }
        best
    }

    /// Stores `answer` for the unit vector `question` in `scope`.
    pub fn insert(&self, scope: CacheKey, question: Vec<f32>, answer: Arc<[u8]>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            scope,
            vector: question.into_boxed_slice(),
            answer,
        });
        let dropped = {
            let mut scopes = lock(&self.scopes);
            let ids = scopes.entry(scope).or_default();
            ids.push_back(id);
            (ids.len() > MAX_PER_SCOPE)
                .then(|| ids.pop_front())
                .flatten()
        };
        self.entries.insert(id, entry);
        if let Some(old) = dropped {
            self.entries.invalidate(&old);
        }
    }

    /// Entries held now (after pending evictions).
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Weighted bytes held now (after pending evictions).
    pub fn bytes(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size()
    }

    /// Scopes with at least one entry id (stale ids are dropped lazily).
    pub fn scope_count(&self) -> usize {
        self.entries.run_pending_tasks();
        lock(&self.scopes).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = dot(v, v).sqrt();
        v.iter().map(|x| x / n).collect()
    }

    fn scope(n: u8) -> CacheKey {
        CacheKey::from_canonical(&[n])
    }

    #[test]
    fn nearest_entry_above_threshold_answers_only_in_its_scope() {
        let index = SemanticIndex::new(100, 1 << 20, Duration::from_secs(60), 0.9);
        index.insert(scope(1), unit(&[1.0, 0.0, 0.0]), Arc::from(&b"x"[..]));
        index.insert(scope(1), unit(&[0.9, 0.1, 0.0]), Arc::from(&b"y"[..]));
        let hit = index.lookup(&scope(1), &unit(&[0.92, 0.08, 0.0])).unwrap();
        assert_eq!(&*hit.answer, b"y");
        assert!(hit.similarity > 0.99);
        assert!(index.lookup(&scope(1), &unit(&[0.0, 1.0, 0.0])).is_none());
        assert!(index.lookup(&scope(2), &unit(&[1.0, 0.0, 0.0])).is_none());
    }

    #[test]
    fn entry_and_byte_bounds_hold_and_evicted_ids_leave_their_scope() {
        let index = SemanticIndex::new(10, 1 << 20, Duration::from_secs(60), 0.5);
        for i in 0..100u8 {
            index.insert(
                scope(i % 3),
                unit(&[1.0, f32::from(i)]),
                Arc::from(vec![i; 8]),
            );
        }
        assert!(index.len() <= 10, "{} entries", index.len());
        let ids: usize = lock(&index.scopes).values().map(VecDeque::len).sum();
        assert!(ids <= 10, "{ids} ids still indexed");

        let index = SemanticIndex::new(1000, 10_000, Duration::from_secs(60), 0.5);
        for i in 0..100u8 {
            index.insert(scope(0), unit(&[1.0, 1.0]), Arc::from(vec![i; 1000]));
        }
        assert!(index.bytes() <= 10_000, "{} bytes", index.bytes());
        assert!(index.len() < 100);
    }

    #[test]
    fn a_scope_keeps_its_newest_entries() {
        let index = SemanticIndex::new(100_000, 1 << 30, Duration::from_secs(60), 0.0);
        for i in 0..(MAX_PER_SCOPE + 10) {
            index.insert(scope(0), vec![1.0], Arc::from(i.to_string().as_bytes()));
        }
        assert_eq!(index.len(), MAX_PER_SCOPE as u64);
    }

    #[test]
    fn entries_expire() {
        let index = SemanticIndex::new(10, 1 << 20, Duration::from_millis(50), 0.5);
        index.insert(scope(0), vec![1.0], Arc::from(&b"a"[..]));
        assert!(index.lookup(&scope(0), &[1.0]).is_some());
        std::thread::sleep(Duration::from_millis(120));
        assert!(index.lookup(&scope(0), &[1.0]).is_none());
        assert_eq!(index.len(), 0);
        assert_eq!(index.scope_count(), 0);
    }
}
