//! The Model and NodeAgent controllers' reconciles against a mocked API
//! server (`tower-test`) that records every call and keeps the objects it
//! was sent, merging each field manager's NodeAgent `spec.models` entries
//! as server-side apply merges a map list. From cached Nodes, NodeAgents
//! and Models to the entries each Model writes under its own field manager,
//! Model statuses, events and finalizer patches. A second pass over the
//! written objects writes nothing; losing a Node moves its replica; a Model
//! naming a missing BatchPolicy gets a condition and an event naming it; a
//! deleted Model is unassigned before its finalizer goes; a stale agent is
//! marked and gets no work; an ensemble is weighted at once, then each
//! interval or when a member's availability changes. Drains are in
//! `drain_mock.rs`.

mod mock_api;

use std::sync::Arc;

use http::Method;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher;
use mock_api::*;
use serde_json::{Value, json};
use weir_crds::{Model, ModelEnsemble, NodeAgent};
use weir_operator::controller::{model, node_agent};

#[tokio::test]
async fn models_are_placed_written_explained_and_then_hold_still() {
    let names = ["gpu-1", "gpu-2", "gpu-3"];
    let nodes: Vec<Node> = names.map(node).to_vec();
    let agents: Vec<NodeAgent> = names.map(|n| agent(n, json!([]))).to_vec();
    let models = vec![
        model("llama", 2, None),
        model("mistral", 2, None),
        model("broken", 1, Some("missing-policy")),
    ];
    let (client, calls, stored) = server(seed(&models, &agents), None);
    let (mut world, caches) = World::new(&models, &agents, &nodes);
    let ctx = context(client, caches);

    reconcile_models(&ctx, &models).await;
    let first = take(&calls);
    let llama = assigned_to(&first, "llama");
    assert_eq!(llama.len(), 2, "two replicas on two agents: {first:#?}");
    assert!(
        llama.iter().all(|(_, m)| m == "weir-operator/ml/llama"),
        "{llama:?}"
    );
    assert_eq!(agents_of(&first, "mistral").len(), 2);
    assert!(agents_of(&first, "broken").is_empty());
    // Each Model wrote only its own entry.
    for c in first.iter().filter(|c| c.path.contains("/nodeagents/")) {
        assert!(
            c.body["spec"]["models"]
                .as_array()
                .is_none_or(|m| m.len() == 1),
            "{c:?}"
        );
    }
    // Some agent serves both, and the server holds both entries.
    let both = names
        .iter()
        .find(|n| {
            agents_of(&first, "llama").contains(&n.to_string())
                && agents_of(&first, "mistral").contains(&n.to_string())
        })
        .expect("two replicas each on three nodes share one");
    assert_eq!(
        stored.lock().unwrap()[&agent_path(both)]["spec"]["models"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let status = |name: &str| {
        first
            .iter()
            .rev()
            .find(|c| c.path == format!("{}/status", model_path(name)))
            .map(|c| c.body["status"].clone())
            .unwrap_or_else(|| panic!("no status written for {name}"))
    };
    assert_eq!(status("llama")["desiredReplicas"], 2);
    let mut status_nodes: Vec<String> =
        serde_json::from_value(status("llama")["nodes"].clone()).unwrap();
    status_nodes.sort();
    assert_eq!(status_nodes, agents_of(&first, "llama"));
    let condition = &status("broken")["conditions"][0];
    assert_eq!(condition["reason"], "PolicyNotFound");
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .contains("missing-policy")
    );
    let missing = events(&first, "PolicyNotFound");
    assert!(
        missing.iter().any(|e| e.body["note"]
            .as_str()
            .unwrap_or_default()
            .contains("missing-policy")
            && e.body["regarding"]["name"] == "broken"),
        "{missing:#?}"
    );
    assert_eq!(events(&first, "Assigned").len(), 4);
    assert_eq!(events(&first, "Placed").len(), 2);

    // The same world with the written specs: no NodeAgent is written again.
    world.sync_agents(&stored, &names);
    reconcile_models(&ctx, &models).await;
    let second = take(&calls);
    assert!(
        !second.iter().any(|c| c.path.contains("/nodeagents/")),
        "{second:#?}"
    );

    // Lose a node: its replica moves to the one that had none, and the
    // lost node's entry is taken off.
    let placed = agents_of(&first, "llama");
    let lost = placed[0].clone();
    let spare = names
        .into_iter()
        .find(|n| !placed.iter().any(|p| p == n))
        .unwrap();
    world
        .nodes
        .apply_watcher_event(&watcher::Event::Delete(node(&lost)));
    reconcile_models(&ctx, &models[..1]).await;
    let third = take(&calls);
    assert_eq!(
        agents_of(&third, "llama"),
        vec![spare.to_owned()],
        "{third:#?}"
    );
    let removal = third
        .iter()
        .find(|c| c.path == agent_path(&lost))
        .expect("the lost node's entry is removed");
    assert!(
        removal.body.get("spec").is_none() && removal.query.contains("llama"),
        "{removal:?}"
    );
    let on_lost = stored.lock().unwrap()[&agent_path(&lost)]["spec"]["models"].clone();
    assert!(
        !on_lost
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["servedName"] == "llama"),
        "{on_lost}"
    );
    assert_eq!(events(&third, "Unassigned").len(), 1);
}

#[tokio::test]
async fn a_new_model_first_gets_the_finalizer() {
    let mut fresh = model("llama", 1, None);
    fresh.metadata.finalizers = None;
    let agents = vec![agent("gpu-1", json!([]))];
    let (client, calls, _) = server(seed(std::slice::from_ref(&fresh), &agents), None);
    let (_world, caches) = World::new(std::slice::from_ref(&fresh), &agents, &[node("gpu-1")]);
    reconcile_models(&context(client, caches), std::slice::from_ref(&fresh)).await;
    let calls = take(&calls);
    let patch = calls
        .iter()
        .find(|c| c.method == Method::PATCH && c.path == model_path("llama"))
        .expect("a finalizer patch");
    assert!(
        patch.body.to_string().contains("weir.dev/unassign"),
        "{patch:?}"
    );
    assert!(
        !calls.iter().any(|c| c.path.contains("/nodeagents/")),
        "nothing placed before the finalizer is on"
    );
}

fn deleted(mut m: Model) -> Model {
    m.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Timestamp::now(),
    ));
    m
}

fn assigned(served: &str) -> Value {
    json!([{"servedName": served, "modelRef": {"namespace": "ml", "name": served},
            "source": {"uri": "file:///models/m"}}])
}

#[tokio::test]
async fn a_deleted_model_is_unassigned_before_its_finalizer_is_released() {
    let agents = vec![agent("gpu-1", assigned("llama")), agent("gpu-2", json!([]))];
    let models = vec![deleted(model("llama", 1, None))];
    let (client, calls, stored) = server(seed(&models, &agents), None);
    let (_world, caches) = World::new(&models, &agents, &["gpu-1", "gpu-2"].map(node));
    reconcile_models(&context(client, caches), &models).await;
    let calls = take(&calls);
    let unassign = calls
        .iter()
        .position(|c| c.path == agent_path("gpu-1"))
        .expect("gpu-1 written");
    assert!(
        calls[unassign].body.get("spec").is_none(),
        "{:?}",
        calls[unassign]
    );
    assert_eq!(
        stored.lock().unwrap()[&agent_path("gpu-1")]["spec"]["models"],
        json!([])
    );
    assert!(
        !calls.iter().any(|c| c.path == agent_path("gpu-2")),
        "an agent without it is not written"
    );
    let event = calls
        .iter()
        .position(|c| {
            c.path.ends_with("/events")
                && c.body["reason"] == "Unassigned"
                && c.body["regarding"]["kind"] == "Model"
        })
        .expect("an Unassigned event");
    let release = calls
        .iter()
        .position(|c| {
            c.method == Method::PATCH
                && c.path == model_path("llama")
                && c.body.to_string().contains("\"remove\"")
        })
        .expect("the finalizer is removed");
    assert!(unassign < event && event < release, "{calls:#?}");
    assert!(
        !calls
            .iter()
            .any(|c| c.path.ends_with("/models/llama/status")),
        "no status for a deleted Model"
    );
}

#[tokio::test]
async fn a_deleted_model_is_held_while_node_agents_cannot_be_written() {
    let agents = vec![agent("gpu-1", assigned("llama"))];
    let models = vec![deleted(model("llama", 1, None))];
    let (client, calls, _) = server(seed(&models, &agents), Some("/nodeagents/"));
    let (_world, caches) = World::new(&models, &agents, &[node("gpu-1")]);
    let ctx = context(client, caches);
    let result = model::reconcile(Arc::new(models[0].clone()), ctx.clone()).await;
    assert!(
        result.is_err(),
        "the failure goes to the error policy (backoff)"
    );
    let calls = take(&calls);
    assert!(calls.iter().any(|c| c.path == agent_path("gpu-1")));
    assert!(
        !calls.iter().any(|c| c.path == model_path("llama")),
        "the finalizer stays: {calls:#?}"
    );
    let label = weir_operator::metrics::KindLabel {
        kind: "Model".into(),
    };
    assert_eq!(ctx.metrics.reconcile_errors.get_or_create(&label).get(), 1);
}

#[tokio::test]
async fn a_stale_agent_is_marked_and_gets_no_work_until_it_reports_again() {
    let mut stale = agent("gpu-2", json!([]));
    let old = Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(300);
    stale.status.as_mut().unwrap().last_heartbeat_time =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(old));
    let agents = vec![agent("gpu-1", json!([])), stale];
    let models = vec![model("llama", 2, None)];
    let (client, calls, _) = server(seed(&models, &agents), None);
    let (mut world, caches) = World::new(&models, &agents, &["gpu-1", "gpu-2"].map(node));
    let ctx = context(client, caches);
    for a in &agents {
        node_agent::reconcile(Arc::new(a.clone()), ctx.clone())
            .await
            .unwrap();
    }
    reconcile_models(&ctx, &models).await;
    let first = take(&calls);
    let mark = first
        .iter()
        .find(|c| c.path == format!("{}/status", agent_path("gpu-2")))
        .expect("the stale agent is marked");
    let condition = &mark.body["status"]["conditions"][0];
    assert_eq!(
        (&condition["type"], &condition["status"]),
        (&json!("Heartbeat"), &json!("False"))
    );
    assert_eq!(condition["reason"], "HeartbeatStale");
    assert_eq!(events(&first, "HeartbeatStale").len(), 1);
    assert!(
        !first
            .iter()
            .any(|c| c.path == format!("{}/status", agent_path("gpu-1"))),
        "a healthy agent is not written"
    );
    assert_eq!(
        agents_of(&first, "llama"),
        ["gpu-1"],
        "no work for the stale agent"
    );

    // It reports again: the mark is cleared.
    let mut back = agent("gpu-2", json!([]));
    let marked: weir_crds::common::CommonStatus =
        serde_json::from_value(json!({"conditions": [condition.clone()]})).unwrap();
    back.status
        .as_mut()
        .unwrap()
        .common
        .conditions
        .extend(marked.conditions);
    world.set_agent(back.clone());
    node_agent::reconcile(Arc::new(back), ctx.clone())
        .await
        .unwrap();
    let second = take(&calls);
    let cleared = second
        .iter()
        .find(|c| c.path == format!("{}/status", agent_path("gpu-2")))
        .expect("the mark is cleared");
    assert_eq!(cleared.body["status"]["conditions"][0]["status"], "True");
}

fn ready(mut m: Model, replicas: u32) -> Model {
    m.status = Some(
        serde_json::from_value(json!({"readyReplicas": replicas, "desiredReplicas": 1})).unwrap(),
    );
    m
}

/// The status write to `path` among `calls`.
fn status_write<'a>(calls: &'a [Call], path: &str) -> &'a Call {
    calls
        .iter()
        .find(|c| c.path == format!("{path}/status"))
        .expect("a status write")
}

#[tokio::test]
async fn an_ensemble_is_weighted_at_once_then_each_interval_or_when_availability_changes() {
    let models = vec![ready(model("a", 1, None), 1), ready(model("b", 1, None), 1)];
    let ensemble: ModelEnsemble = serde_json::from_value(json!({"apiVersion": "weir.dev/v1alpha1",
        "kind": "ModelEnsemble", "metadata": {"name": "chat", "namespace": "ml", "generation": 1},
        "spec": {"members": [{"name": "first", "modelRef": {"name": "a"}, "weight": 3},
                             {"name": "second", "modelRef": {"name": "b"}, "weight": 1}],
                 "reweighting": {"intervalSeconds": 60}}}))
    .unwrap();
    let path = "/apis/weir.dev/v1alpha1/namespaces/ml/modelensembles/chat".to_owned();
    let (client, calls, stored) = server(
        vec![(path.clone(), serde_json::to_value(&ensemble).unwrap())],
        None,
    );
    let (mut world, caches) = World::new(&models, &[], &[]);
    let ctx = context(client, caches);
    weir_operator::controller::ensemble::reconcile(Arc::new(ensemble.clone()), ctx.clone())
        .await
        .unwrap();
    let first = take(&calls);
    let write = status_write(&first, &path);
    let members = &write.body["status"]["members"];
    assert_eq!(members[0]["weight"], 0.75, "{members}");
    assert_eq!(members[1]["weight"], 0.25);
    assert_eq!(members[0]["available"], true);

    // Within the interval and nothing changed: no write.
    let written: ModelEnsemble =
        serde_json::from_value(stored.lock().unwrap()[&path].clone()).unwrap();
    let action =
        weir_operator::controller::ensemble::reconcile(Arc::new(written.clone()), ctx.clone())
            .await
            .unwrap();
    assert!(take(&calls).is_empty());
    assert!(
        format!("{action:?}").contains("requeue_after: Some"),
        "{action:?}"
    );

    // A member's Model loses its replicas: written at once, unavailable.
    world
        .models
        .apply_watcher_event(&watcher::Event::Apply(ready(model("b", 1, None), 0)));
    weir_operator::controller::ensemble::reconcile(Arc::new(written), ctx.clone())
        .await
        .unwrap();
    let third = take(&calls);
    let write = status_write(&third, &path);
    assert_eq!(write.body["status"]["members"][1]["available"], false);
    assert_eq!(write.body["status"]["members"][1]["weight"], 0.0);
}

#[tokio::test]
async fn a_second_model_asking_for_a_served_name_is_not_placed() {
    let first = model("a", 1, None);
    let mut second = model("b", 1, None);
    second.spec.served_name = Some("a".into());
    let models = vec![first, second];
    let agents = vec![agent("gpu-1", json!([])), agent("gpu-2", json!([]))];
    let (client, calls, _) = server(seed(&models, &agents), None);
    let (_world, caches) = World::new(&models, &agents, &["gpu-1", "gpu-2"].map(node));
    reconcile_models(&context(client, caches), &models).await;
    let calls = take(&calls);
    let writes: Vec<&Call> = calls
        .iter()
        .filter(|c| c.path.contains("/nodeagents/"))
        .collect();
    assert_eq!(
        writes.len(),
        1,
        "only the first Model is placed: {writes:#?}"
    );
    assert!(writes[0].query.contains("%2Fml%2Fa"), "{:?}", writes[0]);
    let status = calls
        .iter()
        .find(|c| c.path == format!("{}/status", model_path("b")))
        .expect("b's status");
    let condition = &status.body["status"]["conditions"][0];
    assert_eq!(condition["reason"], "ServedNameConflict");
    assert!(condition["message"].as_str().unwrap().contains("ml/a"));
}

fn batch_policy(finalizer: bool, deleting: bool) -> weir_crds::BatchPolicy {
    let mut p: weir_crds::BatchPolicy = serde_json::from_value(json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "BatchPolicy",
        "metadata": {"name": "fast", "namespace": "ml", "uid": "uid-fast"}, "spec": {}}))
    .unwrap();
    if finalizer {
        p.metadata.finalizers = Some(vec!["weir.dev/in-use".into()]);
    }
    if deleting {
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::now(),
        ));
    }
    p
}

#[tokio::test]
async fn a_policy_in_use_is_counted_and_its_deletion_held_until_no_model_names_it() {
    use weir_operator::controller::policy;
    let path = "/apis/weir.dev/v1alpha1/namespaces/ml/batchpolicies/fast".to_owned();
    let users = vec![
        model("llama", 1, Some("fast")),
        model("mistral", 1, Some("fast")),
    ];
    let seed = |p: &weir_crds::BatchPolicy| vec![(path.clone(), serde_json::to_value(p).unwrap())];

    // A new policy first gets the finalizer, then its count.
    let fresh = batch_policy(false, false);
    let (client, calls, _) = server(seed(&fresh), None);
    let (_world, caches) = World::new(&users, &[], &[]);
    let ctx = context(client, caches);
    policy::reconcile(Arc::new(fresh), ctx.clone())
        .await
        .unwrap();
    let first = take(&calls);
    assert!(
        first[0].body.to_string().contains("weir.dev/in-use"),
        "{first:?}"
    );
    let held = batch_policy(true, false);
    policy::reconcile(Arc::new(held), ctx.clone())
        .await
        .unwrap();
    let second = take(&calls);
    let status = status_write(&second, &path);
    assert_eq!(status.body["status"]["modelCount"], 2);

    // Deleted while two Models name it: held, with an event naming them.
    let deleting = batch_policy(true, true);
    let (client, calls, _) = server(seed(&deleting), None);
    let (mut world, caches) = World::new(&users, &[], &[]);
    let ctx = context(client, caches);
    let result = policy::reconcile(Arc::new(deleting.clone()), ctx.clone()).await;
    assert!(result.is_err(), "held: {result:?}");
    let third = take(&calls);
    assert!(
        !third.iter().any(|c| c.path == path),
        "the finalizer stays: {third:#?}"
    );
    let in_use = events(&third, "InUse");
    assert_eq!(in_use.len(), 1, "{third:#?}");
    let note = in_use[0].body["note"].as_str().unwrap();
    assert!(note.contains("llama") && note.contains("mistral"), "{note}");

    // Once no Model names it, the finalizer goes.
    for m in &users {
        world
            .models
            .apply_watcher_event(&watcher::Event::Delete(m.clone()));
    }
    policy::reconcile(Arc::new(deleting), ctx.clone())
        .await
        .unwrap();
    let fourth = take(&calls);
    let release = fourth
        .iter()
        .find(|c| c.path == path)
        .expect("the finalizer is removed");
    assert!(
        release.body.to_string().contains("\"remove\""),
        "{release:?}"
    );
}

#[tokio::test]
async fn state_of_deleted_objects_is_pruned() {
    let ensemble: ModelEnsemble = serde_json::from_value(json!({"apiVersion": "weir.dev/v1alpha1",
        "kind": "ModelEnsemble", "metadata": {"name": "chat", "namespace": "ml"},
        "spec": {"members": [{"name": "a", "modelRef": {"name": "a"}}]}}))
    .unwrap();
    let path = "/apis/weir.dev/v1alpha1/namespaces/ml/modelensembles/chat".to_owned();
    let (client, _calls, _) = server(vec![(path, serde_json::to_value(&ensemble).unwrap())], None);
    let (_world, caches) = World::new(&[], &[], &[]);
    let ctx = context(client, caches);
    weir_operator::controller::ensemble::reconcile(Arc::new(ensemble.clone()), ctx.clone())
        .await
        .unwrap();
    let failed = Arc::new(model("gone", 1, None));
    let error = weir_operator::controller::Error::InUse(1);
    weir_operator::controller::error_policy(failed, &error, ctx.clone());
    assert_eq!(ctx.tracked().await, (1, 1));
    // Neither the ensemble nor the Model is in the caches: both go.
    ctx.prune().await;
    assert_eq!(ctx.tracked().await, (0, 0));
}
