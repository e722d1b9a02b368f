//! The operator's writes, all by server-side apply under one field manager:
//! NodeAgent specs (what each node serves), Model and policy statuses, and
//! events that explain decisions. Unchanged objects are not written.

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

fn params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Sets the models a node serves, if they differ from what it has.
pub async fn agent_models(
    client: &kube::Client,
    agent: &NodeAgent,
    models: &[AssignedModel],
) -> Result<bool, kube::Error> {
    if agent.spec.models == models {
        return Ok(false);
    }
    let api: Api<NodeAgent> = Api::all(client.clone());
    let patch = json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "NodeAgent",
        "metadata": {"name": agent.name_any()},
        "spec": {"nodeName": agent.spec.node_name, "models": models},
    });
    api.patch(&agent.name_any(), &params(), &Patch::Apply(patch))
        .await?;
    Ok(true)
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

/// Sets one condition of a NodeAgent's status (the operator owns only that
/// entry of the condition list; the agent keeps its own).
pub async fn agent_condition(
    client: &kube::Client,
    agent: &NodeAgent,
    condition: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
) -> Result<(), kube::Error> {
    let api: Api<NodeAgent> = Api::all(client.clone());
    let patch = json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "NodeAgent",
        "status": {"conditions": [condition]},
    });
    api.patch_status(&agent.name_any(), &params(), &Patch::Apply(patch))
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
