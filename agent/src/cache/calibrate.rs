//! Calibration of the semantic cache's candidate threshold: the policy
//! states the precision it wants (`targetPrecision`), and the threshold is
//! the lowest one, within `minThreshold..=maxThreshold`, at which the
//! observed evidence says served hits reach it.
//!
//! Evidence, kept per served model in buckets of 0.01 similarity:
//!
//! * verifier verdicts on candidates: `passed` and `vetoed` — also for
//!   candidates between `minThreshold` and the current threshold, which
//!   are checked by the rules but never served ("shadow" checks);
//! * `served` hits, and `refuted` ones: a served hit whose question comes
//!   back in the same scope with `Cache-Control: no-cache` within ten
//!   minutes (the client did not trust it).
//!
//! Estimate: where the verifier vetoes, it also lets some wrong candidates
//! through: `leak × vetoed` per bucket, with `leak` the larger of the
//! policy's floor ([`CalibrationSpec::leak`]; one wrong pass per twenty
//! vetoes for the rules) and `(refuted + 1) / (vetoed + 4)` over all
//! buckets; a bucket's wrong count is the larger of that and its
//! refutations. At threshold `t`
//! the precision is `1 − (wrong + 1) / (passed + 1)` over the buckets at or
//! above `t` — so at least `1 / (1 − target)` passes are needed before a
//! threshold qualifies. The threshold is the lowest observed bucket that
//! qualifies; with enough passes but none qualifying it is
//! `maxThreshold`; with fewer passes than the target needs it stays at the
//! policy's `threshold`.
//!
//! Caveats: refutations are under-reported (most clients never re-ask), so
//! the verifier's vetoes carry most of the signal; counts are halved when
//! they pass 20,000 so old traffic fades. With `calibrate: false` the
//! threshold is fixed at the policy's `threshold`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::CacheKey;

const BUCKETS: usize = 101;
const DECAY_AT: f64 = 20_000.0;
const REFUTE_WINDOW: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Default)]
struct Bucket {
    passed: f64,
    vetoed: f64,
    refuted: f64,
}

/// The calibration settings of a policy.
#[derive(Clone, Copy, Debug)]
pub struct CalibrationSpec {
    /// Whether the threshold moves at all.
    pub enabled: bool,
    /// The threshold before there is evidence (and always when disabled).
    pub start: f32,
    /// Lowest threshold.
    pub min: f32,
    /// Highest threshold.
    pub max: f32,
    /// Wanted precision of served hits.
    pub target: f64,
    /// Wrong candidates the verifier is assumed to pass per one it vetoes,
    /// at least.
    pub leak: f64,
}

/// The evidence and the threshold it gives, for one served model.
pub struct Calibrator {
    spec: CalibrationSpec,
    buckets: Mutex<[Bucket; BUCKETS]>,
    threshold: AtomicU32,
    precision: AtomicU32,
    recent_hits: moka::sync::Cache<CacheKey, f32>,
}

fn bucket_of(similarity: f32) -> usize {
    ((similarity.clamp(0.0, 1.0) * 100.0).floor() as usize).min(BUCKETS - 1)
}

impl Calibrator {
    /// A calibrator starting at `spec.start`.
    pub fn new(spec: CalibrationSpec) -> Self {
        Self {
            spec,
            buckets: Mutex::new([Bucket::default(); BUCKETS]),
            threshold: AtomicU32::new(spec.start.to_bits()),
            precision: AtomicU32::new(f32::NAN.to_bits()),
            recent_hits: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(REFUTE_WINDOW)
                .build(),
        }
    }

    /// The similarity a candidate needs to be served now.
    pub fn threshold(&self) -> f32 {
        f32::from_bits(self.threshold.load(Ordering::Relaxed))
    }

    /// The estimated precision of served hits at the current threshold
    /// (NaN before there is evidence).
    pub fn estimated_precision(&self) -> f32 {
        f32::from_bits(self.precision.load(Ordering::Relaxed))
    }

    /// The lowest similarity worth verifying: `minThreshold` when
    /// calibrating (shadow checks below the threshold), else the threshold.
    pub fn floor(&self) -> f32 {
        if self.spec.enabled {
            self.spec.min.min(self.threshold())
        } else {
            self.threshold()
        }
    }

    /// Records the verifier's verdict on a candidate.
    pub fn candidate(&self, similarity: f32, vetoed: bool) {
        self.update(similarity, |b| {
            if vetoed {
                b.vetoed += 1.0;
            } else {
                b.passed += 1.0;
            }
        });
    }

    /// Records a served hit for the question `key` (scope and text).
    pub fn served(&self, similarity: f32, key: CacheKey) {
        self.recent_hits.insert(key, similarity);
    }

    /// A question asked with `no-cache`: if it was answered by a semantic
    /// hit lately, that hit counts as wrong. Returns whether it did.
    pub fn refuted(&self, key: &CacheKey) -> bool {
        let Some(similarity) = self.recent_hits.remove(key) else {
            return false;
        };
        self.update(similarity, |b| b.refuted += 1.0);
        true
    }

    fn update(&self, similarity: f32, change: impl FnOnce(&mut Bucket)) {
        if !self.spec.enabled {
            return;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut buckets[bucket_of(similarity)]);
        let total: f64 = buckets.iter().map(|b| b.passed + b.vetoed).sum();
        if total > DECAY_AT {
            for b in buckets.iter_mut() {
                b.passed /= 2.0;
                b.vetoed /= 2.0;
                b.refuted /= 2.0;
            }
        }
        let (threshold, precision) = choose(&buckets, &self.spec);
        self.threshold.store(threshold.to_bits(), Ordering::Relaxed);
        self.precision.store(precision.to_bits(), Ordering::Relaxed);
    }
}

/// The threshold the evidence supports, and its estimated precision.
fn choose(buckets: &[Bucket; BUCKETS], spec: &CalibrationSpec) -> (f32, f32) {
    let refuted: f64 = buckets.iter().map(|b| b.refuted).sum();
    let vetoed: f64 = buckets.iter().map(|b| b.vetoed).sum();
    let leak = spec.leak.max((refuted + 1.0) / (vetoed + 4.0));
    let (lo, hi) = (bucket_of(spec.min), bucket_of(spec.max));
    // Precision over buckets k..: from the top down, summing as we go.
    let mut passed = 0.0;
    let mut wrong = 0.0;
    let mut best = None;
    let mut top_precision = None;
    for k in (lo..BUCKETS).rev() {
        let b = buckets[k];
        passed += b.passed;
        wrong += b.refuted.max(leak * b.vetoed);
        if k > hi {
            continue;
        }
        let precision = 1.0 - (wrong + 1.0) / (passed + 1.0);
        top_precision.get_or_insert(precision);
        let observed = b.passed + b.vetoed > 0.0;
        if observed && precision >= spec.target {
            best = Some((k, precision));
        }
    }
    // Below this many passes no threshold can show the target precision.
    let enough = 1.0 / (1.0 - spec.target).max(1e-6) - 1.0;
    let precision = |p: f64| p.clamp(0.0, 1.0) as f32;
    match (best, passed >= enough) {
        (Some((k, p)), _) => ((k as f32 / 100.0).max(spec.min), precision(p)),
        (None, true) => (spec.max, precision(top_precision.unwrap_or(0.0))),
        (None, false) => (spec.start, f32::NAN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CalibrationSpec {
        CalibrationSpec {
            enabled: true,
            start: 0.90,
            min: 0.80,
            max: 0.98,
            target: 0.99,
            leak: 0.25,
        }
    }

    fn key(n: u32) -> CacheKey {
        CacheKey::from_canonical(&n.to_le_bytes())
    }

    #[test]
    fn without_evidence_the_threshold_is_the_policys() {
        let c = Calibrator::new(spec());
        assert_eq!(c.threshold(), 0.90);
        assert!(c.estimated_precision().is_nan());
        assert_eq!(c.floor(), 0.80);
        for _ in 0..20 {
            c.candidate(0.95, true);
        }
        assert_eq!(c.threshold(), 0.90, "vetoes, but too few passes to judge");
        for _ in 0..200 {
            c.candidate(0.95, false);
        }
        assert_eq!(
            c.threshold(),
            0.98,
            "enough passes, too many vetoes among them"
        );
        assert!(c.estimated_precision() < 0.99);
    }

    #[test]
    fn clean_evidence_lowers_the_threshold_to_where_vetoes_begin() {
        let c = Calibrator::new(spec());
        // Plenty of passes from 0.80 up; below 0.86 the verifier vetoes
        // often, so the estimated leaks there cost precision.
        for i in 0..2000 {
            let s = 0.80 + (i % 19) as f32 / 100.0;
            c.candidate(s, s < 0.86 && i % 2 == 0);
        }
        let t = c.threshold();
        assert!((0.85..=0.90).contains(&t), "{t}");
        assert!(c.estimated_precision() >= 0.99);
    }

    #[test]
    fn refuted_hits_raise_the_threshold_and_bounds_hold() {
        let c = Calibrator::new(spec());
        for i in 0..3000 {
            c.candidate(0.80 + (i % 19) as f32 / 100.0, false);
        }
        let before = c.threshold();
        assert_eq!(before, 0.80);
        for n in 0..60 {
            c.served(0.93, key(n));
            assert!(c.refuted(&key(n)));
            assert!(!c.refuted(&key(n)), "a hit is refuted once");
        }
        let after = c.threshold();
        assert!(after > 0.93, "{after}");
        assert!(after <= 0.98);
        assert!(!c.refuted(&key(999)), "never served");
    }

    #[test]
    fn disabled_calibration_never_moves() {
        let c = Calibrator::new(CalibrationSpec {
            enabled: false,
            ..spec()
        });
        for _ in 0..5000 {
            c.candidate(0.81, false);
        }
        assert_eq!(c.threshold(), 0.90);
        assert_eq!(c.floor(), 0.90);
    }
}
