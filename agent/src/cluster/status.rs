//! The NodeAgent status an agent reports: a pure function of what it
//! serves, what its GPUs read and each model's phase.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use weir_crds::common::CommonStatus;
use weir_crds::node_agent::{Backend, GpuStatus, LoadedModelStatus, ModelPhase, NodeAgentStatus};

use super::ClusterConfig;
use crate::http::AppState;

/// A model's phase with its reason.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelState {
    /// Loading, Ready, Failed or Unloading.
    pub phase: ModelPhase,
    /// Machine-readable reason.
    pub reason: Option<String>,
    /// Human-readable detail.
    pub message: Option<String>,
    /// Fraction loaded (downloads), when known.
    pub progress: Option<f64>,
}

impl ModelState {
    /// Loading.
    pub fn loading() -> Self {
        Self::phase(ModelPhase::Loading)
    }

    /// A phase without a reason.
    pub fn phase(phase: ModelPhase) -> Self {
        Self {
            phase,
            reason: None,
            message: None,
            progress: None,
        }
    }

    /// Failed, with why.
    pub fn failed(reason: &str, message: String) -> Self {
        Self {
            phase: ModelPhase::Failed,
            reason: Some(reason.to_owned()),
            message: Some(message),
            progress: None,
        }
    }
}

/// When this agent process started (the Ready condition's transition).
fn started() -> Timestamp {
    static STARTED: std::sync::OnceLock<Timestamp> = std::sync::OnceLock::new();
    *STARTED.get_or_init(Timestamp::now)
}

/// The status to report now.
pub fn build(
    config: &ClusterConfig,
    state: &AppState,
    states: &BTreeMap<String, ModelState>,
    generation: Option<i64>,
) -> NodeAgentStatus {
    let now = Time(Timestamp::now());
    let mut models: BTreeMap<String, LoadedModelStatus> = states
        .iter()
        .map(|(name, s)| {
            (
                name.clone(),
                LoadedModelStatus {
                    served_name: name.clone(),
                    phase: s.phase,
                    progress: s.progress,
                    reason: s.reason.clone(),
                    message: s.message.clone(),
                    kv_cache_usage: 0.0,
                    running: 0,
                    waiting: 0,
                    weights_bytes: None,
                    tuning: None,
                },
            )
        })
        .collect();
    for model in state
        .models
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let snap = model.engine.stats().snapshot();
        let entry = models
            .entry(model.name.clone())
            .or_insert_with(|| LoadedModelStatus {
                served_name: model.name.clone(),
                phase: ModelPhase::Ready,
                progress: None,
                reason: None,
                message: None,
                kv_cache_usage: 0.0,
                running: 0,
                waiting: 0,
                weights_bytes: None,
                tuning: None,
            });
        if model.drain.is_draining() {
            entry.phase = ModelPhase::Unloading;
            entry.reason = Some("Draining".into());
            entry.message = Some(format!(
                "taken out of service; {} requests in flight",
                model.drain.in_flight()
            ));
        }
        entry.tuning = model.tuner.current().map(|m| m.label().to_owned());
        entry.kv_cache_usage = snap.kv_usage;
        entry.running = snap.running as u32;
        entry.waiting = snap.waiting as u32;
        entry.weights_bytes = Some(model.weights_bytes);
    }
    let gpus = state
        .gpu
        .readings()
        .into_iter()
        .map(|r| GpuStatus {
            index: r.index,
            name: r.name,
            uuid: r.uuid,
            memory_total_bytes: r.memory_total_bytes,
            memory_used_bytes: r.memory_used_bytes,
            utilization_percent: (r.utilization * 100.0).round() as u32,
        })
        .collect::<Vec<_>>();
    let failed: Vec<&str> = models
        .values()
        .filter(|m| m.phase == ModelPhase::Failed)
        .map(|m| m.served_name.as_str())
        .collect();
    let serving = state.ready.load(std::sync::atomic::Ordering::Acquire);
    let ready = Condition {
        type_: "Ready".into(),
        status: if serving { "True" } else { "False" }.into(),
        reason: if serving { "Heartbeat" } else { "ShuttingDown" }.into(),
        message: if !serving {
            "agent is stopping: draining its models".into()
        } else if failed.is_empty() {
            "agent is serving".into()
        } else {
            format!("agent is serving; failed models: {}", failed.join(", "))
        },
        last_transition_time: Time(started()),
        observed_generation: generation,
    };
    NodeAgentStatus {
        common: CommonStatus {
            observed_generation: generation,
            conditions: vec![ready],
        },
        endpoint: Some(config.endpoint.clone()),
        last_heartbeat_time: Some(now),
        agent_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        // The CUDA backend is not built yet: engines run on the CPU even on
        // GPU nodes, and the status says so.
        backend: Some(Backend::Cpu),
        gpus,
        models: models.into_values().collect(),
    }
}
