//! The Redis tier (L2): one connection manager, every call under the
//! policy's timeout, a circuit breaker in front, zstd above a size, and
//! write-through or bounded write-behind.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use tokio::sync::{Mutex, mpsc};
use weir_crds::cache_policy::{RedisCacheSpec, WriteMode};

use super::{CacheKey, CacheStats, MAX_VALUE_BYTES, count, decode, encode};
use crate::breaker::{BreakerState, CircuitBreaker};

/// Failures in a row that open the breaker.
const BREAKER_FAILURES: u32 = 3;
/// How long an open breaker skips Redis.
const BREAKER_OPEN: Duration = Duration::from_secs(5);

struct Inner {
    spec: RedisCacheSpec,
    url: String,
    conn: Mutex<Option<ConnectionManager>>,
    breaker: CircuitBreaker,
    stats: Arc<CacheStats>,
}

/// The shared Redis cache.
pub struct RedisTier {
    inner: Arc<Inner>,
    write_behind: Option<mpsc::Sender<(CacheKey, Arc<[u8]>)>>,
}

impl Inner {
    fn timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.spec.timeout_ms))
    }

    fn redis_key(&self, key: &CacheKey) -> String {
        format!("{}{}", self.spec.key_prefix, key.hex())
    }

    /// A connection, connecting under the timeout if needed; `None` while
    /// the breaker is open or Redis cannot be reached.
    async fn connection(&self) -> Option<ConnectionManager> {
        self.breaker.allow(Instant::now()).ok()?;
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Some(conn.clone());
        }
        let client = match redis::Client::open(self.url.as_str()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "invalid Redis URL; L2 disabled");
                self.failed(false);
                return None;
            }
        };
        match tokio::time::timeout(self.timeout(), ConnectionManager::new(client)).await {
            Ok(Ok(conn)) => {
                *slot = Some(conn.clone());
                Some(conn)
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "connecting to Redis");
                self.failed(false);
                None
            }
            Err(_) => {
                self.failed(true);
                None
            }
        }
    }

    fn failed(&self, timeout: bool) {
        count(&self.stats, timeout);
        self.breaker.record(false, Instant::now());
    }

    async fn get(&self, key: &CacheKey) -> Option<Vec<u8>> {
        let mut conn = self.connection().await?;
        let call = conn.get::<_, Option<Vec<u8>>>(self.redis_key(key));
        match tokio::time::timeout(self.timeout(), call).await {
            Ok(Ok(found)) => {
                self.breaker.record(true, Instant::now());
                found.and_then(|stored| decode(&stored, MAX_VALUE_BYTES))
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "Redis GET");
                self.failed(false);
                None
            }
            Err(_) => {
                self.failed(true);
                None
            }
        }
    }

    async fn set(&self, key: &CacheKey, value: &[u8]) {
        let Some(mut conn) = self.connection().await else {
            return;
        };
        let stored = encode(value, self.spec.compress_above_bytes as usize);
        let call = conn.set_ex::<_, _, ()>(
            self.redis_key(key),
            stored,
            u64::from(self.spec.ttl_seconds),
        );
        match tokio::time::timeout(self.timeout(), call).await {
            Ok(Ok(())) => {
                self.breaker.record(true, Instant::now());
                self.stats.l2_writes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "Redis SET");
                self.failed(false);
            }
            Err(_) => self.failed(true),
        }
    }
}

impl Inner {
    fn popular_key(&self) -> String {
        format!("{}popular", self.spec.key_prefix)
    }

    /// Replaces the stored popular keys with `top` (hex keys and counts).
    async fn store_popular(&self, top: &[(CacheKey, f64)]) {
        let Some(mut conn) = self.connection().await else {
            return;
        };
        let set = self.popular_key();
        let mut pipe = redis::pipe();
        pipe.atomic().del(&set).ignore();
        for (key, count) in top {
            pipe.zadd(&set, key.hex(), *count).ignore();
        }
        pipe.expire(&set, i64::from(self.spec.ttl_seconds)).ignore();
        match tokio::time::timeout(self.timeout(), pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => self.breaker.record(true, Instant::now()),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "Redis popular keys");
                self.failed(false);
            }
            Err(_) => self.failed(true),
        }
    }

    /// The stored popular keys, most asked first (at most `limit`).
    async fn load_popular(&self, limit: usize) -> Vec<CacheKey> {
        let Some(mut conn) = self.connection().await else {
            return Vec::new();
        };
        let stop = limit.max(1) as isize - 1;
        let call = conn.zrevrange::<_, Vec<String>>(self.popular_key(), 0, stop);
        match tokio::time::timeout(self.timeout(), call).await {
            Ok(Ok(keys)) => {
                self.breaker.record(true, Instant::now());
                keys.iter().filter_map(|k| CacheKey::from_hex(k)).collect()
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "Redis popular keys");
                self.failed(false);
                Vec::new()
            }
            Err(_) => {
                self.failed(true);
                Vec::new()
            }
        }
    }
}

impl RedisTier {
    /// Stores the most asked keys (for agents that warm on start).
    pub async fn store_popular(&self, top: &[(CacheKey, f64)]) {
        self.inner.store_popular(top).await;
    }

    /// The most asked keys stored by any agent, most asked first.
    pub async fn load_popular(&self, limit: usize) -> Vec<CacheKey> {
        self.inner.load_popular(limit).await
    }

    /// A tier for `spec` at `url`; connects lazily (a down Redis at start is
    /// retried once the breaker lets a probe through).
    pub fn new(spec: RedisCacheSpec, url: String, stats: Arc<CacheStats>) -> Self {
        let write_mode = spec.write_mode;
        let queue = spec.write_behind_queue.max(1) as usize;
        let inner = Arc::new(Inner {
            spec,
            url,
            conn: Mutex::new(None),
            breaker: CircuitBreaker::new(BREAKER_FAILURES, BREAKER_OPEN, true),
            stats,
        });
        let write_behind = (write_mode == WriteMode::WriteBehind).then(|| {
            let (tx, mut rx) = mpsc::channel::<(CacheKey, Arc<[u8]>)>(queue);
            let worker = inner.clone();
            tokio::spawn(async move {
                while let Some((key, value)) = rx.recv().await {
                    worker.set(&key, &value).await;
                }
            });
            tx
        });
        Self {
            inner,
            write_behind,
        }
    }

    /// The breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// The value under `key`, or `None` (miss, error, timeout, open breaker).
    pub async fn get(&self, key: &CacheKey) -> Option<Vec<u8>> {
        self.inner.get(key).await
    }

    /// Writes through, or queues for the write-behind task (dropping and
    /// counting when the queue is full).
    pub async fn put(&self, key: CacheKey, value: Arc<[u8]>) {
        match &self.write_behind {
            None => self.inner.set(&key, &value).await,
            Some(tx) => {
                if tx.try_send((key, value)).is_err() {
                    self.inner
                        .stats
                        .write_behind_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
