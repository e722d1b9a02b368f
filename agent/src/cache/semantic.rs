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
//!
//! The index only proposes: [`SemanticIndex::candidates`] returns the
//! nearest entries at or above a floor, with their question texts, for the
//! verifier (`cache/verify`) to accept or veto; the threshold a candidate
//! must reach to be served comes from the index's [`Calibrator`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weir_crds::cache_policy::SemanticCacheSpec;
use weir_engine::backend::cpu::dot;

use super::calibrate::{CalibrationSpec, Calibrator};
use super::{CacheError, CacheKey, parse_bytes};

/// Most entries one scope keeps (a lookup compares against all of them).
pub const MAX_PER_SCOPE: usize = 4096;

struct Entry {
    scope: CacheKey,
    question: Arc<str>,
    answer: Arc<[u8]>,
    /// Bytes the vector takes in its scope (for the weigher).
    vector_bytes: usize,
}

/// One scope's vectors, packed back to back so a lookup is one pass over
/// contiguous memory; `ids[i]` owns `vectors[i * dim..][..dim]`.
#[derive(Default)]
struct Scope {
    dim: usize,
    ids: Vec<u64>,
    vectors: Vec<f32>,
}

impl Scope {
    fn remove(&mut self, id: u64) {
        if let Some(i) = self.ids.iter().position(|x| *x == id) {
            self.remove_at(i);
        }
    }

    fn remove_at(&mut self, i: usize) {
        let last = self.ids.len() - 1;
        self.ids.swap_remove(i);
        if i != last {
            let (head, tail) = self.vectors.split_at_mut(last * self.dim);
            head[i * self.dim..][..self.dim].copy_from_slice(&tail[..self.dim]);
        }
        self.vectors.truncate(last * self.dim);
    }

    /// Ids and similarities of the `k` closest vectors at or above
    /// `floor`, closest first.
    fn top(&self, question: &[f32], floor: f32, k: usize) -> Vec<(u64, f32)> {
        if question.len() != self.dim {
            return Vec::new();
        }
        let mut found: Vec<(u64, f32)> = Vec::with_capacity(k + 1);
        for (v, id) in self.vectors.chunks_exact(self.dim).zip(&self.ids) {
            let s = dot(v, question);
            if s < floor || (found.len() == k && s <= found[k - 1].1) {
                continue;
            }
            let at = found.partition_point(|(_, t)| *t >= s);
            found.insert(at, (*id, s));
            found.truncate(k);
        }
        found
    }

    fn best(&self, question: &[f32], threshold: f32) -> Option<(u64, f32)> {
        self.top(question, threshold, 1).first().copied()
    }
}

type Scopes = Arc<Mutex<HashMap<CacheKey, Scope>>>;

/// Vectors and answers by scope, bounded by entries, bytes and age.
pub struct SemanticIndex {
    entries: moka::sync::Cache<u64, Arc<Entry>>,
    scopes: Scopes,
    next_id: AtomicU64,
    calibrator: Calibrator,
}

/// A stored answer near the question: a candidate for the verifier, or the
/// hit it accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct SemanticHit {
    /// Cosine similarity to the question.
    pub similarity: f32,
    /// The question the answer was stored for.
    pub question: Arc<str>,
    /// The stored answer.
    pub answer: Arc<[u8]>,
}

fn lock(scopes: &Scopes) -> std::sync::MutexGuard<'_, HashMap<CacheKey, Scope>> {
    scopes.lock().unwrap_or_else(|p| p.into_inner())
}

impl SemanticIndex {
    /// An index of at most `max_entries` entries and `max_bytes` bytes,
    /// each living `ttl`; a hit needs cosine similarity ≥ `threshold`
    /// (fixed: no calibration).
    pub fn new(max_entries: u64, max_bytes: u64, ttl: Duration, threshold: f32) -> Self {
        let fixed = CalibrationSpec {
            enabled: false,
            start: threshold,
            min: threshold,
            max: threshold,
            target: 1.0,
            leak: 1.0,
        };
        Self::with_calibration(max_entries, max_bytes, ttl, fixed)
    }

    /// As [`SemanticIndex::new`], with the threshold calibrated by `spec`.
    pub fn with_calibration(
        max_entries: u64,
        max_bytes: u64,
        ttl: Duration,
        spec: CalibrationSpec,
    ) -> Self {
        let floor = (max_bytes / max_entries.max(1)).max(1);
        let scopes: Scopes = Arc::default();
        let on_evict = scopes.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes.max(1))
            .time_to_live(ttl)
            .weigher(move |_id: &u64, e: &Arc<Entry>| {
                let size = (e.vector_bytes + e.question.len() + e.answer.len() + 64) as u64;
                u32::try_from(size.max(floor)).unwrap_or(u32::MAX)
            })
            .eviction_listener(move |id: Arc<u64>, entry: Arc<Entry>, _cause| {
                let mut scopes = lock(&on_evict);
                if let Some(scope) = scopes.get_mut(&entry.scope) {
                    scope.remove(*id);
                    if scope.ids.is_empty() {
                        scopes.remove(&entry.scope);
                    }
                }
            })
            .build();
        Self {
            entries,
            scopes,
            next_id: AtomicU64::new(0),
            calibrator: Calibrator::new(spec),
        }
    }

    /// The threshold, its evidence and the record of served hits.
    pub fn calibrator(&self) -> &Calibrator {
        &self.calibrator
    }

    /// The closest answer in `scope` to the unit vector `question`, if it
    /// reaches the threshold (no verification).
    pub fn lookup(&self, scope: &CacheKey, question: &[f32]) -> Option<SemanticHit> {
        // Release the lock before `get`: the eviction listener takes it and
        // may run inside moka's calls.
        let (id, similarity) = lock(&self.scopes)
            .get(scope)?
            .best(question, self.calibrator.threshold())?;
        self.hit(id, similarity)
    }

    /// The `k` closest entries in `scope` to the unit vector `question` at
    /// or above `floor`, closest first.
    pub fn candidates(
        &self,
        scope: &CacheKey,
        question: &[f32],
        floor: f32,
        k: usize,
    ) -> Vec<SemanticHit> {
        let found = match lock(&self.scopes).get(scope) {
            Some(s) => s.top(question, floor, k),
            None => return Vec::new(),
        };
        found
            .into_iter()
            .filter_map(|(id, similarity)| self.hit(id, similarity))
            .collect()
    }

    fn hit(&self, id: u64, similarity: f32) -> Option<SemanticHit> {
        let entry = self.entries.get(&id)?;
        Some(SemanticHit {
            similarity,
            question: entry.question.clone(),
            answer: entry.answer.clone(),
        })
    }

    /// Stores `answer` for `text`, whose unit vector is `question`, in
    /// `scope`.
    pub fn insert(&self, scope: CacheKey, text: Arc<str>, question: Vec<f32>, answer: Arc<[u8]>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            scope,
            question: text,
            answer,
            vector_bytes: question.len() * 4,
        });
        let dropped = {
            let mut scopes = lock(&self.scopes);
            let s = scopes.entry(scope).or_insert_with(|| Scope {
                dim: question.len(),
                ..Scope::default()
            });
            if s.dim != question.len() {
                return;
            }
            s.ids.push(id);
            s.vectors.extend_from_slice(&question);
            // Over the per-scope bound: the oldest (smallest id) goes.
            (s.ids.len() > MAX_PER_SCOPE)
                .then(|| {
                    let (i, &old) = s.ids.iter().enumerate().min_by_key(|(_, id)| **id)?;
                    s.remove_at(i);
                    Some(old)
                })
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

/// The index a policy asks for, if it enables the semantic cache.
pub fn build_index(spec: &SemanticCacheSpec) -> Result<Option<Arc<SemanticIndex>>, CacheError> {
    if !spec.enabled {
        return Ok(None);
    }
    let bytes = parse_bytes(&spec.max_bytes.0).map_err(|e| e.at("semanticCache.maxBytes"))?;
    Ok(Some(Arc::new(SemanticIndex::with_calibration(
        spec.max_entries,
        bytes,
        Duration::from_secs(u64::from(spec.ttl_seconds)),
        calibration(spec),
    ))))
}

/// The calibration a policy asks for. The leak floor is how many wrong
/// candidates the verifier is assumed to pass per one it vetoes: 0.05 for
/// the rules (about three times what they leave on the project's
/// benchmark: 2 wrong passes per ~120 vetoes), 0.02 with a model (a guess
/// until a real verifier model is measured).
fn calibration(spec: &SemanticCacheSpec) -> CalibrationSpec {
    use weir_crds::cache_policy::SemanticVerify;
    CalibrationSpec {
        enabled: spec.calibrate,
        start: spec.threshold as f32,
        min: spec.min_threshold as f32,
        max: spec.max_threshold as f32,
        target: spec.target_precision,
        leak: match spec.verify {
            SemanticVerify::Off | SemanticVerify::Rules => 0.05,
            SemanticVerify::Model | SemanticVerify::RulesThenModel => 0.02,
        },
    }
}

/// What to store once the answer is complete.
pub struct SemanticFill {
    index: Arc<SemanticIndex>,
    scope: CacheKey,
    text: Arc<str>,
    vector: Vec<f32>,
}

impl SemanticFill {
    /// A fill of `index` under `scope` for the question `text` and its
    /// `vector`.
    pub fn new(
        index: Arc<SemanticIndex>,
        scope: CacheKey,
        text: Arc<str>,
        vector: Vec<f32>,
    ) -> Self {
        Self {
            index,
            scope,
            text,
            vector,
        }
    }

    /// Stores `answer` for the question.
    pub fn store(&self, answer: Arc<[u8]>) {
        self.index
            .insert(self.scope, self.text.clone(), self.vector.clone(), answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = dot(v, v).sqrt();
        v.iter().map(|x| x / n).collect()
    }

    fn q() -> Arc<str> {
        Arc::from("a question")
    }

    fn scope(n: u8) -> CacheKey {
        CacheKey::from_canonical(&[n])
    }

    #[test]
    fn nearest_entry_above_threshold_answers_only_in_its_scope() {
        let index = SemanticIndex::new(100, 1 << 20, Duration::from_secs(60), 0.9);
        index.insert(scope(1), q(), unit(&[1.0, 0.0, 0.0]), Arc::from(&b"x"[..]));
        index.insert(scope(1), q(), unit(&[0.9, 0.1, 0.0]), Arc::from(&b"y"[..]));
        let hit = index.lookup(&scope(1), &unit(&[0.92, 0.08, 0.0])).unwrap();
        assert_eq!(&*hit.answer, b"y");
        assert!(hit.similarity > 0.99);
        assert!(index.lookup(&scope(1), &unit(&[0.0, 1.0, 0.0])).is_none());
        assert!(index.lookup(&scope(2), &unit(&[1.0, 0.0, 0.0])).is_none());
    }

    #[test]
    fn candidates_are_the_closest_above_the_floor_with_their_questions() {
        let index = SemanticIndex::new(100, 1 << 20, Duration::from_secs(60), 0.99);
        for (i, x) in [1.0f32, 0.9, 0.5, 0.8, 0.0].iter().enumerate() {
            let text: Arc<str> = Arc::from(format!("q{i}"));
            index.insert(scope(1), text, unit(&[1.0, *x]), Arc::from(&b"a"[..]));
        }
        let question = unit(&[1.0, 0.8]);
        let found = index.candidates(&scope(1), &question, 0.9, 3);
        let names: Vec<&str> = found.iter().map(|c| &*c.question).collect();
        assert_eq!(names, ["q3", "q1", "q0"]);
        assert!(found.windows(2).all(|w| w[0].similarity >= w[1].similarity));
        assert!(found.iter().all(|c| c.similarity >= 0.9));
        assert!(
            index
                .lookup(&scope(1), &question)
                .is_some_and(|h| &*h.question == "q3")
        );
        assert!(index.candidates(&scope(2), &question, 0.0, 3).is_empty());
    }

    #[test]
    fn entry_and_byte_bounds_hold_and_evicted_ids_leave_their_scope() {
        let index = SemanticIndex::new(10, 1 << 20, Duration::from_secs(60), 0.5);
        for i in 0..100u8 {
            index.insert(
                scope(i % 3),
                q(),
                unit(&[1.0, f32::from(i)]),
                Arc::from(vec![i; 8]),
            );
        }
        assert!(index.len() <= 10, "{} entries", index.len());
        let ids: usize = lock(&index.scopes).values().map(|s| s.ids.len()).sum();
        assert!(ids <= 10, "{ids} ids still indexed");

        let index = SemanticIndex::new(1000, 10_000, Duration::from_secs(60), 0.5);
        for i in 0..100u8 {
            index.insert(scope(0), q(), unit(&[1.0, 1.0]), Arc::from(vec![i; 1000]));
        }
        assert!(index.bytes() <= 10_000, "{} bytes", index.bytes());
        assert!(index.len() < 100);
    }

    #[test]
    fn a_scope_keeps_its_newest_entries() {
        let index = SemanticIndex::new(100_000, 1 << 30, Duration::from_secs(60), 0.0);
        for i in 0..(MAX_PER_SCOPE + 10) {
            index.insert(
                scope(0),
                q(),
                vec![1.0],
                Arc::from(i.to_string().as_bytes()),
            );
        }
        assert_eq!(index.len(), MAX_PER_SCOPE as u64);
    }

    #[test]
    fn removing_a_vector_keeps_the_others_with_their_ids() {
        let mut scope = Scope {
            dim: 2,
            ..Scope::default()
        };
        for (id, v) in [(1, [1.0, 0.0]), (2, [0.0, 1.0]), (3, [0.6, 0.8])] {
            scope.ids.push(id);
            scope.vectors.extend_from_slice(&v);
        }
        scope.remove(1);
        assert_eq!(scope.best(&[1.0, 0.0], 0.5), Some((3, 0.6)));
        assert_eq!(scope.best(&[0.0, 1.0], 0.9), Some((2, 1.0)));
        scope.remove(3);
        scope.remove(2);
        assert!(scope.ids.is_empty() && scope.vectors.is_empty());
        assert_eq!(scope.best(&[1.0], 0.0), None, "wrong width");
    }

    #[test]
    fn entries_expire() {
        let index = SemanticIndex::new(10, 1 << 20, Duration::from_millis(50), 0.5);
        index.insert(scope(0), q(), vec![1.0], Arc::from(&b"a"[..]));
        assert!(index.lookup(&scope(0), &[1.0]).is_some());
        std::thread::sleep(Duration::from_millis(120));
        assert!(index.lookup(&scope(0), &[1.0]).is_none());
        assert_eq!(index.len(), 0);
        assert_eq!(index.scope_count(), 0);
    }
}
