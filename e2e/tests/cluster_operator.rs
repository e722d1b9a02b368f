//! Cluster suite (runs when `KUBECONFIG` names a cluster, e.g. a bare
//! kube-apiserver with no kubelet; skips otherwise): the operator and three
//! agents as local processes, each agent standing for a Node the suite
//! creates. A Model with two replicas lands on two NodeAgents and reports
//! two ready replicas; the third agent serves it by forwarding; deleting a
//! Node moves its replica; a Model naming a missing BatchPolicy gets a
//! condition and an event naming it; deleted Models are unassigned and
//! released by the operator's finalizer.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Node};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use weir_crds::{Model, NodeAgent};
use weir_e2e::cluster_client;
use weir_e2e::process::{binary, free_port};
use weir_engine::testmodel::{TinyModelSpec, write_tiny_model};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(name: &str, args: &[String]) -> Proc {
    Proc(
        Command::new(binary(name))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}")),
    )
}

async fn until<T>(what: &str, limit: Duration, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn install_crds(client: &kube::Client) {
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    for crd in weir_crds::all() {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(
            &name,
            &PatchParams::apply("weir-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_places_routes_and_moves_replicas() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds(&client).await;
    let suffix = std::process::id();
    let node_names: Vec<String> = (1..=3).map(|i| format!("weir-e2e-{suffix}-{i}")).collect();
    let nodes: Api<Node> = Api::all(client.clone());
    for name in &node_names {
        let node: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"weir.dev/e2e": suffix.to_string()}}}))
        .unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("tiny");
    write_tiny_model(&model_dir, &TinyModelSpec::llama()).unwrap();

    let _operator = spawn(
        "weir-operator",
        &[
            "run".into(),
            format!("--listen=127.0.0.1:{}", free_port()),
            "--leader-election".into(),
            "--lease-namespace=default".into(),
            format!("--identity=e2e-{suffix}"),
        ],
    );
    let mut agents = Vec::new();
    let mut urls = Vec::new();
    for name in &node_names {
        let port = free_port();
        urls.push(format!("http://127.0.0.1:{port}"));
        agents.push(Some(spawn(
            "weir-agent",
            &[
                "serve".into(),
                "--cluster".into(),
                format!("--listen=127.0.0.1:{port}"),
                format!("--node-name={name}"),
                "--pod-ip=127.0.0.1".into(),
            ],
        )));
    }

    let models: Api<Model> = Api::namespaced(client.clone(), "default");
    let model_name = format!("e2e-{suffix}");
    let model: Model = serde_json::from_value(json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": model_name, "namespace": "default"},
        "spec": {"source": {"uri": format!("file://{}", model_dir.display())}, "resources": {"gpus": 0},
                 "nodeSelector": {"weir.dev/e2e": suffix.to_string()},
                 "replicas": {"min": 2, "max": 2}}}))
    .unwrap();
    models.create(&PostParams::default(), &model).await.unwrap();

    let placed = until("two ready replicas", Duration::from_secs(120), async || {
        let m = models.get(&model_name).await.ok()?;
        let s = m.status?;
        (s.ready_replicas == 2).then_some(s.nodes)
    })
    .await;
    assert_eq!(placed.len(), 2);
    let agent_api: Api<NodeAgent> = Api::all(client.clone());
    for n in &placed {
        let a = agent_api.get(n).await.unwrap();
        assert!(a.spec.models.iter().any(|m| m.served_name == model_name));
    }
    // The third agent forwards.
    let third = node_names.iter().position(|n| !placed.contains(n)).unwrap();
    let answer = until(
        "the third agent to forward",
        Duration::from_secs(60),
        async || {
            let r = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", urls[third]))
            .json(&json!({"model": model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}))
            .send()
            .await
            .ok()?;
            (r.status().as_u16() == 200).then_some(())
        },
    );
    answer.await;

    // Lose a node: its replica moves to the third one.
    let lost = placed[0].clone();
    let lost_index = node_names.iter().position(|n| *n == lost).unwrap();
    agents[lost_index] = None;
    nodes.delete(&lost, &DeleteParams::default()).await.unwrap();
    until(
        "the replica to move",
        Duration::from_secs(180),
        async || {
            let s = models.get(&model_name).await.ok()?.status?;
            (s.ready_replicas == 2
                && !s.nodes.contains(&lost)
                && s.nodes.contains(&node_names[third]))
            .then_some(())
        },
    )
    .await;

    // A missing BatchPolicy: a condition and an event name it.
    let broken = format!("e2e-broken-{suffix}");
    let bad: Model = serde_json::from_value(json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": broken, "namespace": "default"},
        "spec": {"source": {"uri": "file:///nowhere"}, "batchPolicyRef": {"name": "does-not-exist"}}}))
    .unwrap();
    models.create(&PostParams::default(), &bad).await.unwrap();
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
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    until(
        "an event naming the policy",
        Duration::from_secs(30),
        async || {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.message
                        .as_deref()
                        .is_some_and(|m| m.contains("does-not-exist"))
                })
                .then_some(())
        },
    )
    .await;

    // Deleting Models: the operator unassigns them, then releases its
    // finalizer, so they go away.
    for name in [&model_name, &broken] {
        models.delete(name, &DeleteParams::default()).await.unwrap();
    }
    until(
        "deleted Models to be released",
        Duration::from_secs(60),
        async || {
            let gone = models.get_opt(&model_name).await.ok()?.is_none()
                && models.get_opt(&broken).await.ok()?.is_none();
            gone.then_some(())
        },
    )
    .await;
    for n in &placed {
        if let Ok(a) = agent_api.get(n).await {
            assert!(!a.spec.models.iter().any(|m| m.served_name == model_name));
        }
    }
    for name in &node_names {
        let _ = nodes.delete(name, &DeleteParams::default()).await;
        let _ = agent_api.delete(name, &DeleteParams::default()).await;
    }
}
