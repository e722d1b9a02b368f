//! Cluster suite (runs when `KUBECONFIG` names a cluster, e.g. a bare
//! kube-apiserver with no kubelet; skips otherwise). The operator and
//! agents run as local processes, each agent standing for a Node the test
//! creates, whose kubelet stand-in keeps it Ready (so that a
//! controller-manager, if one runs, leaves it alone). Nothing here needs a
//! kubelet, a scheduler or a controller manager: only the API server.
//!
//! - Placement: a Model with two replicas lands on two NodeAgents and
//!   reports two ready replicas; the third agent serves it by forwarding;
//!   deleting a Node moves its replica; an agent that stops is marked
//!   stale (next to its own Ready) and loses its replica; a Model naming a missing
//!   BatchPolicy gets a condition and an event naming it; deleted Models
//!   are unassigned and released by the operator's finalizer.
//! - Ensembles: traffic splits by weight, and reweighting moves weight
//!   away from the slower member.
//! - Autoscaling: a sustained queue scales a Model up to its max, never
//!   beyond, and back down to its min when the load stops.
//! - Two operators: only the Lease holder writes; when it stops, the other
//!   takes over. Two Models on one NodeAgent each own their entry (a field
//!   manager per Model); deleting one takes off its entry only.

#[allow(dead_code)] // each suite binary uses its own part of the harness
mod cluster_support;

use std::collections::BTreeMap;
use std::time::Duration;

use cluster_support::{Cluster, chat, until};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use weir_crds::{ModelEnsemble, NodeAgent};
use weir_engine::testmodel::TinyModelSpec;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_places_routes_and_moves_replicas() {
    let Some(mut cluster) = Cluster::start("place", 3).await else {
        return;
    };
    let uri = cluster.tiny("tiny", &TinyModelSpec::llama());
    let _operator = cluster.operator("only");
    cluster.start_agents();
    let name = format!("e2e-{}", cluster.tag);
    let models = cluster
        .model(
            &name,
            json!({"source": {"uri": uri}, "replicas": {"min": 2, "max": 2}}),
        )
        .await;
    let placed = cluster.ready(&name, 2, Duration::from_secs(120)).await;
    let agent_api: Api<NodeAgent> = Api::all(cluster.client.clone());
    for n in &placed {
        let a = agent_api.get(n).await.unwrap();
        assert!(a.spec.models.iter().any(|m| m.served_name == name));
    }
    // The third agent forwards.
    let third = cluster
        .nodes
        .iter()
        .position(|n| !placed.contains(n))
        .unwrap();
    until(
        "the third agent to forward",
        Duration::from_secs(60),
        async || (chat(&cluster.urls[third], &name, "hi", 3).await.0 == 200).then_some(()),
    )
    .await;

    // Lose a node: its replica moves to the third one.
    let lost = placed[0].clone();
    let lost_index = cluster.nodes.iter().position(|n| *n == lost).unwrap();
    cluster.agents[lost_index] = None;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    nodes.delete(&lost, &DeleteParams::default()).await.unwrap();
    let spare = cluster.nodes[third].clone();
    until(
        "the replica to move",
        Duration::from_secs(180),
        async || {
            let s = models.get(&name).await.ok()?.status?;
            (s.ready_replicas == 2 && !s.nodes.contains(&lost) && s.nodes.contains(&spare))
                .then_some(())
        },
    )
    .await;
    let on_lost = agent_api.get_opt(&lost).await.unwrap();
    assert!(
        on_lost.is_none_or(|a| !a.spec.models.iter().any(|m| m.served_name == name)),
        "the lost node's entry is taken off"
    );

    silence_an_agent(&mut cluster, &name, &[&lost, &spare]).await;
    let broken = a_missing_policy_is_named(&cluster).await;

    // Deleting Models: the operator unassigns them, then releases them.
    cluster.cleanup(&[&name, &broken]).await;
    for n in &placed {
        if let Ok(a) = agent_api.get(n).await {
            assert!(!a.spec.models.iter().any(|m| m.served_name == name));
        }
    }
}

/// An agent that stops without its Node going: once its heartbeat is
/// stale the operator marks it (a condition only the operator owns, next to
/// the agent's own Ready) and takes its replica of `name` away.
async fn silence_an_agent(cluster: &mut Cluster, name: &str, others: &[&String]) {
    let agent_api: Api<NodeAgent> = Api::all(cluster.client.clone());
    let models: Api<weir_crds::Model> = Api::namespaced(cluster.client.clone(), "default");
    let silent = cluster
        .nodes
        .iter()
        .position(|n| !others.contains(&n))
        .unwrap();
    let silent_name = cluster.nodes[silent].clone();
    cluster.agents[silent] = None;
    let agent = until(
        "the stale agent to be marked",
        Duration::from_secs(120),
        async || {
            let a = agent_api.get(&silent_name).await.ok()?;
            let conditions = &a.status.as_ref()?.common.conditions;
            conditions
                .iter()
                .any(|c| {
                    c.type_ == "Heartbeat" && c.status == "False" && c.reason == "HeartbeatStale"
                })
                .then_some(a)
        },
    )
    .await;
    let conditions = &agent.status.as_ref().unwrap().common.conditions;
    assert!(
        conditions.iter().any(|c| c.type_ == "Ready"),
        "the agent's own condition stays: {conditions:?}"
    );
    until(
        "the stale agent's replica to go",
        Duration::from_secs(60),
        async || {
            let s = models.get(name).await.ok()?.status?;
            (!s.nodes.contains(&silent_name) && s.ready_replicas == 1).then_some(())
        },
    )
    .await;
}

/// A Model naming a missing BatchPolicy: a condition and an event name
/// it. Returns the Model's name.
async fn a_missing_policy_is_named(cluster: &Cluster) -> String {
    let models: Api<weir_crds::Model> = Api::namespaced(cluster.client.clone(), "default");
    let broken = format!("e2e-broken-{}", cluster.tag);
    cluster
        .model(&broken, json!({"source": {"uri": "file:///nowhere"}, "batchPolicyRef": {"name": "does-not-exist"}}))
        .await;
    until(
        "a PolicyNotFound condition",
        Duration::from_secs(60),
        async || {
            let s = models.get(&broken).await.ok()?.status?;
            let c = s.common.conditions.iter().find(|c| c.type_ == "Ready")?;
            (c.reason == "PolicyNotFound" && c.message.contains("does-not-exist")).then_some(())
        },
    )
    .await;
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), "default");
    until(
        "an event naming the policy",
        Duration::from_secs(30),
        async || {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.note
                        .as_deref()
                        .is_some_and(|m| m.contains("does-not-exist"))
                })
                .then_some(())
        },
    )
    .await;

    broken
}

/// Member shares of `count` requests to `ensemble` through `url`.
async fn split(url: &str, ensemble: &str, count: usize) -> BTreeMap<String, f64> {
    let mut counts: BTreeMap<String, f64> = BTreeMap::new();
    for i in 0..count {
        let (status, member) = chat(url, ensemble, &format!("question number {i}"), 4).await;
        assert_eq!(status, 200, "request {i} to {ensemble}");
        *counts
            .entry(member.expect("the member header"))
            .or_default() += 1.0;
    }
    counts.values_mut().for_each(|c| *c /= count as f64);
    counts
}

fn weights(e: &ModelEnsemble) -> BTreeMap<String, f64> {
    e.status
        .iter()
        .flat_map(|s| &s.members)
        .map(|m| (m.name.clone(), m.weight))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensembles_split_by_weight_and_reweighting_avoids_the_slow_member() {
    let Some(mut cluster) = Cluster::start("ensemble", 3).await else {
        return;
    };
    let fast_uri = cluster.tiny("fast", &TinyModelSpec::llama());
    // Sixteen times the parameters per layer, twice the layers: slower.
    let slow_uri = cluster.tiny("slow", &TinyModelSpec::small());
    let _operator = cluster.operator("only");
    cluster.start_agents();
    let (fast, slow) = (
        format!("fast-{}", cluster.tag),
        format!("slow-{}", cluster.tag),
    );
    for (name, uri) in [(&fast, &fast_uri), (&slow, &slow_uri)] {
        cluster
            .model(
                name,
                json!({"source": {"uri": uri}, "replicas": {"min": 1, "max": 1}}),
            )
            .await;
    }
    cluster.ready(&fast, 1, Duration::from_secs(120)).await;
    cluster.ready(&slow, 1, Duration::from_secs(120)).await;

    let name = format!("chat-{}", cluster.tag);
    let ensembles: Api<ModelEnsemble> = Api::namespaced(cluster.client.clone(), "default");
    let ensemble: ModelEnsemble = serde_json::from_value(json!({"apiVersion": "weir.dev/v1alpha1",
        "kind": "ModelEnsemble", "metadata": {"name": name, "namespace": "default"},
        "spec": {"strategy": "Weighted", "members": [
            {"name": "fast", "modelRef": {"name": fast}, "weight": 1},
            {"name": "slow", "modelRef": {"name": slow}, "weight": 3}]}}))
    .unwrap();
    ensembles
        .create(&PostParams::default(), &ensemble)
        .await
        .unwrap();
    until(
        "the ensemble's members to be available",
        Duration::from_secs(90),
        async || {
            let e = ensembles.get(&name).await.ok()?;
            e.status?.members.iter().all(|m| m.available).then_some(())
        },
    )
    .await;

    // Without reweighting, traffic splits by the configured weights (1:3).
    let url = cluster.urls[0].clone();
    until(
        "the agents to learn the ensemble",
        Duration::from_secs(60),
        async || (chat(&url, &name, "hello", 2).await.0 == 200).then_some(()),
    )
    .await;
    let shares = split(&url, &name, 120).await;
    eprintln!("configured 1:3, traffic split {shares:?}");
    let slow_share = shares.get("slow").copied().unwrap_or(0.0);
    assert!((slow_share - 0.75).abs() < 0.13, "{shares:?}");

    reweighting_moves_weight_off_the_slow_member(&ensembles, &name, [&fast, &slow], &url).await;

    ensembles
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    cluster.cleanup(&[&fast, &slow]).await;
}

/// Equal weights with reweighting on latency: weight moves away from the
/// slow member (from the 3/4 it holds towards 1/(1 + r) for a latency
/// ratio r), and agents route by the new weights.
async fn reweighting_moves_weight_off_the_slow_member(
    ensembles: &Api<ModelEnsemble>,
    name: &str,
    [fast, slow]: [&String; 2],
    url: &str,
) {
    let patch = json!({"spec": {"members": [
            {"name": "fast", "modelRef": {"name": fast}, "weight": 1},
            {"name": "slow", "modelRef": {"name": slow}, "weight": 1}],
        "reweighting": {"objective": "Latency", "intervalSeconds": 5, "minWeight": 0.05, "maxStep": 0.3}}});
    ensembles
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let traffic = {
        let (url, name) = (url.to_owned(), name.to_owned());
        tokio::spawn(async move {
            for i in 0.. {
                chat(&url, &name, &format!("load {i}"), 16).await;
            }
        })
    };
    let moved = until(
        "weight to move off the slow member",
        Duration::from_secs(150),
        async || {
            let e = ensembles.get(name).await.ok()?;
            let w = weights(&e);
            let members = e.status?.members;
            (w.get("slow").copied()? < 0.45).then_some((w, members))
        },
    )
    .await;
    traffic.abort();
    // Without traffic the weights hold still. Agents re-read ensembles
    // every 3 s and expose no version of what they route by, so there is
    // no condition to wait on: give them two refreshes. A lagging agent
    // fails the split check below; it cannot make it pass.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let e = ensembles.get(name).await.unwrap();
    let members = &e.status.as_ref().unwrap().members;
    let latency = |m: &str| {
        members
            .iter()
            .find(|x| x.name == m)
            .and_then(|x| x.latency_p50_ms)
    };
    assert!(
        latency("slow") > latency("fast"),
        "the figures behind it: {members:?}"
    );
    let settled = weights(&e);
    // Agents route by the new weights.
    let after = split(url, name, 100).await;
    eprintln!("weights {moved:?}, then {settled:?} from {members:?}; traffic split {after:?}");
    let slow_after = after.get("slow").copied().unwrap_or(0.0);
    assert!(
        (slow_after - settled["slow"]).abs() < 0.13,
        "weights {settled:?}, split {after:?}"
    );
    assert!(weights(&ensembles.get(name).await.unwrap())["slow"] < 0.45);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sustained_queue_scales_up_to_max_and_back_down_to_min() {
    let Some(mut cluster) = Cluster::start("scale", 3).await else {
        return;
    };
    let uri = cluster.tiny("tiny", &TinyModelSpec::small());
    let _operator = cluster.operator("only");
    cluster.start_agents();
    let batches: Api<weir_crds::BatchPolicy> = Api::namespaced(cluster.client.clone(), "default");
    let policy = format!("one-at-a-time-{}", cluster.tag);
    let one: weir_crds::BatchPolicy =
        serde_json::from_value(json!({"apiVersion": "weir.dev/v1alpha1",
        "kind": "BatchPolicy", "metadata": {"name": policy, "namespace": "default"},
        "spec": {"maxNumSeqs": 1, "adaptive": {"enabled": false}}}))
        .unwrap();
    batches.create(&PostParams::default(), &one).await.unwrap();
    let name = format!("scaled-{}", cluster.tag);
    let models = cluster
        .model(
            &name,
            json!({"source": {"uri": uri}, "batchPolicyRef": {"name": policy},
            "replicas": {"min": 1, "max": 2, "metric": "QueueDepth", "targetQueueDepth": 1,
                         "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 20}}),
        )
        .await;
    cluster.ready(&name, 1, Duration::from_secs(120)).await;

    // Twelve clients at once against one-sequence batches: a queue of ~11.
    let load: Vec<_> = (0..12)
        .map(|c| {
            let (url, name) = (cluster.urls[c % 3].clone(), name.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    chat(&url, &name, &format!("client {c} asks {i}"), 32).await;
                }
            })
        })
        .collect();
    let within = |s: &weir_crds::model::ModelStatus| {
        assert!(
            (1..=2).contains(&s.desired_replicas),
            "desired {} outside [1, 2]",
            s.desired_replicas
        );
        assert!(s.nodes.len() <= 2, "{:?}", s.nodes);
    };
    let started = std::time::Instant::now();
    until(
        "scale-up to two replicas",
        Duration::from_secs(90),
        async || {
            let s = models.get(&name).await.ok()?.status?;
            within(&s);
            (s.desired_replicas == 2 && s.ready_replicas == 2).then_some(())
        },
    )
    .await;
    eprintln!(
        "two ready replicas {:?} after the load began",
        started.elapsed()
    );
    // Load goes on: never beyond max.
    for _ in 0..10 {
        within(&models.get(&name).await.unwrap().status.unwrap());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    load.iter().for_each(|t| t.abort());
    let stopped = std::time::Instant::now();
    until(
        "scale-down to one replica",
        Duration::from_secs(120),
        async || {
            let s = models.get(&name).await.ok()?.status?;
            within(&s);
            (s.desired_replicas == 1 && s.nodes.len() == 1).then_some(())
        },
    )
    .await;

    eprintln!(
        "one replica {:?} after the load stopped (window 20 s)",
        stopped.elapsed()
    );
    policy_deletion_waits_for_its_models(cluster, &policy, &name).await;
}

/// Deleting a BatchPolicy that `model` names is held (finalizer and an
/// `InUse` event) until the Model goes; then the policy goes too.
async fn policy_deletion_waits_for_its_models(cluster: Cluster, policy: &str, model: &str) {
    let batches: Api<weir_crds::BatchPolicy> = Api::namespaced(cluster.client.clone(), "default");
    batches
        .delete(policy, &DeleteParams::default())
        .await
        .unwrap();
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), "default");
    until("an InUse event", Duration::from_secs(30), async || {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("InUse")
                    && e.note.as_deref().is_some_and(|n| n.contains(model))
            })
            .then_some(())
    })
    .await;
    let held = batches.get(policy).await.unwrap();
    assert!(
        held.metadata.deletion_timestamp.is_some(),
        "held while in use"
    );
    cluster.cleanup(&[model]).await;
    until("the policy to go", Duration::from_secs(60), async || {
        batches.get_opt(policy).await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_a_standby_takes_over() {
    let Some(mut cluster) = Cluster::start("leader", 2).await else {
        return;
    };
    let uri = cluster.tiny("tiny", &TinyModelSpec::llama());
    let mut operators = [
        Some(cluster.operator("first")),
        Some(cluster.operator("second")),
    ];
    cluster.start_agents();
    let leader = until("one leader", Duration::from_secs(60), async || {
        let mut leading = Vec::new();
        for (i, o) in operators.iter().enumerate() {
            leading.push((i, o.as_ref()?.metric("weir_operator_leader").await?));
        }
        let leaders: Vec<usize> = leading
            .iter()
            .filter(|(_, v)| *v == 1.0)
            .map(|(i, _)| *i)
            .collect();
        (leaders.len() == 1 && leading.len() == 2).then(|| leaders[0])
    })
    .await;
    let standby = 1 - leader;
    let first = format!("first-{}", cluster.tag);
    cluster
        .model(
            &first,
            json!({"source": {"uri": uri}, "replicas": {"min": 1, "max": 1}}),
        )
        .await;
    cluster.ready(&first, 1, Duration::from_secs(120)).await;
    let writes = "weir_operator_writes_total{kind=\"Model\"}";
    let reconciles = "weir_operator_reconciles_total{kind=\"Model\"}";
    let (l, s) = (
        operators[leader].as_ref().unwrap(),
        operators[standby].as_ref().unwrap(),
    );
    assert!(l.metric(writes).await.unwrap_or(0.0) >= 1.0);
    assert_eq!(
        s.metric(writes).await.unwrap_or(0.0),
        0.0,
        "the standby wrote"
    );
    assert_eq!(
        s.metric(reconciles).await.unwrap_or(0.0),
        0.0,
        "the standby reconciled"
    );

    // The leader stops: the standby takes the Lease and places new work.
    operators[leader] = None;
    let s = operators[standby].as_ref().unwrap();
    until("the standby to lead", Duration::from_secs(60), async || {
        (s.metric("weir_operator_leader").await? == 1.0).then_some(())
    })
    .await;
    // Two replicas on the two nodes: each NodeAgent carries both Models'
    // entries, each applied under its Model's own field manager.
    let second = format!("second-{}", cluster.tag);
    cluster
        .model(
            &second,
            json!({"source": {"uri": uri}, "replicas": {"min": 2, "max": 2}}),
        )
        .await;
    cluster.ready(&second, 2, Duration::from_secs(120)).await;
    assert!(s.metric(writes).await.unwrap_or(0.0) >= 1.0);
    each_model_owns_its_entry(&cluster, &first, &second).await;
    cluster.cleanup(&[&first, &second]).await;
}

/// `first` (one replica) and `second` (a replica on every node) share a
/// NodeAgent, each entry under its Model's own field manager; deleting
/// `first` takes off its entry only.
async fn each_model_owns_its_entry(cluster: &Cluster, first: &str, second: &str) {
    let agents: Api<NodeAgent> = Api::all(cluster.client.clone());
    let served = |a: &NodeAgent| -> Vec<String> {
        let mut v: Vec<String> = a
            .spec
            .models
            .iter()
            .map(|m| m.served_name.clone())
            .collect();
        v.sort();
        v
    };
    let holder = cluster.ready(first, 1, Duration::from_secs(10)).await[0].clone();
    let both = agents.get(&holder).await.unwrap();
    assert_eq!(served(&both), [first.to_owned(), second.to_owned()]);
    let managers: Vec<String> = both
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|f| f.manager.clone())
        .collect();
    for m in [first, second] {
        let manager = format!("weir-operator/default/{m}");
        assert!(managers.contains(&manager), "{manager} in {managers:?}");
    }
    // Deleting one Model takes off its entry only.
    let models: Api<weir_crds::Model> = Api::namespaced(cluster.client.clone(), "default");
    models
        .delete(first, &DeleteParams::default())
        .await
        .unwrap();
    until(
        "the first Model's entry to go",
        Duration::from_secs(60),
        async || {
            let a = agents.get(&holder).await.ok()?;
            (served(&a) == [second.to_owned()]).then_some(())
        },
    )
    .await;
}
