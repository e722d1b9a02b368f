//! `NodeAgent`: one per GPU node. The operator writes `spec` (what the node
//! serves, with every setting resolved); the agent writes `status` (GPUs,
//! loaded models, endpoint, load, heartbeat), as a kubelet does for its Node.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::batch_policy::BatchPolicySpec;
use crate::cache_policy::CachePolicySpec;
use crate::common::{CommonStatus, EngineConfig, NamespacedRef};
use crate::model::ModelSource;

/// The work assigned to one node's agent, and what the agent reports back.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "weir.dev",
    doc = "The models one GPU node serves (written by the operator) and what its agent reports (written by the agent).",
    version = "v1alpha1",
    kind = "NodeAgent",
    status = "NodeAgentStatus",
    shortname = "wna",
    category = "weir",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Backend","type":"string","jsonPath":".status.backend"}"#,
    printcolumn = r#"{"name":"Models","type":"string","jsonPath":".spec.models[*].servedName"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoint","priority":1}"#,
    printcolumn = r#"{"name":"Heartbeat","type":"date","jsonPath":".status.lastHeartbeatTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.models.all(m, self.models.exists_one(o, o.servedName == m.servedName))", "message": "a node serves each model name once", "fieldPath": ".models"}
]))]
pub struct NodeAgentSpec {
    /// The Kubernetes Node this agent runs on.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// Models this node serves, with their settings resolved. A map list
    /// keyed by `servedName`: the operator writes each Model's entry under
    /// that Model's own field manager, so entries never overwrite each other.
    #[serde(default)]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["servedName"]))]
    pub models: Vec<AssignedModel>,
    /// When true the agent finishes requests in flight, takes no new ones
    /// and unloads its models (the node is being drained).
    #[serde(default)]
    pub draining: bool,
}

/// One model assigned to a node, with every setting resolved so the agent
/// needs nothing else to serve it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AssignedModel {
    /// The name clients use.
    #[schemars(length(min = 1, max = 253))]
    pub served_name: String,
    /// The Model object this assignment comes from.
    pub model_ref: NamespacedRef,
    /// Where the weights come from.
    pub source: ModelSource,
    /// Engine settings.
    #[serde(default)]
    pub engine: EngineConfig,
    /// GPUs the replica uses on this node.
    #[serde(default)]
    #[schemars(range(min = 0, max = 8))]
    pub gpus: u32,
    /// Resolved cache settings.
    #[serde(default)]
    pub cache: CachePolicySpec,
    /// Resolved batching settings.
    #[serde(default)]
    pub batch: BatchPolicySpec,
}

/// Which engine backend the agent runs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Backend {
    /// CUDA on NVIDIA GPUs.
    Cuda,
    /// The f32 CPU backend.
    Cpu,
}

/// Lifecycle phase of a model on a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ModelPhase {
    /// Weights are being fetched or loaded.
    Loading,
    /// Serving requests.
    Ready,
    /// Loading or serving failed; `reason` and `message` say why.
    Failed,
    /// Finishing requests in flight before release.
    Unloading,
}

/// Observed state of a node's agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeAgentStatus {
    /// Generation and conditions (`Ready` false when the heartbeat is stale).
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Base URL of the agent's OpenAI API (`http://podIP:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// When the agent last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Agent version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Backend in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    /// GPUs seen through NVML.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuStatus>,
    /// State of each assigned model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<LoadedModelStatus>,
}

/// One GPU as NVML reports it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuStatus {
    /// NVML index.
    pub index: u32,
    /// Product name.
    pub name: String,
    /// Device UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Total memory in bytes.
    pub memory_total_bytes: u64,
    /// Used memory in bytes.
    pub memory_used_bytes: u64,
    /// Utilization over the last sample period, percent.
    pub utilization_percent: u32,
}

/// State of one model on a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadedModelStatus {
    /// The name clients use.
    pub served_name: String,
    /// Lifecycle phase.
    pub phase: ModelPhase,
    /// Loading progress (0..1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// Machine-readable reason for the phase (`WeightsNotFound`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Share of KV cache blocks in use (0..1).
    #[serde(default)]
    pub kv_cache_usage: f64,
    /// Requests in the running batch.
    #[serde(default)]
    pub running: u32,
    /// Requests waiting to be scheduled.
    #[serde(default)]
    pub waiting: u32,
    /// Bytes of the model's weight files on this node (for the operator's
    /// GPU memory estimate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_bytes: Option<u64>,
    /// The tuning mode in force (`performance`, `balanced`, `quality`),
    /// when its BatchPolicy tunes by load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuning: Option<String>,
}
