//! Popular queries: how often each cacheable request's key was asked for,
//! in a bounded table (at most four times the keys reported) whose counts
//! halve every [`HALF_LIFE`], so that what was popular long ago fades. The
//! smallest counts go first when the table is full.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::CacheKey;

/// Time for a count to halve.
pub const HALF_LIFE: Duration = Duration::from_secs(600);

/// The table.
#[derive(Debug)]
pub struct Popular {
    top: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    counts: HashMap<CacheKey, f64>,
    decayed: Instant,
}

impl Popular {
    /// A table reporting the `top` most asked keys.
    pub fn new(top: usize, now: Instant) -> Self {
        Self {
            top: top.max(1),
            state: Mutex::new(State {
                counts: HashMap::new(),
                decayed: now,
            }),
        }
    }

    /// Counts one request for `key` at `now`.
    pub fn touch(&self, key: CacheKey, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let halvings = now.saturating_duration_since(s.decayed).as_secs() / HALF_LIFE.as_secs();
        if halvings > 0 {
            let factor = 0.5f64.powi(halvings.min(64) as i32);
            s.counts.values_mut().for_each(|c| *c *= factor);
            s.counts.retain(|_, c| *c >= 0.01);
            s.decayed += HALF_LIFE * halvings as u32;
        }
        *s.counts.entry(key).or_default() += 1.0;
        let capacity = self.top * 4;
        if s.counts.len() > capacity {
            // Evict the least asked quarter at once (amortized).
            let mut all: Vec<(CacheKey, f64)> = s.counts.iter().map(|(k, c)| (*k, *c)).collect();
            all.sort_by(|a, b| a.1.total_cmp(&b.1));
            for (k, _) in all.iter().take(capacity / 4 + 1) {
                if *k != key {
                    s.counts.remove(k);
                }
            }
        }
    }

    /// The most asked keys with their counts, most asked first.
    pub fn top(&self) -> Vec<(CacheKey, f64)> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<(CacheKey, f64)> = s.counts.iter().map(|(k, c)| (*k, *c)).collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.0.cmp(&b.0.0)));
        all.truncate(self.top);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> CacheKey {
        CacheKey::from_canonical(&i.to_le_bytes())
    }

    #[test]
    fn the_most_asked_keys_rise_and_old_counts_fade() {
        let t0 = Instant::now();
        let p = Popular::new(2, t0);
        for _ in 0..5 {
            p.touch(key(1), t0);
        }
        for _ in 0..3 {
            p.touch(key(2), t0);
        }
        // Many keys asked once do not push the popular ones out.
        for i in 10..40 {
            p.touch(key(i), t0);
        }
        let top: Vec<CacheKey> = p.top().into_iter().map(|(k, _)| k).collect();
        assert_eq!(top, [key(1), key(2)]);
        // Long after, a newer key asked a few times leads.
        let later = t0 + HALF_LIFE * 4;
        for _ in 0..2 {
            p.touch(key(3), later);
        }
        assert_eq!(p.top()[0].0, key(3));
        assert!(p.top()[1].1 < 1.0, "old counts halved four times");
    }
}
