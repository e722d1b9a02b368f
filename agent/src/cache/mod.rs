//! The response cache: an in-process L1 (`moka`, bounded by bytes and TTL)
//! in front of a shared Redis L2.
//!
//! Guarantees: a cache problem never fails a request — every Redis call,
//! the connect included, runs under the policy's timeout, errors count as
//! misses, and a circuit breaker stops calling a Redis that keeps failing
//! until a probe succeeds; L1 never holds more than its byte bound;
//! write-behind writes go through a bounded queue and are dropped (and
//! counted) when it is full. Assumption: keys are digests of everything
//! that changes the output (see [`CacheKey`]); values are opaque bytes.

pub mod calibrate;
pub mod popular;
pub mod redis_tier;
pub mod semantic;
pub mod verify;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use weir_crds::cache_policy::ResponseCacheSpec;

use redis_tier::RedisTier;

/// Digest of a canonical request: model, prompt token ids and every
/// parameter that changes the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// The key of `canonical`.
    pub fn from_canonical(canonical: &[u8]) -> Self {
        Self(Sha256::digest(canonical).into())
    }

    /// Lowercase hex.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The key whose [`Self::hex`] is `hex`.
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }
}

/// Which tier answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// In process.
    L1,
    /// Redis.
    L2,
}

impl Tier {
    /// Metric label and `x-weir-cache` header value.
    pub fn label(self) -> &'static str {
        match self {
            Tier::L1 => "l1",
            Tier::L2 => "l2",
        }
    }
}

/// Counters of the cache, read by `/metrics`.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Redis errors (connection, command).
    pub l2_errors: AtomicU64,
    /// Redis calls that ran past the timeout.
    pub l2_timeouts: AtomicU64,
    /// Writes dropped because the write-behind queue was full.
    pub write_behind_dropped: AtomicU64,
    /// Values written to Redis.
    pub l2_writes: AtomicU64,
    /// Entries put into L1 by warming at start.
    pub warmed: AtomicU64,
    /// L1 hits on warmed entries.
    pub warmed_hits: AtomicU64,
}

/// Errors configuring the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A quantity in the policy cannot be read.
    #[error("`{0}` is not a byte quantity (e.g. 256Mi)")]
    Quantity(String),
    /// A field of the policy is wrong.
    #[error("{field}: {source}")]
    Field {
        /// The field's path in the CachePolicy spec.
        field: &'static str,
        /// What is wrong.
        source: Box<CacheError>,
    },
}

impl CacheError {
    /// This error, located at a field of the policy.
    pub fn at(self, field: &'static str) -> Self {
        Self::Field {
            field,
            source: Box::new(self),
        }
    }
}

/// Bytes of a Kubernetes quantity (`256Mi`, `1G`, `1048576`).
pub fn parse_bytes(quantity: &str) -> Result<u64, CacheError> {
    let q = quantity.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| CacheError::Quantity(q.to_owned()))?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        _ => return Err(CacheError::Quantity(q.to_owned())),
    };
    Ok((value * factor) as u64)
}

/// How often an agent stores its most asked keys in Redis.
pub const POPULAR_STORE_EVERY: Duration = Duration::from_secs(30);

/// L1 plus optional L2, with the most asked keys counted (and kept in L2
/// for agents that warm their L1 at start).
pub struct ResponseCache {
    l1: moka::future::Cache<CacheKey, Arc<[u8]>>,
    l2: Option<Arc<RedisTier>>,
    stats: Arc<CacheStats>,
    popular: popular::Popular,
    warmed: std::sync::Mutex<std::collections::HashSet<CacheKey>>,
}

impl ResponseCache {
    /// A cache per `spec`; `redis_url` enables L2 (its Secret already read).
    pub fn new(spec: &ResponseCacheSpec, redis_url: Option<String>) -> Result<Self, CacheError> {
        let max_bytes =
            parse_bytes(&spec.l1.max_bytes.0).map_err(|e| e.at("responseCache.l1.maxBytes"))?;
        // Both bounds in one weight: an entry weighs its bytes, but at least
        // `max_bytes / max_entries`, so the bytes stay under `max_bytes` and
        // the entries under `max_entries`.
        let floor = u32::try_from(max_bytes.div_ceil(spec.l1.max_entries.max(1)))
            .unwrap_or(u32::MAX)
            .max(1);
        let capacity = max_bytes.min(u64::from(floor) * spec.l1.max_entries.max(1));
        let l1 = moka::future::Cache::builder()
            .max_capacity(capacity)
            .weigher(move |_: &CacheKey, v: &Arc<[u8]>| {
                u32::try_from(v.len() + 32).unwrap_or(u32::MAX).max(floor)
            })
            .time_to_live(Duration::from_secs(u64::from(spec.l1.ttl_seconds)))
            .build();
        let stats = Arc::new(CacheStats::default());
        let l2 = match (&spec.l2, redis_url) {
            (Some(l2), Some(url)) => Some(Arc::new(RedisTier::new(l2.clone(), url, stats.clone()))),
            _ => None,
        };
        Ok(Self {
            l1,
            l2,
            stats,
            popular: popular::Popular::new(spec.popular_keys as usize, std::time::Instant::now()),
            warmed: std::sync::Mutex::default(),
        })
    }

    /// Stores the most asked keys in L2 (no-op without L2).
    pub async fn store_popular(&self) {
        if let Some(l2) = &self.l2 {
            l2.store_popular(&self.popular.top()).await;
        }
    }

    /// Fills L1 from L2 with the answers of the most asked keys any agent
    /// stored (at most `limit`); how many were put in.
    pub async fn warm(&self, limit: usize) -> usize {
        let Some(l2) = &self.l2 else { return 0 };
        let mut warmed = 0;
        for key in l2.load_popular(limit).await {
            if let Some(value) = l2.get(&key).await {
                self.l1.insert(key, value.into()).await;
                self.warmed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key);
                warmed += 1;
            }
        }
        self.stats
            .warmed
            .fetch_add(warmed as u64, Ordering::Relaxed);
        warmed
    }

    /// Starts the background work of a cache: warming L1 once when
    /// `warm_on_start`, and storing the most asked keys in L2 every
    /// [`POPULAR_STORE_EVERY`]; both end with the cache.
    pub fn start(self: &Arc<Self>, spec: &ResponseCacheSpec) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.l2.is_none() {
            return;
        }
        let (weak, warm, limit) = (Arc::downgrade(self), spec.warm_on_start, spec.popular_keys);
        runtime.spawn(async move {
            if warm && let Some(cache) = weak.upgrade() {
                let n = cache.warm(limit as usize).await;
                tracing::info!(entries = n, "response cache warmed from Redis");
            }
            let mut tick = tokio::time::interval(POPULAR_STORE_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(cache) = weak.upgrade() else { return };
                cache.store_popular().await;
            }
        });
    }

    /// Counters.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// The L2 breaker state (0 closed, 1 open, 2 half-open), if L2 is on.
    pub fn l2_breaker(&self) -> Option<u8> {
        self.l2.as_ref().map(|l2| l2.breaker_state() as u8)
    }

    /// L1, then L2 (an L2 hit is copied into L1); counts the key as asked.
    pub async fn get(&self, key: &CacheKey) -> Option<(Tier, Arc<[u8]>)> {
        self.popular.touch(*key, std::time::Instant::now());
        if let Some(v) = self.l1.get(key).await {
            let warm = self
                .warmed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(key);
            if warm {
                self.stats.warmed_hits.fetch_add(1, Ordering::Relaxed);
            }
            return Some((Tier::L1, v));
        }
        let l2 = self.l2.as_ref()?;
        let value: Arc<[u8]> = l2.get(key).await?.into();
        self.l1.insert(*key, value.clone()).await;
        Some((Tier::L2, value))
    }

    /// Stores a value in L1 and (per the write mode) L2.
    pub async fn put(&self, key: CacheKey, value: Arc<[u8]>) {
        self.l1.insert(key, value.clone()).await;
        if let Some(l2) = &self.l2 {
            l2.put(key, value).await;
        }
    }

    /// Entries in L1 (approximate; for tests and metrics).
    pub async fn l1_len(&self) -> u64 {
        self.l1.run_pending_tasks().await;
        self.l1.entry_count()
    }
}

/// A stored value's L2 encoding: a tag byte, then raw or zstd data.
pub fn encode(value: &[u8], compress_above: usize) -> Vec<u8> {
    if value.len() > compress_above
        && let Ok(packed) = zstd::bulk::compress(value, 3)
    {
        let mut out = Vec::with_capacity(packed.len() + 1);
        out.push(1);
        out.extend(packed);
        return out;
    }
    let mut out = Vec::with_capacity(value.len() + 1);
    out.push(0);
    out.extend_from_slice(value);
    out
}

/// Inverse of [`encode`]; `None` for an unknown tag or corrupt data.
pub fn decode(stored: &[u8], limit: usize) -> Option<Vec<u8>> {
    match stored.split_first()? {
        (0, rest) => Some(rest.to_vec()),
        (1, rest) => zstd::bulk::decompress(rest, limit).ok(),
        _ => None,
    }
}

/// Stored values larger than this are refused when read back.
pub const MAX_VALUE_BYTES: usize = 64 << 20;

/// Counts a Redis outcome.
fn count(stats: &CacheStats, timeout: bool) {
    let counter = if timeout {
        &stats.l2_timeouts
    } else {
        &stats.l2_errors
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_and_encoding() {
        assert_eq!(parse_bytes("256Mi").unwrap(), 256 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("lots").is_err());
        let small = b"hello".to_vec();
        assert_eq!(encode(&small, 1024)[0], 0);
        let big = vec![b'x'; 10_000];
        let packed = encode(&big, 1024);
        assert_eq!(packed[0], 1);
        assert!(packed.len() < 1000);
        assert_eq!(decode(&packed, MAX_VALUE_BYTES).unwrap(), big);
        assert_eq!(
            decode(&encode(&small, 1024), MAX_VALUE_BYTES).unwrap(),
            small
        );
        assert_eq!(decode(&[9, 1, 2], MAX_VALUE_BYTES), None);
    }

    #[tokio::test]
    async fn l1_is_bounded_by_bytes() {
        let mut spec = ResponseCacheSpec::default();
        spec.l1.max_bytes = k8s_openapi::apimachinery::pkg::api::resource::Quantity("10Ki".into());
        let cache = ResponseCache::new(&spec, None).unwrap();
        for i in 0..100u32 {
            cache
                .put(
                    CacheKey::from_canonical(&i.to_le_bytes()),
                    vec![0u8; 1000].into(),
                )
                .await;
        }
        let n = cache.l1_len().await;
        assert!(n <= 10, "{n} entries of 1 kB in a 10 KiB cache");
        let last = CacheKey::from_canonical(&99u32.to_le_bytes());
        assert!(matches!(cache.get(&last).await, Some((Tier::L1, _))) || n < 10);
    }

    #[tokio::test]
    async fn l1_is_bounded_by_entries_too() {
        let mut spec = ResponseCacheSpec::default();
        spec.l1.max_entries = 5;
        let cache = ResponseCache::new(&spec, None).unwrap();
        for i in 0..50u32 {
            cache
                .put(
                    CacheKey::from_canonical(&i.to_le_bytes()),
                    vec![1u8; 10].into(),
                )
                .await;
        }
        let n = cache.l1_len().await;
        assert!((1..=5).contains(&n), "{n} entries with maxEntries 5");
    }
}
