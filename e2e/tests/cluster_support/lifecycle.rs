//! What kube-controller-manager's node lifecycle controller does to a Node
//! whose kubelet stopped posting status, for servers that run none (the
//! development API server), and how to tell whether one runs.
//!
//! The controller, once a Node's heartbeats are older than its grace
//! period, sets the Node's conditions to `Unknown` and taints it
//! `node.kubernetes.io/unreachable` — `NoSchedule` at once, `NoExecute`
//! with `timeAdded` from its eviction queue; when the kubelet posts
//! `Ready=True` again, it takes both taints off. The functions here write
//! the same with JSON merge patches (the whole taint list), so they are
//! for a server where nothing else writes taints.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// Taint of a node whose Ready condition is Unknown.
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";

/// Whether a kube-controller-manager runs: its leader-election Lease in
/// `kube-system` exists.
pub async fn controller_manager_runs(client: &kube::Client) -> bool {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    matches!(leases.get_opt("kube-controller-manager").await, Ok(Some(_)))
}

/// `node`'s taints (none if it cannot be read).
pub async fn taints(api: &Api<Node>, node: &str) -> Vec<Taint> {
    api.get(node)
        .await
        .ok()
        .and_then(|n| n.spec?.taints)
        .unwrap_or_default()
}

/// `node`'s taint `key:effect`, if it has it.
pub async fn taint(api: &Api<Node>, node: &str, key: &str, effect: &str) -> Option<Taint> {
    taints(api, node)
        .await
        .into_iter()
        .find(|t| t.key == key && t.effect == effect)
}

async fn set_taints(api: &Api<Node>, node: &str, taints: &[Taint]) {
    let patch = json!({"spec": {"taints": taints}});
    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("writing the taints of {node}: {e}"));
}

/// Adds the taint `key:effect` to `node`, with `timeAdded` now for
/// `NoExecute` (as the controller writes it).
pub async fn add_taint(api: &Api<Node>, node: &str, key: &str, effect: &str) {
    let mut all = taints(api, node).await;
    all.push(Taint {
        key: key.into(),
        effect: effect.into(),
        time_added: (effect == "NoExecute").then(|| Time(Timestamp::now())),
        value: None,
    });
    set_taints(api, node, &all).await;
}

/// Takes every taint with `key` off `node`.
pub async fn remove_taints(api: &Api<Node>, node: &str, key: &str) {
    let mut all = taints(api, node).await;
    all.retain(|t| t.key != key);
    set_taints(api, node, &all).await;
}

/// Sets `node`'s Ready condition to `Unknown`, keeping its last heartbeat
/// time, as the controller does when the kubelet stopped posting.
pub async fn mark_unknown(api: &Api<Node>, node: &str) {
    let current = api
        .get_status(node)
        .await
        .unwrap_or_else(|e| panic!("reading {node}: {e}"));
    let heartbeat = current
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .and_then(|c| c.last_heartbeat_time);
    let unknown = json!({"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
        "message": "Kubelet stopped posting node status.",
        "lastHeartbeatTime": heartbeat, "lastTransitionTime": Time(Timestamp::now())});
    let patch = json!({"status": {"conditions": [unknown]}});
    api.patch_status(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("marking {node} Unknown: {e}"));
}
