//! Types shared by several Weir resources: references, priority classes,
//! the engine settings block and Kubernetes-shaped conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A reference to another Weir object in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LocalRef {
    /// Name of the referenced object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A reference to an object in a named namespace (used where the referring
/// object is cluster-scoped).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct NamespacedRef {
    /// Namespace of the referenced object.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Name of the referenced object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A key inside a Secret in the same namespace as the referring object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Request priority classes, highest first. Requests of a lower class age
/// upwards while they wait, so that none starves.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
)]
pub enum PriorityClass {
    /// Interactive traffic that must never wait behind anything else.
    Critical,
    /// Latency-sensitive traffic.
    High,
    /// The default class.
    #[default]
    Normal,
    /// Traffic that tolerates delay.
    Low,
    /// Batch work: served when capacity is free, still finishes under load.
    Background,
}

/// Numeric type of the weights and activations on the device.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Dtype {
    /// bf16 on GPUs, f32 on the CPU backend.
    #[default]
    Auto,
    /// bfloat16.
    BFloat16,
    /// IEEE half precision.
    Float16,
    /// IEEE single precision.
    Float32,
}

/// Engine settings for one served model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EngineConfig {
    /// Numeric type of weights and activations.
    #[serde(default)]
    pub dtype: Dtype,
    /// Longest context (prompt plus output) in tokens; unset means the
    /// model's own `max_position_embeddings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 1048576))]
    pub max_model_len: Option<u32>,
    /// Tokens per KV cache block.
    #[serde(default = "default_block_size")]
    #[schemars(range(min = 8, max = 128))]
    pub block_size: u32,
    /// Share of the GPU's free memory that the engine may take for weights,
    /// activations and the KV cache.
    #[serde(default = "default_gpu_memory_utilization")]
    #[schemars(range(min = 0.05, max = 0.99))]
    pub gpu_memory_utilization: f64,
    /// Most sequences in one engine step.
    #[serde(default = "default_max_num_seqs")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_num_seqs: u32,
    /// Most tokens (prefill plus decode) in one engine step.
    #[serde(default = "default_max_num_batched_tokens")]
    #[schemars(range(min = 16, max = 1048576))]
    pub max_num_batched_tokens: u32,
    /// What happens to a chat whose prompt does not fit the context.
    #[serde(default)]
    pub context_overflow: ContextOverflow,
}

/// What happens to a chat whose prompt (plus the room for its answer) does
/// not fit the model's context.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ContextOverflow {
    /// Refuse it with a 400 naming the lengths.
    #[default]
    Error,
    /// Drop the oldest turns (a user message with the replies after it)
    /// until it fits, keeping the leading system messages and the last user
    /// turn; the answer's `x-weir-context-dropped-turns` says how many.
    TruncateOldest,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            dtype: Dtype::Auto,
            max_model_len: None,
            block_size: default_block_size(),
            gpu_memory_utilization: default_gpu_memory_utilization(),
            max_num_seqs: default_max_num_seqs(),
            max_num_batched_tokens: default_max_num_batched_tokens(),
            context_overflow: ContextOverflow::Error,
        }
    }
}

fn default_block_size() -> u32 {
    16
}
fn default_gpu_memory_utilization() -> f64 {
    0.9
}
fn default_max_num_seqs() -> u32 {
    256
}
fn default_max_num_batched_tokens() -> u32 {
    8192
}

/// The status fields every Weir resource carries.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommonStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard Kubernetes conditions (`Ready`, `Degraded`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
