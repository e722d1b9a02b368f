//! `ModelEnsemble`: one public model name spread over member Models or
//! external OpenAI-compatible endpoints, with weights the operator adjusts
//! from measured latency and errors.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{CommonStatus, LocalRef, SecretKeyRef};

/// One public model name served by several members.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weir.dev",
    doc = "One public model name spread over member Models or external OpenAI-compatible endpoints.",
    version = "v1alpha1",
    kind = "ModelEnsemble",
    namespaced,
    status = "ModelEnsembleStatus",
    shortname = "wme",
    category = "weir",
    printcolumn = r#"{"name":"Served","type":"string","jsonPath":".status.servedName"}"#,
    printcolumn = r#"{"name":"Strategy","type":"string","jsonPath":".spec.strategy"}"#,
    printcolumn = r#"{"name":"Members","type":"string","jsonPath":".spec.members[*].name"}"#,
    printcolumn = r#"{"name":"Available","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.members.exists(m, m.weight > 0)", "message": "at least one member must have a weight above zero", "fieldPath": ".members"},
    {"rule": "self.members.all(m, self.members.exists_one(o, o.name == m.name))", "message": "member names must be unique", "fieldPath": ".members"}
]))]
pub struct ModelEnsembleSpec {
    /// Model name clients put in the `model` field. Defaults to the
    /// object's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    )]
    pub served_name: Option<String>,
    /// The members requests are spread over.
    #[schemars(length(min = 1, max = 32))]
    pub members: Vec<EnsembleMember>,
    /// How a member is chosen for each request.
    #[serde(default)]
    pub strategy: EnsembleStrategy,
    /// How the operator adjusts weights from measurements. Unset keeps the
    /// configured weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reweighting: Option<Reweighting>,
    /// What happens when the chosen member fails.
    #[serde(default)]
    pub fallback: Fallback,
}

/// One member of an ensemble: a Model in this namespace or an external
/// OpenAI-compatible endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.modelRef) != has(self.endpoint)", "message": "a member names exactly one of modelRef or endpoint"}
]))]
pub struct EnsembleMember {
    /// Member name, unique in the ensemble; used in status and metrics.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// A Model in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_ref: Option<LocalRef>,
    /// An external OpenAI-compatible endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<ExternalEndpoint>,
    /// Relative share of traffic under the `Weighted` strategy, and the
    /// starting point for reweighting.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 1000))]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// An OpenAI-compatible endpoint outside the cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalEndpoint {
    /// Base URL, up to and including `/v1`.
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: String,
    /// Model name to send to the endpoint.
    #[schemars(length(min = 1, max = 253))]
    pub model: String,
    /// Secret key holding the bearer API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// Time limit for one request to the endpoint.
    #[serde(default = "default_endpoint_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: u32,
}

fn default_endpoint_timeout() -> u32 {
    120
}

/// How an ensemble picks a member for each request.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum EnsembleStrategy {
    /// Random choice in proportion to the effective weights.
    #[default]
    Weighted,
    /// Always the member with the best recent objective figure.
    BestOf,
    /// Weighted, shifting traffic away from members under load.
    Adaptive,
}

/// The figure reweighting optimises.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ReweightObjective {
    /// End-to-end request latency.
    #[default]
    Latency,
    /// Time to first token.
    #[serde(rename = "TTFT")]
    Ttft,
    /// Share of failed requests.
    ErrorRate,
}

/// How the operator moves weights between members.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reweighting {
    /// The figure to optimise.
    #[serde(default)]
    pub objective: ReweightObjective,
    /// Seconds between reweighting rounds.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 5, max = 86400))]
    pub interval_seconds: u32,
    /// No member's share falls below this (0..1), so every member keeps
    /// receiving enough traffic to be measured.
    #[serde(default = "default_min_weight")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_weight: f64,
    /// Largest change of any member's share in one round (0..1).
    #[serde(default = "default_max_step")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_step: f64,
}

fn default_interval() -> u32 {
    30
}
fn default_min_weight() -> f64 {
    0.05
}
fn default_max_step() -> f64 {
    0.1
}

/// Retry on another member when the chosen one fails.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fallback {
    /// Try the next member on a connection error, 5xx or timeout.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Most members tried for one request, the first included.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 32))]
    pub max_attempts: u32,
}

impl Default for Fallback {
    fn default() -> Self {
        Self {
            enabled: true,
            max_attempts: default_max_attempts(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_max_attempts() -> u32 {
    2
}

/// Observed state of an ensemble: effective weights and the figures that
/// produced them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelEnsembleStatus {
    /// Generation and conditions.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// The name clients use for this ensemble.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_name: Option<String>,
    /// Per-member effective weights and measurements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    /// When the weights last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reweight_time: Option<Time>,
}

/// Effective weight of one member and the measurements behind it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Member name.
    pub name: String,
    /// Share of traffic now routed to the member (0..1, summing to 1).
    pub weight: f64,
    /// Requests observed in the last interval.
    #[serde(default)]
    pub requests: u64,
    /// Median end-to-end latency in the last interval, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p50_ms: Option<f64>,
    /// Median time to first token in the last interval, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_p50_ms: Option<f64>,
    /// Share of failed requests in the last interval (0..1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// Whether the member can take traffic now.
    #[serde(default)]
    pub available: bool,
}
