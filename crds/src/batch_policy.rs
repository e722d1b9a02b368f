//! `BatchPolicy`: batch limits, priority classes with aging, admission
//! queue limits, adaptive sizing, the circuit breaker and chunked prefill.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{CommonStatus, PriorityClass};

/// Batching and admission settings that Models refer to by name.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weir.dev",
    doc = "Batching, priority, admission queue and circuit breaker settings that Models refer to.",
    version = "v1alpha1",
    kind = "BatchPolicy",
    namespaced,
    status = "BatchPolicyStatus",
    shortname = "wbp",
    category = "weir",
    printcolumn = r#"{"name":"MaxSeqs","type":"integer","jsonPath":".spec.maxNumSeqs"}"#,
    printcolumn = r#"{"name":"MaxTokens","type":"integer","jsonPath":".spec.maxNumBatchedTokens"}"#,
    printcolumn = r#"{"name":"Adaptive","type":"boolean","jsonPath":".spec.adaptive.enabled"}"#,
    printcolumn = r#"{"name":"Models","type":"integer","jsonPath":".status.modelCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.adaptive) || !self.adaptive.enabled || self.adaptive.minNumSeqs <= self.maxNumSeqs", "message": "adaptive.minNumSeqs must not exceed maxNumSeqs", "fieldPath": ".adaptive.minNumSeqs"},
    {"rule": "!has(self.adaptive) || !self.adaptive.enabled || self.adaptive.minNumBatchedTokens <= self.maxNumBatchedTokens", "message": "adaptive.minNumBatchedTokens must not exceed maxNumBatchedTokens", "fieldPath": ".adaptive.minNumBatchedTokens"},
    {"rule": "!has(self.chunkedPrefill) || !self.chunkedPrefill.enabled || self.chunkedPrefill.chunkSize <= self.maxNumBatchedTokens", "message": "chunkedPrefill.chunkSize must not exceed maxNumBatchedTokens", "fieldPath": ".chunkedPrefill.chunkSize"}
]))]
pub struct BatchPolicySpec {
    /// Most sequences in one engine step (the upper bound when adaptive).
    #[serde(default = "default_max_num_seqs")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_num_seqs: u32,
    /// Most tokens in one engine step (the upper bound when adaptive).
    #[serde(default = "default_max_num_batched_tokens")]
    #[schemars(range(min = 16, max = 1048576))]
    pub max_num_batched_tokens: u32,
    /// Longest a new request waits for more requests to batch with it
    /// before the engine starts a step anyway.
    #[serde(default = "default_max_wait_ms")]
    #[schemars(range(min = 0, max = 10000))]
    pub max_wait_ms: u32,
    /// Priority classes and aging.
    #[serde(default)]
    pub priority: PrioritySpec,
    /// Admission queue bounds.
    #[serde(default)]
    pub queue: QueueSpec,
    /// Sizing of batch limits from measured load.
    #[serde(default)]
    pub adaptive: AdaptiveSpec,
    /// Circuit breaker around the engine.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerSpec,
    /// Splitting of long prompts over several steps.
    #[serde(default)]
    pub chunked_prefill: ChunkedPrefillSpec,
    /// Request defaults that follow load.
    #[serde(default)]
    pub tuning: crate::tuning::TuningSpec,
}

impl Default for BatchPolicySpec {
    fn default() -> Self {
        Self {
            max_num_seqs: default_max_num_seqs(),
            max_num_batched_tokens: default_max_num_batched_tokens(),
            max_wait_ms: default_max_wait_ms(),
            priority: PrioritySpec::default(),
            queue: QueueSpec::default(),
            adaptive: AdaptiveSpec::default(),
            circuit_breaker: CircuitBreakerSpec::default(),
            chunked_prefill: ChunkedPrefillSpec::default(),
            tuning: crate::tuning::TuningSpec::default(),
        }
    }
}

/// Priority classes (Critical, High, Normal, Low, Background) and aging.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrioritySpec {
    /// Class of requests that name none.
    #[serde(default)]
    pub default_class: PriorityClass,
    /// A waiting request rises one class for every this many seconds it
    /// waits, so Background work still finishes under sustained Critical
    /// load.
    #[serde(default = "default_aging")]
    #[schemars(range(min = 1, max = 3600))]
    pub aging_seconds: u32,
    /// Whether clients may ask for Critical (else it is lowered to High).
    #[serde(default)]
    pub allow_critical: bool,
}

impl Default for PrioritySpec {
    fn default() -> Self {
        Self {
            default_class: PriorityClass::Normal,
            aging_seconds: default_aging(),
            allow_critical: false,
        }
    }
}

/// Bounds of the per-model admission queue.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Most requests waiting per model; beyond it clients get 429 with
    /// `Retry-After`.
    #[serde(default = "default_max_queued")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_queued: u32,
    /// Longest a request waits before it is answered 429.
    #[serde(default = "default_queue_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: u32,
}

impl Default for QueueSpec {
    fn default() -> Self {
        Self {
            max_queued: default_max_queued(),
            timeout_seconds: default_queue_timeout(),
        }
    }
}

/// Adaptive batch limits: between the minimums here and the policy's
/// maximums, lowered when the engine is saturated and raised when it idles.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.kvUsageLow < self.kvUsageHigh", "message": "adaptive.kvUsageLow must be below adaptive.kvUsageHigh", "fieldPath": ".kvUsageLow"}
]))]
pub struct AdaptiveSpec {
    /// Whether limits follow load.
    #[serde(default)]
    pub enabled: bool,
    /// Lower bound of the sequence limit.
    #[serde(default = "default_min_num_seqs")]
    #[schemars(range(min = 1, max = 4096))]
    pub min_num_seqs: u32,
    /// Lower bound of the token limit.
    #[serde(default = "default_min_num_batched_tokens")]
    #[schemars(range(min = 16, max = 1048576))]
    pub min_num_batched_tokens: u32,
    /// KV usage (0..1) above which limits are lowered.
    #[serde(default = "default_kv_high")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub kv_usage_high: f64,
    /// KV usage (0..1) below which limits may be raised.
    #[serde(default = "default_kv_low")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub kv_usage_low: f64,
    /// GPU utilization (0..1, from NVML) above which limits are not raised.
    #[serde(default = "default_gpu_high")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub gpu_utilization_high: f64,
    /// Waiting requests above which limits may be raised.
    #[serde(default = "default_queue_high")]
    #[schemars(range(min = 0, max = 1000000))]
    pub queue_depth_high: u32,
    /// Share (0..1) by which a limit moves in one adjustment.
    #[serde(default = "default_step")]
    #[schemars(range(min = 0.01, max = 1.0))]
    pub step: f64,
    /// Seconds between adjustments.
    #[serde(default = "default_adjust_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub interval_seconds: u32,
}

impl Default for AdaptiveSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            min_num_seqs: default_min_num_seqs(),
            min_num_batched_tokens: default_min_num_batched_tokens(),
            kv_usage_high: default_kv_high(),
            kv_usage_low: default_kv_low(),
            gpu_utilization_high: default_gpu_high(),
            queue_depth_high: default_queue_high(),
            step: default_step(),
            interval_seconds: default_adjust_interval(),
        }
    }
}

/// Circuit breaker around the engine: after repeated failures new requests
/// fail fast for a while, then one probe decides whether to close it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    /// Whether the breaker is armed.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Consecutive failures that open the breaker.
    #[serde(default = "default_failures")]
    #[schemars(range(min = 1, max = 10000))]
    pub failure_threshold: u32,
    /// Seconds the breaker stays open before a half-open probe.
    #[serde(default = "default_open_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub open_seconds: u32,
    /// Requests let through while half-open.
    #[serde(default = "default_half_open")]
    #[schemars(range(min = 1, max = 100))]
    pub half_open_probes: u32,
}

impl Default for CircuitBreakerSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_threshold: default_failures(),
            open_seconds: default_open_seconds(),
            half_open_probes: default_half_open(),
        }
    }
}

/// Chunked prefill: long prompts are computed over several steps so that
/// decoding requests keep their pace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChunkedPrefillSpec {
    /// Whether prompts are split.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Most prompt tokens of one request in one step.
    #[serde(default = "default_chunk")]
    #[schemars(range(min = 16, max = 1048576))]
    pub chunk_size: u32,
}

impl Default for ChunkedPrefillSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            chunk_size: default_chunk(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_max_num_seqs() -> u32 {
    256
}
fn default_max_num_batched_tokens() -> u32 {
    8192
}
fn default_max_wait_ms() -> u32 {
    2
}
fn default_aging() -> u32 {
    10
}
fn default_max_queued() -> u32 {
    1024
}
fn default_queue_timeout() -> u32 {
    60
}
fn default_min_num_seqs() -> u32 {
    8
}
fn default_min_num_batched_tokens() -> u32 {
    512
}
fn default_kv_high() -> f64 {
    0.9
}
fn default_kv_low() -> f64 {
    0.5
}
fn default_gpu_high() -> f64 {
    0.95
}
fn default_queue_high() -> u32 {
    16
}
fn default_step() -> f64 {
    0.1
}
fn default_adjust_interval() -> u32 {
    10
}
fn default_failures() -> u32 {
    5
}
fn default_open_seconds() -> u32 {
    30
}
fn default_half_open() -> u32 {
    1
}
fn default_chunk() -> u32 {
    512
}

/// Observed state of a BatchPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchPolicyStatus {
    /// Generation and conditions.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Models that refer to this policy.
    #[serde(default)]
    pub model_count: u32,
}
