//! Drains: whether one is asked for on a NodeAgent or its Node, and the
//! operator-owned `Drained` condition (with the events) that reports its
//! progress on the NodeAgent.
//!
//! A drain is asked for with the annotation [`DRAIN_ANNOTATION`] on the
//! NodeAgent or on its Node, with any value but `"false"`. While it is set
//! no new replica goes to the node and its replicas leave voluntarily
//! (placement places each replacement first and takes the old replica away
//! once enough replicas report Ready). It is finished when the NodeAgent's
//! spec holds no replica. Removing the annotation ends it: the condition
//! goes, and replicas still there stay.

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use weir_crds::NodeAgent;

use crate::world;

/// Annotation (on a NodeAgent or its Node) that asks for a drain.
pub const DRAIN_ANNOTATION: &str = "weir.dev/drain";

/// Condition the operator keeps on a draining NodeAgent: `False` (reason
/// `Draining`) while replicas remain, `True` (reason `Drained`) once none
/// does; absent when no drain is asked for.
pub const DRAINED_CONDITION: &str = "Drained";

fn asks(annotations: &std::collections::BTreeMap<String, String>) -> bool {
    annotations
        .get(DRAIN_ANNOTATION)
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("false"))
}

/// Whether a drain is asked for on `agent` or on its `node`.
pub fn requested(agent: &NodeAgent, node: Option<&Node>) -> bool {
    asks(agent.annotations()) || node.is_some_and(|n| asks(n.annotations()))
}

/// A change to a NodeAgent's drain report.
#[derive(Clone, Debug, PartialEq)]
pub struct DrainReport {
    /// The `Drained` condition to set; `None`: remove it.
    pub condition: Option<Condition>,
    /// The event to record (reason, note), if this is a transition.
    pub event: Option<(&'static str, String)>,
}

/// The change to `agent`'s drain report now that a drain is (or is not)
/// `requested`, or `None` when the report already says it. Events:
/// `DrainStarted` when a drain begins with replicas on the node, `Drained`
/// when none remains, `DrainEnded` when the annotation goes.
pub fn report(agent: &NodeAgent, requested: bool, now: Timestamp) -> Option<DrainReport> {
    let previous = agent
        .status
        .as_ref()
        .map(|s| s.common.conditions.as_slice())
        .unwrap_or(&[]);
    let current = previous.iter().find(|c| c.type_ == DRAINED_CONDITION);
    if !requested {
        return current.map(|_| DrainReport {
            condition: None,
            event: Some((
                "DrainEnded",
                format!("{DRAIN_ANNOTATION} was removed; the node takes replicas again"),
            )),
        });
    }
    let left: Vec<&str> = agent
        .spec
        .models
        .iter()
        .map(|m| m.served_name.as_str())
        .collect();
    let done = left.is_empty();
    let (reason, message) = if done {
        ("Drained", "no replicas left".to_owned())
    } else {
        (
            "Draining",
            format!(
                "{} replica(s) left ({}); each goes once its replacement reports Ready",
                left.len(),
                left.join(", ")
            ),
        )
    };
    let condition = world::condition(
        previous,
        DRAINED_CONDITION,
        done,
        reason,
        message,
        None,
        now,
    );
    if current.is_some_and(|c| {
        c.status == condition.status
            && c.reason == condition.reason
            && c.message == condition.message
    }) {
        return None;
    }
    let event = match (current.map(|c| c.status.as_str()), done) {
        (Some("True"), true) => None,
        (_, true) => Some(("Drained", format!("drain finished: {}", condition.message))),
        (None, false) => Some((
            "DrainStarted",
            format!("drain asked for: {}", condition.message),
        )),
        (Some(_), false) => None,
    };
    Some(DrainReport {
        condition: Some(condition),
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn agent(annotation: Option<&str>, models: &[&str], drained: Option<&str>) -> NodeAgent {
        let entries: Vec<_> = models
            .iter()
            .map(|m| {
                json!({"servedName": m, "modelRef": {"namespace": "ml", "name": m},
                            "source": {"uri": "file:///m"}})
            })
            .collect();
        let conditions: Vec<_> = drained
            .map(|status| {
                json!({"type": "Drained", "status": status, "reason": "R",
                                 "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"})
            })
            .into_iter()
            .collect();
        let mut meta = json!({"name": "gpu-1"});
        if let Some(v) = annotation {
            meta["annotations"] = json!({DRAIN_ANNOTATION: v});
        }
        serde_json::from_value(
            json!({"apiVersion": "weir.dev/v1alpha1", "kind": "NodeAgent",
            "metadata": meta, "spec": {"nodeName": "gpu-1", "models": entries},
            "status": {"conditions": conditions}}),
        )
        .unwrap()
    }

    #[test]
    fn the_annotation_on_the_agent_or_its_node_asks_for_a_drain() {
        assert!(requested(&agent(Some("true"), &[], None), None));
        assert!(requested(&agent(Some(""), &[], None), None));
        assert!(!requested(&agent(Some("false"), &[], None), None));
        assert!(!requested(&agent(None, &[], None), None));
        let node: Node = serde_json::from_value(json!({"metadata": {"name": "gpu-1",
            "annotations": {DRAIN_ANNOTATION: "maintenance"}}}))
        .unwrap();
        assert!(requested(&agent(None, &[], None), Some(&node)));
    }

    #[test]
    fn a_drain_is_reported_from_start_to_end() {
        let now = Timestamp::now();
        let start = report(&agent(Some("true"), &["a", "b"], None), true, now).unwrap();
        let c = start.condition.unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "Draining")
        );
        assert!(
            c.message.starts_with("2 replica(s) left (a, b)"),
            "{}",
            c.message
        );
        assert_eq!(start.event.unwrap().0, "DrainStarted");
        // One replica gone: the message changes, no event.
        let progress = report(&agent(Some("true"), &["b"], Some("False")), true, now).unwrap();
        assert!(progress.event.is_none());
        let done = report(&agent(Some("true"), &[], Some("False")), true, now).unwrap();
        assert_eq!(done.condition.unwrap().status, "True");
        assert_eq!(done.event.unwrap().0, "Drained");
        let ended = report(&agent(None, &[], Some("True")), false, now).unwrap();
        assert!(ended.condition.is_none());
        assert_eq!(ended.event.unwrap().0, "DrainEnded");
        assert_eq!(report(&agent(None, &["a"], None), false, now), None);
    }

    #[test]
    fn an_unchanged_report_is_not_written_again() {
        let now = Timestamp::now();
        let mut a = agent(Some("true"), &[], None);
        let first = report(&a, true, now).unwrap().condition.unwrap();
        a.status.as_mut().unwrap().common.conditions = vec![first];
        assert_eq!(report(&a, true, now), None);
    }
}
