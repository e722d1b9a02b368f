//! `Model`: one model to serve, where its weights come from, how its engine
//! is configured and how many replicas serve it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{CommonStatus, EngineConfig, LocalRef, SecretKeyRef};

/// A model to serve: weights, engine settings, replicas and placement.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weir.dev",
    doc = "A model to serve: where its weights come from, engine settings, replicas and placement.",
    version = "v1alpha1",
    kind = "Model",
    namespaced,
    status = "ModelStatus",
    shortname = "wm",
    category = "weir",
    printcolumn = r#"{"name":"Served","type":"string","jsonPath":".status.servedName"}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.source.uri","priority":1}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desiredReplicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Available","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Grade","type":"string","jsonPath":".status.performance.grade"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Where the weights, config and tokenizer come from.
    pub source: ModelSource,
    /// Model name clients put in the `model` field of OpenAI requests.
    /// Defaults to the object's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    )]
    pub served_name: Option<String>,
    /// Engine settings: dtype, context length, KV block size, memory share
    /// and batch limits.
    #[serde(default)]
    pub engine: EngineConfig,
    /// Accelerators each replica needs.
    #[serde(default)]
    pub resources: ModelResources,
    /// Replica bounds and the autoscaling target between them.
    #[serde(default)]
    pub replicas: ReplicaPolicy,
    /// Only nodes whose labels match all of these serve the model.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints of nodes that may serve the model anyway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Response, semantic and prefix cache settings (a `CachePolicy` in this
    /// namespace). Unset means the built-in defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_policy_ref: Option<LocalRef>,
    /// Batching, priority and admission settings (a `BatchPolicy` in this
    /// namespace). Unset means the built-in defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_policy_ref: Option<LocalRef>,
}

/// Where a model's files come from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// `hf://org/name` (Hugging Face Hub; `hf://org/name/FILE.gguf` for one
    /// GGUF file of it), `file:///path` (a directory or GGUF file on
    /// the node) or `pvc://claim/path` (a directory in a PersistentVolumeClaim).
    #[schemars(regex(
        pattern = r"^(hf://[A-Za-z0-9._-]+/[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+\.gguf)?|file:///.+|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.*)$"
    ))]
    pub uri: String,
    /// Branch, tag or commit for `hf://` sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub revision: Option<String>,
    /// Secret key holding a Hugging Face token for gated models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
}

/// Accelerators one replica needs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelResources {
    /// GPUs per replica (tensor parallel degree). Zero serves on the CPU.
    #[serde(default = "default_gpus")]
    #[schemars(range(min = 0, max = 8))]
    pub gpus: u32,
}

impl Default for ModelResources {
    fn default() -> Self {
        Self {
            gpus: default_gpus(),
        }
    }
}

fn default_gpus() -> u32 {
    1
}

/// What the autoscaler compares against its target.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum AutoscaleMetric {
    /// Requests waiting per replica.
    #[default]
    QueueDepth,
    /// Share of KV cache blocks in use per replica.
    KvCacheUsage,
}

/// Replica bounds and the autoscaling target between them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.min <= self.max", "message": "replicas.min must not exceed replicas.max", "fieldPath": ".min"}
]))]
pub struct ReplicaPolicy {
    /// Fewest replicas, also when idle. With 0 the Model scales to zero
    /// after `scaleToZeroAfterSeconds` without requests, and back to one
    /// when a request is held for it.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min: u32,
    /// Most replicas the autoscaler may create.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: u32,
    /// Load signal the autoscaler follows.
    #[serde(default)]
    pub metric: AutoscaleMetric,
    /// Target waiting requests per replica (metric `QueueDepth`).
    #[serde(default = "default_target_queue_depth")]
    #[schemars(range(min = 1, max = 100000))]
    pub target_queue_depth: u32,
    /// Target share of KV blocks in use per replica (metric `KvCacheUsage`).
    #[serde(default = "default_target_kv_cache_usage")]
    #[schemars(range(min = 0.01, max = 1.0))]
    pub target_kv_cache_usage: f64,
    /// How long load must stay above target before replicas are added.
    #[serde(default = "default_scale_up_window")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_up_stabilization_seconds: u32,
    /// How long load must stay below target before replicas are removed.
    #[serde(default = "default_scale_down_window")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_stabilization_seconds: u32,
    /// Most replicas that may be unavailable at once while replicas move
    /// voluntarily (a drain, a `NoExecute` taint tolerated for a while, a
    /// node selector that no longer matches). With 0, the default, each
    /// replacement is placed first and the old replica goes only once the
    /// replacement reports Ready; when no replacement can be placed, one
    /// replica at a time goes first, so that a drain still finishes.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub max_unavailable: u32,
    /// With `min: 0`: how long the Model must see no request (none
    /// finishing, running, waiting or held on any agent) before it scales
    /// to zero. Ignored when `min` is above 0.
    #[serde(default = "default_scale_to_zero_after")]
    #[schemars(range(min = 1, max = 604800))]
    pub scale_to_zero_after_seconds: u32,
    /// How long an agent holds a request for this Model while no replica
    /// is ready (scaled to zero, loading, moving); past it the request is
    /// answered 503 with `Retry-After`. 0 refuses at once.
    #[serde(default = "default_hold_timeout")]
    #[schemars(range(min = 0, max = 3600))]
    pub hold_timeout_seconds: u32,
    /// Most requests one agent holds for this Model at once; more are
    /// answered 503 with `Retry-After` at once.
    #[serde(default = "default_max_held")]
    #[schemars(range(min = 0, max = 100000))]
    pub max_held_requests: u32,
}

impl Default for ReplicaPolicy {
    fn default() -> Self {
        Self {
            min: default_min_replicas(),
            max: default_max_replicas(),
            metric: AutoscaleMetric::default(),
            target_queue_depth: default_target_queue_depth(),
            target_kv_cache_usage: default_target_kv_cache_usage(),
            scale_up_stabilization_seconds: default_scale_up_window(),
            scale_down_stabilization_seconds: default_scale_down_window(),
            max_unavailable: 0,
            scale_to_zero_after_seconds: default_scale_to_zero_after(),
            hold_timeout_seconds: default_hold_timeout(),
            max_held_requests: default_max_held(),
        }
    }
}

fn default_min_replicas() -> u32 {
    1
}
fn default_max_replicas() -> u32 {
    1
}
fn default_target_queue_depth() -> u32 {
    8
}
fn default_target_kv_cache_usage() -> f64 {
    0.8
}
fn default_scale_up_window() -> u32 {
    30
}
fn default_scale_down_window() -> u32 {
    300
}
fn default_scale_to_zero_after() -> u32 {
    600
}
fn default_hold_timeout() -> u32 {
    120
}
fn default_max_held() -> u32 {
    64
}

/// Observed state of a Model.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// Generation and conditions.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// The name clients use for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_name: Option<String>,
    /// Replicas the operator wants now (between min and max).
    #[serde(default)]
    pub desired_replicas: u32,
    /// Replicas whose agent reports the model Ready.
    #[serde(default)]
    pub ready_replicas: u32,
    /// Nodes assigned a replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Grade and figures over the last collection window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub performance: Option<crate::performance::PerformanceReport>,
}
