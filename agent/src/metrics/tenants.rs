//! Per-tenant figures under a `tenant` label: requests by outcome, prompt
//! and completion tokens, cache hits, rejections by reason, keys loaded,
//! and whether the limits are counted locally because Redis failed. A
//! label value is only ever a configured Tenant's name (requests without a
//! tenant make no series), so the series are bounded by the Tenant objects.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A tenant.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    /// The Tenant's name.
    pub tenant: String,
}

/// A tenant and a reason or outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantReason {
    /// The Tenant's name.
    pub tenant: String,
    /// `success`/`error`, or the refusing limit (`requests`, `tokens`,
    /// `concurrency`, `model_not_allowed`).
    pub reason: String,
}

/// The per-tenant families.
#[derive(Clone, Default)]
pub struct TenantMetrics {
    /// Requests admitted, by outcome (`success`, `error`).
    pub requests: Family<TenantReason, Counter>,
    /// Prompt tokens of finished requests.
    pub prompt_tokens: Family<TenantLabel, Counter>,
    /// Completion tokens of finished requests.
    pub completion_tokens: Family<TenantLabel, Counter>,
    /// Answers from the response or semantic cache, or shared in flight.
    pub cache_hits: Family<TenantLabel, Counter>,
    /// Requests refused, by reason.
    pub rejections: Family<TenantReason, Counter>,
    /// API keys loaded.
    pub keys_loaded: Family<TenantLabel, Gauge>,
    /// 1 while limits are counted locally because Redis failed.
    pub fallback: Gauge<i64, AtomicI64>,
}

impl TenantMetrics {
    /// Registers every family in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weir_tenant_requests",
            "Tenant requests admitted, by outcome",
            self.requests.clone(),
        );
        registry.register(
            "weir_tenant_prompt_tokens",
            "Prompt tokens of a tenant's finished requests",
            self.prompt_tokens.clone(),
        );
        registry.register(
            "weir_tenant_completion_tokens",
            "Completion tokens of a tenant's finished requests",
            self.completion_tokens.clone(),
        );
        registry.register(
            "weir_tenant_cache_hits",
            "Tenant requests answered from a cache or shared in flight",
            self.cache_hits.clone(),
        );
        registry.register(
            "weir_tenant_rejections",
            "Tenant requests refused, by reason",
            self.rejections.clone(),
        );
        registry.register(
            "weir_tenant_keys_loaded",
            "API keys loaded per tenant",
            self.keys_loaded.clone(),
        );
        registry.register(
            "weir_tenant_limits_fallback",
            "1 while tenant limits are counted locally (Redis unreachable)",
            self.fallback.clone(),
        );
    }

    /// Counts a refusal of `tenant` for `reason`.
    pub fn reject(&self, tenant: &str, reason: &str) {
        self.rejections
            .get_or_create(&TenantReason {
                tenant: tenant.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Sets the keys loaded of each tenant (dropping series of tenants no
    /// longer configured).
    pub fn set_keys(&self, tenants: &[(String, usize)]) {
        self.keys_loaded.clear();
        for (tenant, n) in tenants {
            self.keys_loaded
                .get_or_create(&TenantLabel {
                    tenant: tenant.clone(),
                })
                .set(*n as i64);
        }
    }
}
