//! One whole control-loop round against a mocked API server (`tower-test`)
//! that records every call: from cached Nodes, NodeAgents and Models to the
//! NodeAgent specs, Model statuses and events the leader writes. A second
//! round over the written objects writes nothing; losing a Node moves its
//! replica; a Model naming a missing BatchPolicy gets a condition and an
//! event naming it.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tower_test::mock;
use weir_crds::{BatchPolicy, CachePolicy, Model, ModelEnsemble, NodeAgent};
use weir_operator::controller::{Caches, Context, round};
use weir_operator::metrics::OperatorMetrics;

#[derive(Clone, Debug)]
struct Call {
    method: Method,
    path: String,
    body: Value,
}

type Calls = Arc<std::sync::Mutex<Vec<Call>>>;

/// A mock API server that records every call and answers as the API server
/// would: a patch returns the stored object (from `objects`, by path) with
/// the patched top-level fields; anything else returns what was sent.
fn server(objects: Vec<(String, Value)>) -> (kube::Client, Calls) {
    server_failing(objects, None)
}

/// [`server`], answering 500 to every write whose path contains `failing`.
fn server_failing(
    objects: Vec<(String, Value)>,
    failing: Option<&'static str>,
) -> (kube::Client, Calls) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let calls: Calls = Arc::default();
    let log = calls.clone();
    tokio::spawn(async move {
        let mut stored: std::collections::HashMap<String, Value> = objects.into_iter().collect();
        while let Some((req, send)) = handle.next_request().await {
            let (method, path) = (req.method().clone(), req.uri().path().to_owned());
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            log.lock().unwrap().push(Call {
                method: method.clone(),
                path: path.clone(),
                body: body.clone(),
            });
            if failing.is_some_and(|f| path.contains(f)) {
                let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "etcd is unhappy", "reason": "InternalError", "code": 500});
                let response = Response::builder()
                    .status(StatusCode::INTERNAL_SERVER_ERROR)
                    .body(Body::from(serde_json::to_vec(&status).unwrap()))
                    .unwrap();
                send.send_response(response);
                continue;
            }
            let object_path = path.trim_end_matches("/status").to_owned();
            let answer = match (method, stored.get_mut(&object_path)) {
                // A JSON patch (finalizers): applied to the stored object.
                (Method::PATCH, Some(object)) if body.is_array() => {
                    // The API server reads a missing list as null (kube's
                    // finalizer patch tests for that first).
                    let meta = object["metadata"].as_object_mut().unwrap();
                    meta.entry("finalizers").or_insert(Value::Null);
                    let ops: json_patch::Patch = serde_json::from_value(body).unwrap();
                    match json_patch::patch(object, &ops) {
                        Ok(()) => object.clone(),
                        Err(e) => {
                            let status = json!({"kind": "Status", "apiVersion": "v1",
                                "status": "Failure", "message": e.to_string(),
                                "reason": "Invalid", "code": 422});
                            let response = Response::builder()
                                .status(StatusCode::UNPROCESSABLE_ENTITY)
                                .body(Body::from(serde_json::to_vec(&status).unwrap()))
                                .unwrap();
                            send.send_response(response);
                            continue;
                        }
                    }
                }
                // Server-side apply: the sent top-level fields replace ours.
                (Method::PATCH, Some(object)) => {
                    for (k, v) in body.as_object().unwrap() {
                        if k != "metadata" {
                            object[k] = v.clone();
                        }
                    }
                    object.clone()
                }
                _ => body,
            };
            let response = Response::builder()
                .status(StatusCode::OK)
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap();
            send.send_response(response);
        }
    });
    (kube::Client::new(service, "default"), calls)
}

fn seed(models: &[Model], agents: &[NodeAgent]) -> Vec<(String, Value)> {
    let model_paths = models.iter().map(|m| {
        let name = m.metadata.name.clone().unwrap();
        (
            format!("/apis/weir.dev/v1alpha1/namespaces/ml/models/{name}"),
            serde_json::to_value(m).unwrap(),
        )
    });
    let agent_paths = agents.iter().map(|a| {
        let name = a.metadata.name.clone().unwrap();
        (
            format!("/apis/weir.dev/v1alpha1/nodeagents/{name}"),
            serde_json::to_value(a).unwrap(),
        )
    });
    model_paths.chain(agent_paths).collect()
}

fn store<K>(objects: &[K]) -> Store<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, mut writer) = reflector::store::<K>();
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::Apply(o.clone()));
    }
    reader
}

fn node(name: &str) -> Node {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "labels": {"pool": "gpu"}}}))
    .unwrap()
}

fn agent(name: &str, models: Value) -> NodeAgent {
    let now = Timestamp::now().to_string();
    serde_json::from_value(
        json!({"apiVersion": "weir.dev/v1alpha1", "kind": "NodeAgent",
        "metadata": {"name": name},
        "spec": {"nodeName": name, "models": models},
        "status": {"endpoint": null, "lastHeartbeatTime": now,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Heartbeat", "message": "",
                            "lastTransitionTime": now}]}}),
    )
    .unwrap()
}

fn model(name: &str, replicas: u32, batch_policy: Option<&str>) -> Model {
    let mut spec = json!({"source": {"uri": "file:///models/m"}, "resources": {"gpus": 0},
        "nodeSelector": {"pool": "gpu"}, "replicas": {"min": replicas, "max": replicas}});
    if let Some(p) = batch_policy {
        spec["batchPolicyRef"] = json!({"name": p});
    }
    serde_json::from_value(json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": name, "namespace": "ml", "generation": 1, "uid": format!("uid-{name}")},
        "spec": spec}))
    .unwrap()
}

fn context(client: kube::Client) -> Context {
    let metrics = OperatorMetrics::register(&mut prometheus_client::registry::Registry::default());
    Context::new(client, Arc::new(AtomicBool::new(true)), metrics)
}

fn caches(models: &[Model], agents: &[NodeAgent], nodes: &[Node]) -> Caches {
    Caches::from_stores(
        store(models),
        store::<ModelEnsemble>(&[]),
        store::<CachePolicy>(&[]),
        store::<BatchPolicy>(&[]),
        store(agents),
        store(nodes),
    )
}

/// Agents named in NodeAgent spec writes that assign `served`.
fn assigned_to(calls: &[Call], served: &str) -> Vec<String> {
    let mut names: Vec<String> = calls
        .iter()
        .filter(|c| c.method == Method::PATCH && c.path.contains("/nodeagents/"))
        .filter(|c| {
            c.body["spec"]["models"]
                .as_array()
                .is_some_and(|ms| ms.iter().any(|m| m["servedName"] == served))
        })
        .map(|c| c.path.rsplit('/').next().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

fn written_agent(calls: &[Call], name: &str, base: &NodeAgent) -> NodeAgent {
    let mut agent = base.clone();
    if let Some(c) = calls
        .iter()
        .rev()
        .find(|c| c.path.ends_with(&format!("/nodeagents/{name}")))
    {
        agent.spec = serde_json::from_value(c.body["spec"].clone()).unwrap();
    }
    agent
}

#[tokio::test]
async fn a_round_places_writes_explains_and_then_holds_still() {
    let nodes: Vec<Node> = ["gpu-1", "gpu-2", "gpu-3"].map(node).to_vec();
    let agents: Vec<NodeAgent> = ["gpu-1", "gpu-2", "gpu-3"]
        .map(|n| agent(n, json!([])))
        .to_vec();
    let models = vec![
        model("llama", 2, None),
        model("broken", 1, Some("missing-policy")),
    ];
    let (client, calls) = server(seed(&models, &agents));
    let ctx = context(client);

    round(&ctx, &caches(&models, &agents, &nodes)).await;
    let first = calls.lock().unwrap().clone();
    let placed = assigned_to(&first, "llama");
    assert_eq!(placed.len(), 2, "two replicas on two agents: {first:#?}");
    assert!(assigned_to(&first, "broken").is_empty());
    for c in first.iter().filter(|c| c.path.contains("/nodeagents/")) {
        assert!(c.path.starts_with("/apis/weir.dev/v1alpha1/nodeagents/"));
    }
    let status = |name: &str| {
        first
            .iter()
            .rev()
            .find(|c| {
                c.path == format!("/apis/weir.dev/v1alpha1/namespaces/ml/models/{name}/status")
            })
            .map(|c| c.body["status"].clone())
            .unwrap_or_else(|| panic!("no status written for {name}"))
    };
    let llama = status("llama");
    assert_eq!(llama["desiredReplicas"], 2);
    let mut status_nodes: Vec<String> = serde_json::from_value(llama["nodes"].clone()).unwrap();
    status_nodes.sort();
    assert_eq!(status_nodes, placed);
    let broken = status("broken");
    let condition = &broken["conditions"][0];
    assert_eq!(condition["reason"], "PolicyNotFound");
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .contains("missing-policy")
    );
    let events: Vec<&Call> = first
        .iter()
        .filter(|c| c.method == Method::POST && c.path.ends_with("/events"))
        .collect();
    assert!(
        events.iter().any(|e| e.body["reason"] == "PolicyNotFound"
            && e.body["note"]
                .as_str()
                .unwrap_or_default()
                .contains("missing-policy")
            && e.body["regarding"]["name"] == "broken"),
        "{events:#?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.body["reason"] == "Assigned")
            .count(),
        2
    );

    // Each Model got the finalizer that holds it until it is unassigned.
    for name in ["llama", "broken"] {
        let path = format!("/apis/weir.dev/v1alpha1/namespaces/ml/models/{name}");
        let patch = first
            .iter()
            .find(|c| c.method == Method::PATCH && c.path == path)
            .unwrap_or_else(|| panic!("no finalizer patch for {name}"));
        assert!(
            patch.body.to_string().contains("weir.dev/unassign"),
            "{patch:?}"
        );
    }
    let models: Vec<Model> = models
        .into_iter()
        .map(|mut m| {
            m.metadata.finalizers = Some(vec!["weir.dev/unassign".into()]);
            m
        })
        .collect();

    // The same world with the written specs: no NodeAgent is written again.
    let agents: Vec<NodeAgent> = agents
        .iter()
        .map(|a| written_agent(&first, &a.metadata.name.clone().unwrap(), a))
        .collect();
    calls.lock().unwrap().clear();
    round(&ctx, &caches(&models, &agents, &nodes)).await;
    let second = calls.lock().unwrap().clone();
    assert!(
        !second.iter().any(|c| c.path.contains("/nodeagents/")),
        "{second:#?}"
    );

    // Lose a node: its replica moves to the one that had none.
    let lost = placed[0].clone();
    let spare = ["gpu-1", "gpu-2", "gpu-3"]
        .into_iter()
        .find(|n| !placed.iter().any(|p| p == n))
        .unwrap();
    let remaining: Vec<Node> = nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() != Some(lost.as_str()))
        .cloned()
        .collect();
    calls.lock().unwrap().clear();
    round(&ctx, &caches(&models, &agents, &remaining)).await;
    let third = calls.lock().unwrap().clone();
    assert_eq!(
        assigned_to(&third, "llama"),
        vec![spare.to_owned()],
        "{third:#?}"
    );
}

fn deleted(mut m: Model) -> Model {
    m.metadata.finalizers = Some(vec!["weir.dev/unassign".into()]);
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
    let nodes: Vec<Node> = ["gpu-1", "gpu-2"].map(node).to_vec();
    let agents = vec![agent("gpu-1", assigned("llama")), agent("gpu-2", json!([]))];
    let models = vec![deleted(model("llama", 1, None))];
    let (client, calls) = server(seed(&models, &agents));
    round(&context(client), &caches(&models, &agents, &nodes)).await;
    let calls = calls.lock().unwrap().clone();
    let unassign = calls
        .iter()
        .position(|c| c.path.ends_with("/nodeagents/gpu-1"))
        .expect("gpu-1 written");
    assert_eq!(calls[unassign].body["spec"]["models"], json!([]));
    let event = calls
        .iter()
        .position(|c| c.path.ends_with("/events") && c.body["reason"] == "Unassigned")
        .expect("an Unassigned event");
    let release = calls
        .iter()
        .position(|c| {
            c.method == Method::PATCH
                && c.path == "/apis/weir.dev/v1alpha1/namespaces/ml/models/llama"
                && c.body.to_string().contains("\"remove\"")
        })
        .expect("the finalizer is removed");
    assert!(unassign < event && event < release, "{calls:#?}");
    assert!(
        !calls
            .iter()
            .any(|c| c.path.ends_with("/models/llama/status")),
        "no status is written for a deleted Model"
    );
}

#[tokio::test]
async fn a_deleted_model_is_held_while_node_agents_cannot_be_written() {
    let nodes: Vec<Node> = ["gpu-1"].map(node).to_vec();
    let agents = vec![agent("gpu-1", assigned("llama"))];
    let models = vec![deleted(model("llama", 1, None))];
    let (client, calls) = server_failing(seed(&models, &agents), Some("/nodeagents/"));
    round(&context(client), &caches(&models, &agents, &nodes)).await;
    let calls = calls.lock().unwrap().clone();
    assert!(calls.iter().any(|c| c.path.ends_with("/nodeagents/gpu-1")));
    assert!(
        !calls.iter().any(|c| c.path.ends_with("/models/llama")),
        "the finalizer stays: {calls:#?}"
    );
}

#[tokio::test]
async fn a_stale_agent_is_marked_and_gets_no_work_until_it_reports_again() {
    let nodes: Vec<Node> = ["gpu-1", "gpu-2"].map(node).to_vec();
    let mut stale = agent("gpu-2", json!([]));
    let old = Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(300);
    stale.status.as_mut().unwrap().last_heartbeat_time =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(old));
    let agents = vec![agent("gpu-1", json!([])), stale];
    let models = vec![model("llama", 2, None)];
    let (client, calls) = server(seed(&models, &agents));
    let ctx = context(client);
    round(&ctx, &caches(&models, &agents, &nodes)).await;
    let first = calls.lock().unwrap().clone();
    let mark = first
        .iter()
        .find(|c| c.path == "/apis/weir.dev/v1alpha1/nodeagents/gpu-2/status")
        .expect("the stale agent is marked");
    let condition = &mark.body["status"]["conditions"][0];
    assert_eq!(condition["type"], "Heartbeat");
    assert_eq!(condition["status"], "False");
    assert_eq!(condition["reason"], "HeartbeatStale");
    assert!(
        first
            .iter()
            .any(|c| c.path.ends_with("/events") && c.body["reason"] == "HeartbeatStale")
    );
    assert!(
        !first
            .iter()
            .any(|c| c.path.ends_with("/nodeagents/gpu-1/status")),
        "a healthy agent is not written"
    );
    assert_eq!(
        assigned_to(&first, "llama"),
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
    calls.lock().unwrap().clear();
    round(&ctx, &caches(&models, &[agents[0].clone(), back], &nodes)).await;
    let second = calls.lock().unwrap().clone();
    let cleared = second
        .iter()
        .find(|c| c.path == "/apis/weir.dev/v1alpha1/nodeagents/gpu-2/status")
        .expect("the mark is cleared");
    assert_eq!(cleared.body["status"]["conditions"][0]["status"], "True");
}
