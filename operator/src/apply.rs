//! The operator's writes, all by server-side apply: each Model's entries in
//! NodeAgent specs (what each node serves) under that Model's own field
//! manager, Model, policy and NodeAgent statuses under the operator's, and
//! the NodeAgent `Drained` condition under [`DRAIN_MANAGER`]; plus events
//! that explain decisions. Unchanged objects are not written.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};
use serde_json::json;
use weir_crds::model::ModelStatus;
use weir_crds::node_agent::AssignedModel;
use weir_crds::{Model, NodeAgent};

/// Field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "weir-operator";

pub(crate) fn params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// The field manager under which a Model's entries in NodeAgent specs are
/// applied: one per Model, so that each Model's reconcile owns exactly its
/// own entry of each map list and can drop it without touching the others.
/// Field managers are limited to 128 characters; longer keys keep a prefix
/// and a stable hash of the whole key.
pub fn model_manager(namespace: &str, name: &str) -> String {
    let full = format!("{FIELD_MANAGER}/{namespace}/{name}");
    if full.len() <= 128 {
        return full;
    }
    // FNV-1a: stable across builds (std's hasher is not).
    let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut cut = 100;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{hash:016x}", &full[..cut])
}

/// Sets (`Some`) or removes (`None`) one Model's entry in a NodeAgent's
/// `spec.models`, applied under that Model's own field manager.
pub async fn assignment(
    client: &kube::Client,
    agent: &str,
    manager: &str,
    entry: Option<&AssignedModel>,
) -> Result<(), kube::Error> {
    let api: Api<NodeAgent> = Api::all(client.clone());
    let mut patch = json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "NodeAgent",
        "metadata": {"name": agent},
    });
    // Applying nothing releases what this manager owned: its entry goes.
    if let Some(entry) = entry {
        patch["spec"] = json!({"models": [entry]});
    }
    api.patch(
        agent,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

/// Writes a Model's status, if it changed.
pub async fn model_status(
    client: &kube::Client,
    model: &Model,
    status: &ModelStatus,
) -> Result<bool, kube::Error> {
    if model.status.as_ref() == Some(status) {
        return Ok(false);
    }
    let api: Api<Model> = Api::namespaced(client.clone(), &model.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Model", "status": status});
    api.patch_status(&model.name_any(), &params(), &Patch::Apply(patch))
        .await?;
    Ok(true)
}

/// Field manager of the operator's `Drained` condition on NodeAgents. It
/// is not [`FIELD_MANAGER`], which owns the `Heartbeat` condition: each
/// apply of a manager's conditions releases the ones it leaves out, so
/// each operator-owned condition has a manager of its own.
pub const DRAIN_MANAGER: &str = "weir-operator/drain";

/// Sets (`Some`) or removes (`None`) the NodeAgent status conditions that
/// `manager` owns (the condition list is a map keyed by `type`: the agent
/// keeps its own entries, and other managers theirs).
pub async fn agent_condition(
    client: &kube::Client,
    agent: &NodeAgent,
    manager: &str,
    condition: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
) -> Result<(), kube::Error> {
    let api: Api<NodeAgent> = Api::all(client.clone());
    // Applying no conditions releases (and so removes) the ones it owned.
    let status = match condition {
        Some(c) => json!({"conditions": [c]}),
        None => json!({}),
    };
    let patch = json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "NodeAgent",
        "status": status,
    });
    api.patch_status(
        &agent.name_any(),
        &PatchParams::apply(manager).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

/// Writes the `modelCount` status of a CachePolicy or BatchPolicy.
pub async fn policy_count<K>(
    client: &kube::Client,
    policy: &K,
    kind: &str,
    count: u32,
) -> Result<(), kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), &policy.namespace().unwrap_or_default());
    let patch =
        json!({"apiVersion": "weir.dev/v1alpha1", "kind": kind, "status": {"modelCount": count}});
    api.patch_status(&policy.name_any(), &params(), &Patch::Apply(patch))
        .await?;
    Ok(())
}

/// Records an event about `object` (failures to record are logged only).
pub async fn event<K: Resource<DynamicType = ()>>(
    client: &kube::Client,
    object: &K,
    warning: bool,
    reason: &str,
    note: String,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: None,
        },
    );
    let reference: ObjectReference = object.object_ref(&());
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference).await {
        tracing::warn!(error = %e, reason, "recording an event");
    }
}
