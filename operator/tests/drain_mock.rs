//! A drain against the mocked API server: annotating a NodeAgent with
//! `weir.dev/drain` assigns the replacement first, keeps the old entry
//! while the replacement loads, removes it once the replacement's agent
//! reports the model Ready; the NodeAgent's `Drained` condition (under the
//! `weir-operator/drain` field manager, beside the agent's own `Ready`)
//! and the `DrainStarted`, `Drained` and `DrainEnded` events follow it.

mod mock_api;

use std::sync::Arc;

use mock_api::*;
use serde_json::{Value, json};
use weir_crds::NodeAgent;
use weir_operator::controller::node_agent;

fn assigned(served: &str) -> Value {
    json!([{"servedName": served, "modelRef": {"namespace": "ml", "name": served},
            "source": {"uri": "file:///models/m"}}])
}

/// The status write to `path` among `calls`.
fn status_write<'a>(calls: &'a [Call], path: &str) -> &'a Call {
    calls
        .iter()
        .find(|c| c.path == format!("{path}/status"))
        .expect("a status write")
}

/// Sets what the agent of `name` reports for `served` in the stored
/// object (its heartbeat), and caches the agents as stored.
fn report(stored: &Objects, world: &mut World, name: &str, served: &str, phase: &str) {
    stored.lock().unwrap().get_mut(&agent_path(name)).unwrap()["status"]["models"] =
        json!([{"servedName": served, "phase": phase}]);
    world.sync_agents(stored, &["gpu-1", "gpu-2", "gpu-3"]);
}

fn writes_to<'a>(calls: &'a [Call], name: &str) -> Vec<&'a Call> {
    calls
        .iter()
        .filter(|c| c.path == agent_path(name))
        .collect()
}

/// The Drained condition the `weir-operator/drain` manager applied, if any
/// status write of `calls` did.
fn drained_condition(calls: &[Call], name: &str) -> Option<Value> {
    let write = calls.iter().find(|c| {
        c.path == format!("{}/status", agent_path(name))
            && c.query.contains("weir-operator%2Fdrain")
    })?;
    Some(write.body["status"]["conditions"][0].clone())
}

fn stored_agent(stored: &Objects, name: &str) -> NodeAgent {
    serde_json::from_value(stored.lock().unwrap()[&agent_path(name)].clone()).unwrap()
}

#[tokio::test]
async fn a_drain_moves_the_replica_make_before_break_and_is_reported() {
    let names = ["gpu-1", "gpu-2", "gpu-3"];
    let mut drained = agent("gpu-1", assigned("llama"));
    drained.metadata.annotations = Some([("weir.dev/drain".to_owned(), "true".to_owned())].into());
    drained.status.as_mut().unwrap().models =
        serde_json::from_value(json!([{"servedName": "llama", "phase": "Ready"}])).unwrap();
    let agents = vec![
        drained,
        agent("gpu-2", json!([])),
        agent("gpu-3", json!([])),
    ];
    let models = vec![model("llama", 1, None)];
    let (client, calls, stored) = server(seed(&models, &agents), None);
    let (mut world, caches) = World::new(&models, &agents, &names.map(node));
    let ctx = context(client, caches);

    // The drain is reported at once, under a field manager of its own.
    node_agent::reconcile(Arc::new(agents[0].clone()), ctx.clone())
        .await
        .unwrap();
    let started = take(&calls);
    let condition = drained_condition(&started, "gpu-1").expect("a Drained condition");
    assert_eq!(
        (&condition["status"], &condition["reason"]),
        (&json!("False"), &json!("Draining"))
    );
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .contains("1 replica(s) left (llama)")
    );
    assert_eq!(events(&started, "DrainStarted").len(), 1, "{started:#?}");
    let status = stored_agent(&stored, "gpu-1").status.unwrap();
    let types: Vec<&str> = status
        .common
        .conditions
        .iter()
        .map(|c| c.type_.as_str())
        .collect();
    assert_eq!(types, ["Ready", "Drained"], "the agent's own Ready stays");

    // Make: the replacement is assigned, the old entry is not touched.
    reconcile_models(&ctx, &models).await;
    let first = take(&calls);
    assert_eq!(agents_of(&first, "llama"), ["gpu-2"], "{first:#?}");
    assert!(writes_to(&first, "gpu-1").is_empty(), "{first:#?}");
    let model_status = status_write(&first, &model_path("llama"));
    let message = model_status.body["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap();
    assert!(
        message.contains("moving off gpu-1 (node gpu-1 is draining)"),
        "{message}"
    );

    // The replacement loads: the old one stays.
    world.sync_agents(&stored, &names);
    report(&stored, &mut world, "gpu-2", "llama", "Loading");
    reconcile_models(&ctx, &models).await;
    let loading = take(&calls);
    assert!(writes_to(&loading, "gpu-1").is_empty(), "{loading:#?}");
    assert!(
        stored_agent(&stored, "gpu-1")
            .spec
            .models
            .iter()
            .any(|m| m.served_name == "llama")
    );

    // Break: once the replacement reports Ready, the old entry goes.
    report(&stored, &mut world, "gpu-2", "llama", "Ready");
    reconcile_models(&ctx, &models).await;
    let ready = take(&calls);
    let removal = writes_to(&ready, "gpu-1");
    assert_eq!(removal.len(), 1, "{ready:#?}");
    assert!(removal[0].body.get("spec").is_none(), "{:?}", removal[0]);
    assert!(stored_agent(&stored, "gpu-1").spec.models.is_empty());
    assert!(
        writes_to(&ready, "gpu-2").is_empty(),
        "the replacement stays as it is"
    );
    assert_eq!(events(&ready, "Unassigned").len(), 1);

    // The node holds no replica: the drain is finished.
    world.sync_agents(&stored, &names);
    let gpu1 = stored_agent(&stored, "gpu-1");
    node_agent::reconcile(Arc::new(gpu1.clone()), ctx.clone())
        .await
        .unwrap();
    let finished = take(&calls);
    let condition = drained_condition(&finished, "gpu-1").expect("Drained=True");
    assert_eq!(
        (&condition["status"], &condition["reason"]),
        (&json!("True"), &json!("Drained"))
    );
    assert_eq!(events(&finished, "Drained").len(), 1);
    // Reconciled again unchanged: nothing is written.
    let gpu1 = stored_agent(&stored, "gpu-1");
    node_agent::reconcile(Arc::new(gpu1.clone()), ctx.clone())
        .await
        .unwrap();
    assert!(take(&calls).is_empty());

    // The annotation goes: so does the condition, and only it.
    let mut undrained = gpu1;
    undrained.metadata.annotations = None;
    node_agent::reconcile(Arc::new(undrained), ctx.clone())
        .await
        .unwrap();
    let ended = take(&calls);
    let clear = ended
        .iter()
        .find(|c| c.query.contains("weir-operator%2Fdrain"))
        .expect("the drain manager applies nothing");
    assert!(
        clear.body["status"].get("conditions").is_none(),
        "{clear:?}"
    );
    assert_eq!(events(&ended, "DrainEnded").len(), 1);
    let status = stored_agent(&stored, "gpu-1").status.unwrap();
    let types: Vec<&str> = status
        .common
        .conditions
        .iter()
        .map(|c| c.type_.as_str())
        .collect();
    assert_eq!(types, ["Ready"]);
}
