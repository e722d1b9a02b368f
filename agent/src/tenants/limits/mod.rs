//! Tenant limits that hold across replicas: requests and tokens per
//! sliding minute and requests at once, counted in Redis by one Lua script
//! per admission (`limits.lua`) and one at the end (`release.lua`), so that
//! every agent shares one count.
//!
//! Guarantees and caveats:
//! * With Redis reachable, admissions are exact across agents (Redis's
//!   clock decides the minute; the script runs atomically).
//! * `prompt + max_tokens` is reserved at admission; when the request ends
//!   the unused part goes back to the second it was taken from (lost if
//!   that second has left the window, which only ever under-admits).
//! * A running slot lives [`SLOT_TTL`] unless released, so an agent that
//!   crashes leaks its slots for at most that long.
//! * When Redis fails (error, [`REDIS_TIMEOUT`], or its breaker open) the
//!   agent counts locally against `limit / replicas` (replicas: this agent
//!   and the ready peers it knows, at least 1): never unbounded, and never
//!   a failed request because Redis is down. The switch is logged once
//!   per transition and shown by `weir_tenant_limits_fallback`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weir_crds::tenant::TenantLimits;

use super::window::{Reading, Window};
use shared::RedisCounter;

mod shared;

/// Time limit of one Redis call; a slower one counts locally.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a running slot survives without its release.
pub const SLOT_TTL: Duration = Duration::from_secs(600);

/// Which limit refused a request (the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
    /// Requests at once.
    Concurrency,
}

impl Reason {
    /// The metric label and the word in the message.
    pub fn label(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
            Self::Concurrency => "concurrency",
        }
    }
}

/// The state of a tenant's windows after an admission decision, for the
/// `x-ratelimit-*` headers (only the limits the tenant has).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Requests per minute.
    pub requests: Option<Reading>,
    /// Tokens per minute.
    pub tokens: Option<Reading>,
}

impl Usage {
    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(r) = self.requests {
            out.push(("x-ratelimit-limit-requests", r.limit.to_string()));
            out.push(("x-ratelimit-remaining-requests", r.remaining.to_string()));
            out.push(("x-ratelimit-reset-requests", duration_text(r.reset)));
        }
        if let Some(r) = self.tokens {
            out.push(("x-ratelimit-limit-tokens", r.limit.to_string()));
            out.push(("x-ratelimit-remaining-tokens", r.remaining.to_string()));
            out.push(("x-ratelimit-reset-tokens", duration_text(r.reset)));
        }
        out
    }
}

/// A reset time as OpenAI writes it: `1m30s`, `6s`, `250ms`.
pub fn duration_text(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (m, s) = (ms / 60_000, (ms % 60_000) as f64 / 1000.0);
    let s = format!("{s:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// A refusal: which limit, when to retry, and the windows' state.
#[derive(Debug, Clone)]
pub struct Refused {
    /// The limit that refused.
    pub reason: Reason,
    /// When a retry may pass.
    pub retry_after: Duration,
    /// The windows.
    pub usage: Usage,
}

/// Where an admission was counted, to release it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    Redis,
    Local,
}

/// An admitted request's hold on its tenant's limits; released (tokens not
/// used given back, the running slot freed) by [`Grant::finish`] or when
/// dropped.
pub struct Grant {
    limiter: Arc<Inner>,
    tenant: Arc<str>,
    limits: TenantLimits,
    id: u64,
    second: u64,
    reserved: u64,
    used: Option<u64>,
    counted: Counted,
    /// The windows after this admission.
    pub usage: Usage,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("tenant", &self.tenant)
            .field("reserved", &self.reserved)
            .field("usage", &self.usage)
            .finish_non_exhaustive()
    }
}

impl Grant {
    /// The tenant it was admitted for.
    pub fn tenant(&self) -> &Arc<str> {
        &self.tenant
    }

    /// Records that the request used `tokens` (prompt plus completion); the
    /// rest of the reservation goes back when the grant is dropped.
    pub fn finish(&mut self, tokens: u64) {
        self.used = Some(tokens.min(self.reserved));
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        // A request that ends without a count (cancelled, failed) keeps its
        // whole reservation: it may have used it.
        let refund = self.used.map_or(0, |u| self.reserved - u);
        let release = Release {
            tenant: self.tenant.clone(),
            id: self.id,
            second: self.second,
            refund: if self.limits.tokens_per_minute.is_some() {
                refund
            } else {
                0
            },
            concurrent: self.limits.concurrent_requests.is_some(),
        };
        match self.counted {
            Counted::Local => self.limiter.release_local(&release),
            Counted::Redis => {
                let inner = self.limiter.clone();
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(async move {
                        if let Some(redis) = &inner.redis {
                            redis.release(&release, &inner.slot(release.id)).await;
                        }
                    });
                }
            }
        }
    }
}

struct Release {
    tenant: Arc<str>,
    id: u64,
    second: u64,
    refund: u64,
    concurrent: bool,
}

#[derive(Default)]
struct LocalState {
    requests: Window,
    tokens: Window,
    running: u64,
}

struct Inner {
    redis: Option<RedisCounter>,
    local: Mutex<HashMap<Arc<str>, LocalState>>,
    fallback: AtomicBool,
    next_id: AtomicU64,
    agent: u64,
}

/// Counts tenants' requests, tokens and running requests: in Redis when
/// it has a URL and Redis answers, else locally.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new(None, "weir:")
    }
}

impl Limiter {
    /// A limiter counting in Redis at `url` (keys under `prefix`), or only
    /// locally without one.
    pub fn new(url: Option<String>, prefix: &str) -> Self {
        let redis = url.map(|url| RedisCounter::new(url, prefix));
        let agent = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 32;
        Self {
            inner: Arc::new(Inner {
                redis,
                local: Mutex::default(),
                fallback: AtomicBool::new(false),
                next_id: AtomicU64::new(0),
                agent,
            }),
        }
    }

    /// Whether limits are counted locally now because Redis failed.
    pub fn in_fallback(&self) -> bool {
        self.inner.fallback.load(Ordering::Relaxed)
    }

    /// Admits one request of `tenant` reserving `tokens`, or says which
    /// limit refused it. `replicas` (at least 1) divides the limits when
    /// counting locally.
    pub async fn admit(
        &self,
        tenant: &Arc<str>,
        limits: &TenantLimits,
        tokens: u64,
        replicas: usize,
    ) -> Result<Grant, Refused> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let grant = |second, counted, usage| Grant {
            limiter: self.inner.clone(),
            tenant: tenant.clone(),
            limits: limits.clone(),
            id,
            second,
            reserved: tokens,
            used: None,
            counted,
            usage,
        };
        if let Some(redis) = &self.inner.redis {
            let slot = self.inner.slot(id);
            match redis.admit(tenant, limits, tokens, &slot).await {
                Ok(Ok((second, usage))) => {
                    self.inner.set_fallback(false);
                    return Ok(grant(second, Counted::Redis, usage));
                }
                Ok(Err(refused)) => {
                    self.inner.set_fallback(false);
                    return Err(refused);
                }
                Err(why) => self.inner.set_fallback_because(true, &why),
            }
        }
        let (second, usage) = self
            .inner
            .admit_local(tenant, limits, tokens, replicas.max(1))?;
        Ok(grant(second, Counted::Local, usage))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Inner {
    /// The id of a request's running slot, unique across agents.
    fn slot(&self, id: u64) -> String {
        format!("{:x}-{id:x}", self.agent)
    }

    fn set_fallback(&self, on: bool) {
        self.set_fallback_because(on, "");
    }

    fn set_fallback_because(&self, on: bool, why: &str) {
        if self.fallback.swap(on, Ordering::Relaxed) != on {
            if on {
                tracing::warn!(error = %why, "tenant limits: Redis unreachable; counting locally (limit / replicas)");
            } else {
                tracing::info!("tenant limits: Redis reachable again; counting in Redis");
            }
        }
    }

    fn admit_local(
        &self,
        tenant: &Arc<str>,
        limits: &TenantLimits,
        tokens: u64,
        replicas: usize,
    ) -> Result<(u64, Usage), Refused> {
        let share = |limit: u64| (limit / replicas as u64).max(1);
        let now = now_ms();
        let mut all = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let state = all.entry(tenant.clone()).or_default();
        let mut usage = Usage::default();
        let mut refusal = None;
        if let Some(limit) = limits.requests_per_minute.map(share) {
            match state.requests.check(now, limit, 1) {
                Ok(r) => usage.requests = Some(r),
                Err(wait) => {
                    let used = state.requests.used(now);
                    usage.requests = Some(state.requests.reading(now, limit, used));
                    refusal = Some((Reason::Requests, wait));
                }
            }
        }
        if let Some(limit) = limits.tokens_per_minute.map(share) {
            match state.tokens.check(now, limit, tokens) {
                Ok(r) => usage.tokens = Some(r),
                Err(wait) => {
                    let used = state.tokens.used(now);
                    usage.tokens = Some(state.tokens.reading(now, limit, used));
                    refusal = refusal.or(Some((Reason::Tokens, wait)));
                }
            }
        }
        if let Some(limit) = limits.concurrent_requests.map(share)
            && state.running >= limit
        {
            refusal = refusal.or(Some((Reason::Concurrency, Duration::from_secs(1))));
        }
        if let Some((reason, retry_after)) = refusal {
            return Err(Refused {
                reason,
                retry_after,
                usage,
            });
        }
        state.requests.add(now, 1);
        state.tokens.add(now, tokens);
        state.running += 1;
        Ok((now / 1000, usage))
    }

    fn release_local(&self, release: &Release) {
        let mut all = self.local.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = all.get_mut(&release.tenant) {
            state.running = state.running.saturating_sub(1);
            state.tokens.refund(release.second, release.refund);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rpm: Option<u64>, tpm: Option<u64>, conc: Option<u64>) -> TenantLimits {
        TenantLimits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            concurrent_requests: conc,
        }
    }

    #[tokio::test]
    async fn local_limits_divide_by_replicas_and_release() {
        let limiter = Limiter::default();
        let t: Arc<str> = "team".into();
        let l = limits(Some(60), None, Some(4));
        // Three replicas: 20 requests a minute and 1 at once here.
        let first = limiter.admit(&t, &l, 10, 3).await.unwrap();
        let busy = limiter.admit(&t, &l, 10, 3).await.unwrap_err();
        assert_eq!(busy.reason, Reason::Concurrency);
        drop(first);
        let mut admitted = 1;
        while let Ok(g) = limiter.admit(&t, &l, 10, 3).await {
            admitted += 1;
            drop(g);
        }
        assert_eq!(admitted, 20);
        let refused = limiter.admit(&t, &l, 10, 3).await.unwrap_err();
        assert_eq!(refused.reason, Reason::Requests);
        assert!(refused.retry_after > Duration::from_secs(58));
        assert_eq!(refused.usage.requests.unwrap().remaining, 0);
        assert!(!limiter.in_fallback(), "no Redis configured is no fallback");
    }

    #[tokio::test]
    async fn tokens_come_back_when_a_request_used_fewer() {
        let limiter = Limiter::default();
        let t: Arc<str> = "team".into();
        let l = limits(None, Some(100), None);
        let mut g = limiter.admit(&t, &l, 80, 1).await.unwrap();
        assert_eq!(g.usage.tokens.unwrap().remaining, 20);
        assert_eq!(
            limiter.admit(&t, &l, 30, 1).await.unwrap_err().reason,
            Reason::Tokens
        );
        g.finish(30);
        drop(g);
        let g = limiter.admit(&t, &l, 50, 1).await.unwrap();
        assert_eq!(g.usage.tokens.unwrap().remaining, 20);
        // Cancelled without a count: the whole reservation stays used.
        drop(g);
        assert!(limiter.admit(&t, &l, 30, 1).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn unreachable_redis_falls_back_within_the_timeout() {
        // A listener that never answers: each call hits the timeout.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://{}", silent.local_addr().unwrap());
        let limiter = Limiter::new(Some(url), "weir:");
        let t: Arc<str> = "team".into();
        let l = limits(Some(4), None, None);
        let started = tokio::time::Instant::now();
        let g = limiter.admit(&t, &l, 1, 2).await.unwrap();
        assert!(started.elapsed() <= REDIS_TIMEOUT * 2);
        assert!(limiter.in_fallback());
        assert_eq!(g.usage.requests.unwrap().limit, 2, "4 / 2 replicas");
        drop(g);
        assert!(limiter.admit(&t, &l, 1, 2).await.is_ok());
        assert!(limiter.admit(&t, &l, 1, 2).await.is_err(), "bounded");
    }

    #[test]
    fn reset_times_read_as_openai_writes_them() {
        assert_eq!(duration_text(Duration::from_millis(250)), "250ms");
        assert_eq!(duration_text(Duration::from_millis(6000)), "6s");
        assert_eq!(duration_text(Duration::from_millis(90_500)), "1m30.5s");
    }
}
