//! The shared count in Redis of the tenant limits: one connection manager, every call
//! under [`REDIS_TIMEOUT`], a breaker in front, and the two scripts
//! (`limits.lua` at admission, `release.lua` at the end).

use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use weir_crds::tenant::TenantLimits;

use super::{REDIS_TIMEOUT, Reason, Refused, Release, SLOT_TTL, Usage};
use crate::breaker::CircuitBreaker;
use crate::tenants::window::Reading;

/// Failures in a row that open the breaker in front of Redis.
const BREAKER_FAILURES: u32 = 3;
/// How long an open breaker counts locally without trying Redis.
const BREAKER_OPEN: Duration = Duration::from_secs(2);

/// The shared count in Redis: one connection, a breaker in front.
pub(super) struct RedisCounter {
    url: String,
    prefix: String,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    breaker: CircuitBreaker,
    admit: redis::Script,
    release: redis::Script,
}

impl RedisCounter {
    /// A counter at `url`, keys under `prefix`; connects lazily.
    pub(super) fn new(url: String, prefix: &str) -> Self {
        Self {
            url,
            prefix: prefix.to_owned(),
            conn: tokio::sync::Mutex::new(None),
            breaker: CircuitBreaker::new(BREAKER_FAILURES, BREAKER_OPEN, true),
            admit: redis::Script::new(include_str!("limits.lua")),
            release: redis::Script::new(include_str!("release.lua")),
        }
    }

    /// Keys of a tenant's counters: one hash tag, so that a Redis cluster
    /// keeps them in one slot.
    fn keys(&self, tenant: &str) -> [String; 3] {
        let base = format!("{}limits:{{{tenant}}}", self.prefix);
        [
            format!("{base}:requests"),
            format!("{base}:tokens"),
            format!("{base}:running"),
        ]
    }

    async fn connection(&self) -> Result<ConnectionManager, String> {
        self.breaker
            .allow(Instant::now())
            .map_err(|_| "breaker open".to_owned())?;
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let client = redis::Client::open(self.url.as_str()).map_err(|e| e.to_string())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(0);
        match tokio::time::timeout(
            REDIS_TIMEOUT,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        {
            Ok(Ok(conn)) => {
                *slot = Some(conn.clone());
                Ok(conn)
            }
            Ok(Err(e)) => {
                self.breaker.record(false, Instant::now());
                Err(e.to_string())
            }
            Err(_) => {
                self.breaker.record(false, Instant::now());
                Err("connect timed out".into())
            }
        }
    }

    /// `Ok(decision)` when Redis answered, `Err(why)` when it did not.
    pub(super) async fn admit(
        &self,
        tenant: &str,
        limits: &TenantLimits,
        tokens: u64,
        slot: &str,
    ) -> Result<Result<(u64, Usage), Refused>, String> {
        let mut conn = self.connection().await?;
        let [requests, tokens_key, running] = self.keys(tenant);
        let mut call = self.admit.key(requests);
        call.key(tokens_key)
            .key(running)
            .arg(limits.requests_per_minute.unwrap_or(0))
            .arg(limits.tokens_per_minute.unwrap_or(0))
            .arg(limits.concurrent_requests.unwrap_or(0))
            .arg(tokens)
            .arg(slot)
            .arg(SLOT_TTL.as_millis() as u64);
        let answer: Result<Result<Vec<i64>, _>, _> =
            tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async(&mut conn)).await;
        let v = match answer {
            Ok(Ok(v)) if v.len() == 8 => v,
            Ok(Ok(v)) => return Err(format!("the script answered {v:?}")),
            Ok(Err(e)) => {
                self.breaker.record(false, Instant::now());
                return Err(e.to_string());
            }
            Err(_) => {
                self.breaker.record(false, Instant::now());
                return Err("timed out".into());
            }
        };
        self.breaker.record(true, Instant::now());
        Ok(decision(limits, &v))
    }

    pub(super) async fn release(&self, release: &Release, slot: &str) {
        if release.refund == 0 && !release.concurrent {
            return;
        }
        let Ok(mut conn) = self.connection().await else {
            return;
        };
        let [_, tokens, running] = self.keys(&release.tenant);
        let mut call = self.release.key(tokens);
        call.key(running)
            .arg(release.second)
            .arg(release.refund)
            .arg(slot);
        match tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(_)) => self.breaker.record(true, Instant::now()),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "tenant limits: release");
                self.breaker.record(false, Instant::now());
            }
            Err(_) => self.breaker.record(false, Instant::now()),
        }
    }
}

/// The script's answer as a decision (see `limits.lua` for the layout).
fn decision(limits: &TenantLimits, v: &[i64]) -> Result<(u64, Usage), Refused> {
    let ms = |x: i64| Duration::from_millis(x.max(0) as u64);
    let reading = |limit: Option<u64>, used: i64, reset: i64| {
        limit.map(|limit| Reading {
            limit,
            remaining: limit.saturating_sub(used.max(0) as u64),
            reset: ms(reset),
        })
    };
    let usage = Usage {
        requests: reading(limits.requests_per_minute, v[2], v[3]),
        tokens: reading(limits.tokens_per_minute, v[4], v[5]),
    };
    let reason = match v[1] {
        1 => Reason::Requests,
        2 => Reason::Tokens,
        3 => Reason::Concurrency,
        _ => return Ok((v[7].max(0) as u64, usage)),
    };
    Err(Refused {
        reason,
        retry_after: ms(v[6]),
        usage,
    })
}
