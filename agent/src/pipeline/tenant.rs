//! The tenant step: the caller's tenant (named in [`TENANT_HEADER`] by the
//! HTTP layer once its key checked out), whether it may use the model it
//! names (403 `model_not_allowed`), its priority classes, and its limits
//! (429 `rate_limit_exceeded` with `Retry-After`). An admitted request holds
//! a [`Grant`] as long as its events stream; when it ends, the tokens it
//! did not use go back and its running slot is freed.

use std::sync::Arc;

use futures::stream::{self, StreamExt};
use http::HeaderMap;
use weir_crds::PriorityClass;

use super::Context;
use crate::api::ApiError;
use crate::generate::{GenEvent, GenStream, Job};
use crate::metrics::tenants::{TenantLabel, TenantMetrics, TenantReason};
use crate::tenants::limits::Grant;
use crate::tenants::{TENANT_HEADER, Tenant};

/// The tenant the request was authenticated as, if any.
pub fn caller(ctx: &Context<'_>, headers: &HeaderMap) -> Option<Arc<Tenant>> {
    let name = headers.get(TENANT_HEADER)?.to_str().ok()?;
    ctx.tenants.by_name(name)
}

/// Refuses `model` (a served name or an ensemble) when `tenant` may not
/// use it.
pub fn check_model(ctx: &Context<'_>, tenant: &Tenant, model: &str) -> Result<(), ApiError> {
    if tenant.spec.allows(model) {
        return Ok(());
    }
    ctx.metrics
        .tenants
        .reject(&tenant.name, "model_not_allowed");
    Err(ApiError::Forbidden(format!(
        "this API key may not use the model `{model}`"
    )))
}

#[derive(serde::Deserialize)]
struct ModelOnly {
    model: String,
}

/// The `model` a request body names (a served name or an ensemble), if it
/// parses that far (a body that does not is refused by the next step).
pub fn model_named(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<ModelOnly>(body)
        .ok()
        .map(|m| m.model)
}

#[derive(serde::Deserialize)]
struct PriorityOnly {
    priority: Option<String>,
}

/// The class a tenant's job runs at: the tenant's default when the request
/// asks for none (body `priority`, else `x-weir-priority`), and never above
/// the tenant's highest (a request asking higher is served at it).
pub fn apply_priority(tenant: &Tenant, body: &[u8], headers: &HeaderMap, job: &mut Job) {
    let asked = serde_json::from_slice::<PriorityOnly>(body)
        .ok()
        .and_then(|p| p.priority)
        .or_else(|| {
            headers
                .get("x-weir-priority")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .and_then(|p| class(&p));
    let class = tenant.spec.priority.effective(asked);
    job.template.priority = crate::admission::engine_priority(class);
}

fn class(name: &str) -> Option<PriorityClass> {
    Some(match name.to_ascii_lowercase().as_str() {
        "critical" => PriorityClass::Critical,
        "high" => PriorityClass::High,
        "normal" | "default" => PriorityClass::Normal,
        "low" => PriorityClass::Low,
        "background" | "batch" => PriorityClass::Background,
        _ => return None,
    })
}

/// Tokens a job reserves: every prompt's tokens and its room to answer.
pub fn reservation(job: &Job) -> u64 {
    let prompt: usize = job.prompts.iter().map(Vec::len).sum();
    let answers = job.template.max_tokens * job.n * job.prompts.len();
    (prompt + answers) as u64
}

/// Admits `job` under `tenant`'s limits.
pub async fn admit(ctx: &Context<'_>, tenant: &Tenant, job: &Job) -> Result<Grant, ApiError> {
    let replicas = 1 + ctx.peers.ready_count();
    let limits = &tenant.spec.limits;
    let admitted = ctx
        .limiter
        .admit(&tenant.name, limits, reservation(job), replicas)
        .await;
    ctx.metrics
        .tenants
        .fallback
        .set(i64::from(ctx.limiter.in_fallback()));
    admitted.map_err(|refused| {
        let what = refused.reason.label();
        ctx.metrics.tenants.reject(&tenant.name, what);
        let limit = match refused.reason {
            crate::tenants::limits::Reason::Requests => limits.requests_per_minute,
            crate::tenants::limits::Reason::Tokens => limits.tokens_per_minute,
            crate::tenants::limits::Reason::Concurrency => limits.concurrent_requests,
        };
        let per = if what == "concurrency" {
            "at once"
        } else {
            "per minute"
        };
        ApiError::RateLimited {
            message: format!(
                "rate limit reached for tenant `{}`: {} {what} {per}; retry after {:.1} s",
                tenant.name,
                limit.unwrap_or(0),
                refused.retry_after.as_secs_f64()
            ),
            retry_after: refused.retry_after,
            headers: refused.usage.headers(),
        }
    })
}

/// Counts an answer from a cache (or shared in flight) for `tenant`.
pub fn count_hit(metrics: &TenantMetrics, tenant: &Tenant, headers: &[(&'static str, String)]) {
    let hit = headers.iter().any(|(name, value)| {
        (*name == super::CACHE_HEADER && value != "miss") || *name == super::COALESCED_HEADER
    });
    if hit {
        metrics
            .cache_hits
            .get_or_create(&TenantLabel {
                tenant: tenant.name.to_string(),
            })
            .inc();
    }
}

/// `events`, holding `grant` until they end: the tokens used are recorded
/// from the final usage (the rest is given back), and the outcome and
/// tokens are counted for the tenant.
pub fn hold(events: GenStream, grant: Grant, metrics: TenantMetrics) -> GenStream {
    Box::pin(stream::unfold(
        Some((events, grant, metrics)),
        |state| async move {
            let (mut events, mut grant, metrics) = state?;
            let event = events.next().await?;
            let tenant = grant.tenant().to_string();
            let outcome = |reason: &str| TenantReason {
                tenant: tenant.clone(),
                reason: reason.to_owned(),
            };
            match &event {
                GenEvent::Done { usage } => {
                    grant.finish((usage.prompt_tokens + usage.completion_tokens) as u64);
                    let label = TenantLabel {
                        tenant: tenant.clone(),
                    };
                    metrics
                        .prompt_tokens
                        .get_or_create(&label)
                        .inc_by(usage.prompt_tokens as u64);
                    metrics
                        .completion_tokens
                        .get_or_create(&label)
                        .inc_by(usage.completion_tokens as u64);
                    metrics.requests.get_or_create(&outcome("success")).inc();
                    return Some((event, None));
                }
                GenEvent::Error { .. } => {
                    metrics.requests.get_or_create(&outcome("error")).inc();
                    return Some((event, None));
                }
                _ => {}
            }
            Some((event, Some((events, grant, metrics))))
        },
    ))
}
