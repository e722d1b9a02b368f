//! Tenant status: every [`WINDOW`] the operator reads the per-tenant series
//! of every ready agent's `/metrics` (`weir_tenant_*`, labelled
//! `namespace/name`), sums them over the agents, and writes each Tenant's
//! `keysLoaded` (the fewest any agent loaded) and its usage over the last
//! window (the counters' growth since the previous pass; an agent that
//! restarted counts from zero), with a `Ready` condition saying whether
//! keys are loaded. Runs only while this replica leads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch};
use serde_json::json;
use weir_crds::Tenant;

use super::Context;
use crate::{apply, scrape, world};

/// How often Tenant status is written, and the window its usage covers.
pub const WINDOW: Duration = Duration::from_secs(60);

/// One tenant's counters, summed over the agents.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TenantFigures {
    /// Requests admitted (any outcome).
    pub requests: f64,
    /// Prompt plus completion tokens.
    pub tokens: f64,
    /// Requests refused.
    pub rejections: f64,
    /// Keys loaded, the fewest over the agents that report the tenant.
    pub keys: Option<f64>,
}

/// Per-tenant counters from one agent's exposition.
pub fn parse(text: &str) -> BTreeMap<String, TenantFigures> {
    let mut out: BTreeMap<String, TenantFigures> = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("weir_tenant_")) {
        let Some((name, labels, value)) = scrape::parse_line(line) else {
            continue;
        };
        let Some(tenant) = labels.get("tenant") else {
            continue;
        };
        let f = out.entry((*tenant).to_owned()).or_default();
        match name {
            "weir_tenant_requests_total" => f.requests += value,
            "weir_tenant_prompt_tokens_total" | "weir_tenant_completion_tokens_total" => {
                f.tokens += value
            }
            "weir_tenant_rejections_total" => f.rejections += value,
            "weir_tenant_keys_loaded" => f.keys = Some(value),
            _ => {}
        }
    }
    out
}

/// Adds one agent's figures to `total`.
pub fn add(total: &mut BTreeMap<String, TenantFigures>, agent: BTreeMap<String, TenantFigures>) {
    for (tenant, f) in agent {
        let t = total.entry(tenant).or_default();
        t.requests += f.requests;
        t.tokens += f.tokens;
        t.rejections += f.rejections;
        t.keys = match (t.keys, f.keys) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// Growth from `before` to `now`; a counter that went down (an agent
/// restarted) counts what it holds now.
pub fn growth(now: &TenantFigures, before: Option<&TenantFigures>) -> TenantFigures {
    let grow = |n: f64, b: Option<f64>| match b {
        Some(b) if n >= b => n - b,
        _ => n,
    };
    TenantFigures {
        requests: grow(now.requests, before.map(|b| b.requests)),
        tokens: grow(now.tokens, before.map(|b| b.tokens)),
        rejections: grow(now.rejections, before.map(|b| b.rejections)),
        keys: now.keys,
    }
}

async fn totals(ctx: &Context) -> BTreeMap<String, TenantFigures> {
    let now = Timestamp::now();
    let endpoints: Vec<String> = ctx
        .caches
        .agents
        .state()
        .iter()
        .filter(|a| world::agent_ready(a, now, ctx.stale_after))
        .filter_map(|a| a.status.as_ref()?.endpoint.clone())
        .collect();
    let texts = futures::future::join_all(endpoints.iter().map(|e| async move {
        let r = ctx
            .http
            .get(format!("{e}/metrics"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())?;
        r.text().await.ok()
    }))
    .await;
    let mut total = BTreeMap::new();
    for text in texts.into_iter().flatten() {
        add(&mut total, parse(&text));
    }
    total
}

async fn write(ctx: &Context, tenant: &Tenant, usage: &TenantFigures) -> Result<(), kube::Error> {
    let ns = tenant.namespace().unwrap_or_default();
    let keys = usage.keys.unwrap_or(0.0) as u32;
    let (status, reason, message) = if keys > 0 {
        (
            "True",
            "KeysLoaded",
            format!("{keys} API key(s) loaded on every agent"),
        )
    } else {
        (
            "False",
            "NoKeysLoaded",
            "no agent has loaded an API key of this tenant (Secret missing or empty?)".to_owned(),
        )
    };
    let previous = tenant
        .status
        .as_ref()
        .and_then(|s| s.common.conditions.iter().find(|c| c.type_ == "Ready"));
    let since = match previous {
        Some(c) if c.status == status => c.last_transition_time.0,
        _ => Timestamp::now(),
    };
    let patch = json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "Tenant",
        "status": {
            "observedGeneration": tenant.metadata.generation,
            "keysLoaded": keys,
            "usage": {
                "windowSeconds": WINDOW.as_secs(),
                "requests": usage.requests as u64,
                "tokens": usage.tokens as u64,
                "rejections": usage.rejections as u64,
            },
            "conditions": [{
                "type": "Ready",
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since.to_string(),
                "observedGeneration": tenant.metadata.generation,
            }],
        },
    });
    let api: Api<Tenant> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(&tenant.name_any(), &apply::params(), &Patch::Apply(patch))
        .await?;
    Ok(())
}

/// Writes every Tenant's status each [`WINDOW`], for as long as the term
/// lasts.
pub async fn status_forever(ctx: Arc<Context>) {
    let mut before: BTreeMap<String, TenantFigures> = BTreeMap::new();
    let mut tick = tokio::time::interval(WINDOW);
    loop {
        tick.tick().await;
        let api: Api<Tenant> = Api::all(ctx.client.clone());
        let tenants = match api.list(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(e) => {
                tracing::debug!(error = %e, "listing Tenants");
                continue;
            }
        };
        let now = totals(&ctx).await;
        for tenant in &tenants {
            let key = format!(
                "{}/{}",
                tenant.namespace().unwrap_or_default(),
                tenant.name_any()
            );
            let current = now.get(&key).copied().unwrap_or_default();
            let usage = growth(&current, before.get(&key));
            let result = write(&ctx, tenant, &usage).await;
            ctx.metrics.record("Tenant", &result);
            if let Err(e) = result {
                tracing::warn!(tenant = %key, error = %e, "writing Tenant status");
            }
        }
        before = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = r#"# TYPE weir_tenant_requests counter
weir_tenant_requests_total{tenant="default/team",reason="success"} 40
weir_tenant_requests_total{tenant="default/team",reason="error"} 2
weir_tenant_prompt_tokens_total{tenant="default/team"} 300
weir_tenant_completion_tokens_total{tenant="default/team"} 100
weir_tenant_rejections_total{tenant="default/team",reason="requests"} 5
weir_tenant_keys_loaded{tenant="default/team"} 2
weir_tenant_limits_fallback 0
vllm:num_requests_waiting{model_name="m"} 1
"#;

    #[test]
    fn sums_over_agents_and_takes_the_fewest_keys() {
        let mut total = BTreeMap::new();
        add(&mut total, parse(AGENT));
        add(
            &mut total,
            parse(&AGENT.replace(
                "keys_loaded{tenant=\"default/team\"} 2",
                "keys_loaded{tenant=\"default/team\"} 1",
            )),
        );
        let t = total["default/team"];
        assert_eq!(t.requests, 84.0);
        assert_eq!(t.tokens, 800.0);
        assert_eq!(t.rejections, 10.0);
        assert_eq!(t.keys, Some(1.0));
        assert_eq!(total.len(), 1, "series without a tenant label are ignored");
    }

    #[test]
    fn usage_is_growth_and_survives_a_restart() {
        let before = TenantFigures {
            requests: 10.0,
            tokens: 100.0,
            rejections: 1.0,
            keys: Some(1.0),
        };
        let now = TenantFigures {
            requests: 25.0,
            tokens: 400.0,
            rejections: 1.0,
            keys: Some(1.0),
        };
        let g = growth(&now, Some(&before));
        assert_eq!((g.requests, g.tokens, g.rejections), (15.0, 300.0, 0.0));
        let restarted = TenantFigures {
            requests: 3.0,
            ..now
        };
        assert_eq!(growth(&restarted, Some(&before)).requests, 3.0);
        assert_eq!(growth(&now, None).requests, 25.0);
    }
}
