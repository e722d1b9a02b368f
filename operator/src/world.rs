//! The operator's view of the cluster and the pure steps from it to the
//! objects it writes: policy references resolved (or reported missing),
//! agents judged ready from their heartbeat, models turned into the fully
//! resolved assignments NodeAgent specs carry, and Model statuses.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use weir_crds::batch_policy::BatchPolicySpec;
use weir_crds::cache_policy::CachePolicySpec;
use weir_crds::common::{CommonStatus, NamespacedRef};
use weir_crds::model::ModelStatus;
use weir_crds::node_agent::{AssignedModel, ModelPhase, NodeAgent};
use weir_crds::{BatchPolicy, CachePolicy, Model};

/// A reference that names nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingRef {
    /// The referring field (`spec.cachePolicyRef`).
    pub field: &'static str,
    /// The name it gives.
    pub name: String,
}

/// The served name of a Model.
pub fn served_name(model: &Model) -> String {
    model
        .spec
        .served_name
        .clone()
        .unwrap_or_else(|| model.name_any())
}

/// The Model's cache and batch policies (defaults where it names none).
pub fn resolve_policies(
    model: &Model,
    caches: &[CachePolicy],
    batches: &[BatchPolicy],
) -> Result<(CachePolicySpec, BatchPolicySpec), MissingRef> {
    let ns = model.namespace().unwrap_or_default();
    let find_cache = |name: &str| {
        caches
            .iter()
            .find(|c| c.name_any() == name && c.namespace().unwrap_or_default() == ns)
    };
    let find_batch = |name: &str| {
        batches
            .iter()
            .find(|b| b.name_any() == name && b.namespace().unwrap_or_default() == ns)
    };
    let cache = match &model.spec.cache_policy_ref {
        None => CachePolicySpec::default(),
        Some(r) => find_cache(&r.name)
            .map(|c| c.spec.clone())
            .ok_or_else(|| MissingRef {
                field: "spec.cachePolicyRef",
                name: r.name.clone(),
            })?,
    };
    let batch = match &model.spec.batch_policy_ref {
        None => BatchPolicySpec::default(),
        Some(r) => find_batch(&r.name)
            .map(|b| b.spec.clone())
            .ok_or_else(|| MissingRef {
                field: "spec.batchPolicyRef",
                name: r.name.clone(),
            })?,
    };
    Ok((cache, batch))
}

/// What a node needs to serve `model`.
pub fn assignment(model: &Model, cache: CachePolicySpec, batch: BatchPolicySpec) -> AssignedModel {
    AssignedModel {
        served_name: served_name(model),
        model_ref: NamespacedRef {
            namespace: model.namespace().unwrap_or_default(),
            name: model.name_any(),
        },
        source: model.spec.source.clone(),
        engine: model.spec.engine.clone(),
        gpus: model.spec.resources.gpus,
        cache,
        batch,
    }
}

/// Whether an agent may receive work and traffic: it reported within
/// `stale_after` and says it is Ready.
pub fn agent_ready(agent: &NodeAgent, now: Timestamp, stale_after: Duration) -> bool {
    let Some(status) = &agent.status else {
        return false;
    };
    let fresh = status.last_heartbeat_time.as_ref().is_some_and(|t| {
        let limit = SignedDuration::try_from(stale_after).unwrap_or(SignedDuration::from_secs(60));
        t.0 + limit > now
    });
    let ready = status
        .common
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    fresh && ready
}

/// Condition the operator keeps on each NodeAgent: `False` while its
/// heartbeat is stale (the agent receives no work or traffic).
pub const HEARTBEAT_CONDITION: &str = "Heartbeat";

/// The Heartbeat condition to write, if it must change: `False` when the
/// heartbeat went stale, back to `True` when a stale agent reports again.
/// Healthy agents are never written.
pub fn heartbeat_condition(
    agent: &NodeAgent,
    now: Timestamp,
    stale_after: Duration,
) -> Option<Condition> {
    let status = agent.status.as_ref();
    let previous = status
        .map(|s| s.common.conditions.as_slice())
        .unwrap_or(&[]);
    let current = previous.iter().find(|c| c.type_ == HEARTBEAT_CONDITION);
    let beat = status.and_then(|s| s.last_heartbeat_time.as_ref());
    let limit = SignedDuration::try_from(stale_after).unwrap_or(SignedDuration::from_secs(60));
    let fresh = beat.is_some_and(|t| t.0 + limit > now);
    match (fresh, current.map(|c| c.status.as_str())) {
        (true, None | Some("True")) | (false, Some("False")) => None,
        (true, Some(_)) => Some(condition(
            previous,
            HEARTBEAT_CONDITION,
            true,
            "HeartbeatResumed",
            "the agent reports again".into(),
            None,
            now,
        )),
        (false, _) => {
            let message = match beat {
                Some(t) => format!(
                    "no heartbeat since {} (limit {}s); not placed on, not routed to",
                    t.0,
                    stale_after.as_secs()
                ),
                None => "the agent never reported; not placed on, not routed to".into(),
            };
            Some(condition(
                previous,
                HEARTBEAT_CONDITION,
                false,
                "HeartbeatStale",
                message,
                None,
                now,
            ))
        }
    }
}

/// Whether `agent` reports `served` as failed (so placement moves it away).
pub fn failed_on(agent: &NodeAgent, served: &str) -> bool {
    agent.status.as_ref().is_some_and(|s| {
        s.models
            .iter()
            .any(|m| m.served_name == served && m.phase == ModelPhase::Failed)
    })
}

/// A condition, keeping the transition time when the status is unchanged.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// The Model's status from where it is placed and what those agents report.
pub fn model_status(
    model: &Model,
    desired: u32,
    nodes: &[String],
    agents: &BTreeMap<String, &NodeAgent>,
    now: Timestamp,
    stale_after: Duration,
    problem: Option<(&str, String)>,
) -> ModelStatus {
    let served = served_name(model);
    let ready = nodes
        .iter()
        .filter_map(|n| agents.get(n))
        .filter(|a| agent_ready(a, now, stale_after))
        .filter(|a| {
            a.status.as_ref().is_some_and(|s| {
                s.models
                    .iter()
                    .any(|m| m.served_name == served && m.phase == ModelPhase::Ready)
            })
        })
        .count() as u32;
    let previous = model
        .status
        .as_ref()
        .map(|s| s.common.conditions.clone())
        .unwrap_or_default();
    let generation = model.metadata.generation;
    let (ok, reason, message) = match problem {
        Some((reason, message)) => (false, reason.to_owned(), message),
        // Idle at zero is healthy: the next request is held and scales it up.
        None if desired == 0 && ready == 0 && model.spec.replicas.min == 0 => (
            true,
            "ScaledToZero".to_owned(),
            "scaled to zero while idle; the next request is held until a replica is ready"
                .to_owned(),
        ),
        None if ready >= desired.max(1) => (
            true,
            "ReplicasReady".to_owned(),
            format!("{ready}/{desired} replicas ready"),
        ),
        None => (
            false,
            "ReplicasNotReady".to_owned(),
            format!("{ready}/{desired} replicas ready"),
        ),
    };
    ModelStatus {
        common: CommonStatus {
            observed_generation: generation,
            conditions: vec![condition(
                &previous, "Ready", ok, &reason, message, generation, now,
            )],
        },
        served_name: Some(served),
        desired_replicas: desired,
        ready_replicas: ready,
        nodes: nodes.to_vec(),
        performance: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_crds::node_agent::{LoadedModelStatus, NodeAgentSpec, NodeAgentStatus};

    fn model(yaml: &str) -> Model {
        serde_yaml::from_str(yaml).unwrap()
    }

    const M: &str = "apiVersion: weir.dev/v1alpha1\nkind: Model\nmetadata: {name: m, namespace: ns, generation: 4}\nspec:\n  source: {uri: 'hf://org/m'}\n  batchPolicyRef: {name: fast}\n";

    fn agent(
        name: &str,
        heartbeat: Timestamp,
        ready: bool,
        phase: Option<ModelPhase>,
    ) -> NodeAgent {
        let mut a = NodeAgent::new(
            name,
            NodeAgentSpec {
                node_name: name.into(),
                ..Default::default()
            },
        );
        a.status = Some(NodeAgentStatus {
            common: CommonStatus {
                observed_generation: None,
                conditions: vec![condition(
                    &[],
                    "Ready",
                    ready,
                    "Heartbeat",
                    String::new(),
                    None,
                    heartbeat,
                )],
            },
            last_heartbeat_time: Some(Time(heartbeat)),
            models: phase
                .map(|phase| LoadedModelStatus {
                    served_name: "m".into(),
                    phase,
                    progress: None,
                    reason: None,
                    message: None,
                    kv_cache_usage: 0.0,
                    running: 0,
                    waiting: 0,
                    weights_bytes: None,
                    tuning: None,
                })
                .into_iter()
                .collect(),
            ..Default::default()
        });
        a
    }

    #[test]
    fn missing_policy_references_are_named() {
        let m = model(M);
        let err = resolve_policies(&m, &[], &[]).unwrap_err();
        assert_eq!(
            err,
            MissingRef {
                field: "spec.batchPolicyRef",
                name: "fast".into()
            }
        );
        let mut bp: BatchPolicy = serde_yaml::from_str(
            "apiVersion: weir.dev/v1alpha1\nkind: BatchPolicy\nmetadata: {name: fast, namespace: ns}\nspec: {maxNumSeqs: 8}\n",
        )
        .unwrap();
        let (_, batch) = resolve_policies(&m, &[], std::slice::from_ref(&bp)).unwrap();
        assert_eq!(batch.max_num_seqs, 8);
        bp.metadata.namespace = Some("other".into());
        assert!(
            resolve_policies(&m, &[], &[bp]).is_err(),
            "policies are namespaced"
        );
    }

    #[test]
    fn stale_or_unready_agents_do_not_count() {
        let now = Timestamp::now();
        let stale = now - SignedDuration::from_secs(120);
        let limit = Duration::from_secs(30);
        assert!(agent_ready(&agent("a", now, true, None), now, limit));
        assert!(!agent_ready(&agent("a", stale, true, None), now, limit));
        assert!(!agent_ready(&agent("a", now, false, None), now, limit));
        assert!(failed_on(
            &agent("a", now, true, Some(ModelPhase::Failed)),
            "m"
        ));
    }

    #[test]
    fn status_counts_ready_replicas_and_keeps_transition_times() {
        let now = Timestamp::now();
        let m = model(M);
        let (a, b) = (
            agent("n1", now, true, Some(ModelPhase::Ready)),
            agent("n2", now, true, Some(ModelPhase::Loading)),
        );
        let agents: BTreeMap<String, &NodeAgent> =
            [("n1".to_owned(), &a), ("n2".to_owned(), &b)].into();
        let nodes = vec!["n1".to_owned(), "n2".to_owned()];
        let s = model_status(&m, 2, &nodes, &agents, now, Duration::from_secs(30), None);
        assert_eq!((s.desired_replicas, s.ready_replicas), (2, 1));
        assert_eq!(s.common.conditions[0].status, "False");
        assert_eq!(s.common.observed_generation, Some(4));
        let later = now + SignedDuration::from_secs(10);
        let mut m2 = m.clone();
        m2.status = Some(s.clone());
        let s2 = model_status(
            &m2,
            2,
            &nodes,
            &agents,
            later,
            Duration::from_secs(30),
            None,
        );
        assert_eq!(
            s2.common.conditions[0].last_transition_time,
            s.common.conditions[0].last_transition_time
        );
        let s3 = model_status(
            &m2,
            2,
            &nodes,
            &agents,
            later,
            Duration::from_secs(30),
            Some(("PolicyNotFound", "x".into())),
        );
        assert_eq!(s3.common.conditions[0].reason, "PolicyNotFound");
    }

    #[test]
    fn a_min_zero_model_at_zero_is_ready_scaled_to_zero() {
        let now = Timestamp::now();
        let limit = Duration::from_secs(30);
        let mut m = model(M);
        m.spec.replicas.min = 0;
        let s = model_status(&m, 0, &[], &BTreeMap::new(), now, limit, None);
        let c = &s.common.conditions[0];
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "ScaledToZero")
        );
        // With min 1, no replica is a problem.
        m.spec.replicas.min = 1;
        let s = model_status(&m, 0, &[], &BTreeMap::new(), now, limit, None);
        assert_eq!(s.common.conditions[0].reason, "ReplicasNotReady");
    }
}
