//! `Tenant`: who may call the OpenAI endpoint. API keys from Secrets (the
//! agent keeps only their SHA-256), the models a tenant may use, its rate
//! limits (counted in Redis so that they hold across replicas), the
//! priority classes it may ask for, and whether its cache entries may be
//! shared with other tenants. Status: keys loaded and recent usage, written
//! by the operator from what it scrapes from the agents.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{CommonStatus, PriorityClass, SecretKeyRef};

/// A caller of the OpenAI endpoint, its keys and its limits.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weir.dev",
    doc = "A caller of the OpenAI endpoint: API keys from Secrets, allowed models, rate limits, priority and cache sharing.",
    version = "v1alpha1",
    kind = "Tenant",
    namespaced,
    status = "TenantStatus",
    shortname = "wt",
    category = "weir",
    printcolumn = r#"{"name":"Keys","type":"integer","jsonPath":".status.keysLoaded"}"#,
    printcolumn = r#"{"name":"RPM","type":"integer","jsonPath":".spec.limits.requestsPerMinute"}"#,
    printcolumn = r#"{"name":"TPM","type":"integer","jsonPath":".spec.limits.tokensPerMinute"}"#,
    printcolumn = r#"{"name":"Requests","type":"integer","jsonPath":".status.usage.requests"}"#,
    printcolumn = r#"{"name":"Rejected","type":"integer","jsonPath":".status.usage.rejections"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// Secret keys, each holding one API key clients send as
    /// `Authorization: Bearer <key>`. A rotated Secret is picked up without
    /// a restart; several keys let an old and a new one overlap.
    #[schemars(length(min = 1, max = 32))]
    pub api_keys: Vec<SecretKeyRef>,
    /// Served model or ensemble names this tenant may use; `*` allows all.
    #[serde(default = "default_models")]
    #[schemars(length(min = 1, max = 256), inner(length(min = 1, max = 253)))]
    pub models: Vec<String>,
    /// Rate limits, shared by every agent (unset: unlimited).
    #[serde(default)]
    pub limits: TenantLimits,
    /// Priority classes this tenant's requests get and may ask for.
    #[serde(default)]
    pub priority: TenantPriority,
    /// Whether this tenant's requests may be answered from, and fill,
    /// response and semantic cache entries shared with other tenants that
    /// allow sharing too. By default an entry is the tenant's own.
    #[serde(default)]
    pub share_cache: bool,
}

/// Limits over a sliding minute and on requests at once; each unset
/// limit does not apply.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantLimits {
    /// Requests admitted in any minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000000))]
    pub requests_per_minute: Option<u64>,
    /// Prompt plus completion tokens in any minute: `prompt + max_tokens`
    /// is reserved at admission, what was not generated is given back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2000000000))]
    pub tokens_per_minute: Option<u64>,
    /// Requests running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub concurrent_requests: Option<u64>,
}

/// The tenant's priority classes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "{'Critical': 0, 'High': 1, 'Normal': 2, 'Low': 3, 'Background': 4}[self.default] >= {'Critical': 0, 'High': 1, 'Normal': 2, 'Low': 3, 'Background': 4}[self.max]", "message": "priority.default must not be above priority.max", "fieldPath": ".default"}
]))]
pub struct TenantPriority {
    /// The highest class its requests may ask for; a request asking
    /// higher is served at this class.
    #[serde(default)]
    pub max: PriorityClass,
    /// The class of its requests that ask for none.
    #[serde(default)]
    pub default: PriorityClass,
}

impl TenantPriority {
    /// The class a request asking for `asked` gets: the default when it
    /// asks none, never above `max`.
    pub fn effective(&self, asked: Option<PriorityClass>) -> PriorityClass {
        // Classes are ordered highest first: a smaller one is higher.
        asked.unwrap_or(self.default).max(self.max)
    }
}

fn default_models() -> Vec<String> {
    vec!["*".to_owned()]
}

impl TenantSpec {
    /// Whether this tenant may use the served name (or ensemble) `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }
}

/// Usage over the last window, summed over every agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantUsage {
    /// Seconds the window covers.
    #[serde(default)]
    pub window_seconds: u32,
    /// Requests admitted.
    #[serde(default)]
    pub requests: u64,
    /// Prompt and completion tokens.
    #[serde(default)]
    pub tokens: u64,
    /// Requests refused (rate limits, forbidden models).
    #[serde(default)]
    pub rejections: u64,
}

/// Observed state of a Tenant.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// Generation and conditions.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// API keys the agents have loaded (the fewest any agent reports).
    #[serde(default)]
    pub keys_loaded: u32,
    /// Usage over the last window.
    #[serde(default)]
    pub usage: TenantUsage,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_defaults_and_is_clamped_at_max() {
        let p = TenantPriority {
            max: PriorityClass::High,
            default: PriorityClass::Low,
        };
        assert_eq!(p.effective(None), PriorityClass::Low);
        assert_eq!(
            p.effective(Some(PriorityClass::Critical)),
            PriorityClass::High
        );
        assert_eq!(
            p.effective(Some(PriorityClass::Background)),
            PriorityClass::Background
        );
    }

    #[test]
    fn models_star_allows_everything() {
        let spec: TenantSpec =
            serde_json::from_str(r#"{"apiKeys": [{"name": "s", "key": "k"}]}"#).unwrap();
        assert!(spec.allows("anything"));
        let spec: TenantSpec =
            serde_json::from_str(r#"{"apiKeys": [{"name": "s", "key": "k"}], "models": ["tiny"]}"#)
                .unwrap();
        assert!(spec.allows("tiny") && !spec.allows("other"));
        assert!(!spec.share_cache);
    }
}
