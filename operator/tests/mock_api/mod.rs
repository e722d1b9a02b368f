//! A mocked Kubernetes API server (`tower-test`) for the controller tests:
//! it records every call and keeps the objects it was sent, merging each
//! field manager's NodeAgent `spec.models` entries and `status.conditions`
//! entries as server-side apply merges a map list; plus caches the tests
//! control and object builders.

#![allow(dead_code)]
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tower_test::mock;
use weir_crds::{BatchPolicy, CachePolicy, Model, ModelEnsemble, NodeAgent};
use weir_operator::controller::{Caches, Context, model};
use weir_operator::metrics::OperatorMetrics;

#[derive(Clone, Debug)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
}

pub type Calls = Arc<Mutex<Vec<Call>>>;
pub type Objects = Arc<Mutex<HashMap<String, Value>>>;

pub fn failure(code: u16, message: &str) -> Response<Body> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": message, "reason": "Failed", "code": code});
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .body(Body::from(serde_json::to_vec(&status).unwrap()))
        .unwrap()
}

/// Server-side apply of one manager's `spec.models` entries (a map list
/// keyed by `servedName`): entries it applied before and omits now go.
pub fn apply_entries(object: &mut Value, owned: &mut Vec<String>, patch: &Value) {
    let sent: Vec<Value> = patch["spec"]["models"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<String> = sent
        .iter()
        .map(|e| e["servedName"].as_str().unwrap().to_owned())
        .collect();
    let models = object["spec"]["models"].as_array_mut().unwrap();
    models.retain(|e| {
        let name = e["servedName"].as_str().unwrap().to_owned();
        !owned.contains(&name) || names.contains(&name)
    });
    for entry in sent {
        match models
            .iter_mut()
            .find(|e| e["servedName"] == entry["servedName"])
        {
            Some(e) => *e = entry,
            None => models.push(entry),
        }
    }
    *owned = names;
}

/// Server-side apply of one manager's NodeAgent `status.conditions` (a map
/// list keyed by `type`): conditions it applied before and omits now go;
/// other managers' conditions stay.
pub fn apply_conditions(object: &mut Value, owned: &mut Vec<String>, patch: &Value) {
    let sent: Vec<Value> = patch["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let types: Vec<String> = sent
        .iter()
        .map(|c| c["type"].as_str().unwrap().to_owned())
        .collect();
    if !object["status"].is_object() {
        object["status"] = json!({});
    }
    if !object["status"]["conditions"].is_array() {
        object["status"]["conditions"] = json!([]);
    }
    let conditions = object["status"]["conditions"].as_array_mut().unwrap();
    conditions.retain(|c| {
        let t = c["type"].as_str().unwrap().to_owned();
        !owned.contains(&t) || types.contains(&t)
    });
    for condition in sent {
        match conditions
            .iter_mut()
            .find(|c| c["type"] == condition["type"])
        {
            Some(c) => *c = condition,
            None => conditions.push(condition),
        }
    }
    *owned = types;
}

/// A mock API server; writes to paths containing `failing` answer 500.
pub fn server(
    objects: Vec<(String, Value)>,
    failing: Option<&'static str>,
) -> (kube::Client, Calls, Objects) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let calls: Calls = Arc::default();
    let stored: Objects = Arc::new(Mutex::new(objects.into_iter().collect()));
    let (log, state) = (calls.clone(), stored.clone());
    tokio::spawn(async move {
        let mut owned: HashMap<(String, String), Vec<String>> = HashMap::new();
        // Entries the seeded agents carry belong to their Models' managers.
        for (path, object) in state.lock().unwrap().iter() {
            for e in object["spec"]["models"].as_array().into_iter().flatten() {
                let manager = format!(
                    "weir-operator/{}/{}",
                    e["modelRef"]["namespace"].as_str().unwrap(),
                    e["modelRef"]["name"].as_str().unwrap()
                );
                owned
                    .entry((path.clone(), manager))
                    .or_default()
                    .push(e["servedName"].as_str().unwrap().to_owned());
            }
        }
        while let Some((req, send)) = handle.next_request().await {
            let (method, path) = (req.method().clone(), req.uri().path().to_owned());
            let query = req.uri().query().unwrap_or_default().to_owned();
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            log.lock().unwrap().push(Call {
                method: method.clone(),
                path: path.clone(),
                query: query.clone(),
                body: body.clone(),
            });
            if failing.is_some_and(|f| path.contains(f)) {
                send.send_response(failure(500, "etcd is unhappy"));
                continue;
            }
            let manager = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("fieldManager="))
                .unwrap_or_default()
                .replace("%2F", "/");
            let object_path = path.trim_end_matches("/status").to_owned();
            let mut objects = state.lock().unwrap();
            let answer = match (method, objects.get_mut(&object_path)) {
                // A JSON patch (finalizers): applied to the stored object.
                (Method::PATCH, Some(object)) if body.is_array() => {
                    // The API server reads a missing list as null.
                    let meta = object["metadata"].as_object_mut().unwrap();
                    meta.entry("finalizers").or_insert(Value::Null);
                    let ops: json_patch::Patch = serde_json::from_value(body).unwrap();
                    if let Err(e) = json_patch::patch(object, &ops) {
                        send.send_response(failure(422, &e.to_string()));
                        continue;
                    }
                    object.clone()
                }
                (Method::PATCH, Some(object))
                    if path.contains("/nodeagents/") && !path.ends_with("/status") =>
                {
                    apply_entries(
                        object,
                        owned.entry((object_path.clone(), manager)).or_default(),
                        &body,
                    );
                    object.clone()
                }
                (Method::PATCH, Some(object)) if path.contains("/nodeagents/") => {
                    apply_conditions(
                        object,
                        owned.entry((path.clone(), manager)).or_default(),
                        &body,
                    );
                    object.clone()
                }
                // Other applies: the sent top-level fields replace ours.
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
    (kube::Client::new(service, "default"), calls, stored)
}

pub fn model_path(name: &str) -> String {
    format!("/apis/weir.dev/v1alpha1/namespaces/ml/models/{name}")
}

pub fn agent_path(name: &str) -> String {
    format!("/apis/weir.dev/v1alpha1/nodeagents/{name}")
}

pub fn seed(models: &[Model], agents: &[NodeAgent]) -> Vec<(String, Value)> {
    let m = models.iter().map(|m| {
        (
            model_path(m.metadata.name.as_ref().unwrap()),
            serde_json::to_value(m).unwrap(),
        )
    });
    let a = agents.iter().map(|a| {
        (
            agent_path(a.metadata.name.as_ref().unwrap()),
            serde_json::to_value(a).unwrap(),
        )
    });
    m.chain(a).collect()
}

/// The caches a test controls.
pub struct World {
    pub models: Writer<Model>,
    pub agents: Writer<NodeAgent>,
    pub nodes: Writer<Node>,
}

impl World {
    pub fn new(models: &[Model], agents: &[NodeAgent], nodes: &[Node]) -> (Self, Caches) {
        let (m, mw) = reflector::store::<Model>();
        let (a, aw) = reflector::store::<NodeAgent>();
        let (n, nw) = reflector::store::<Node>();
        let caches = Caches::from_stores(
            m,
            reflector::store::<ModelEnsemble>().0,
            reflector::store::<CachePolicy>().0,
            reflector::store::<BatchPolicy>().0,
            a,
            n,
        );
        let mut world = Self {
            models: mw,
            agents: aw,
            nodes: nw,
        };
        models.iter().for_each(|o| {
            world
                .models
                .apply_watcher_event(&watcher::Event::Apply(o.clone()))
        });
        agents.iter().for_each(|o| world.set_agent(o.clone()));
        nodes.iter().for_each(|o| {
            world
                .nodes
                .apply_watcher_event(&watcher::Event::Apply(o.clone()))
        });
        (world, caches)
    }

    pub fn set_agent(&mut self, agent: NodeAgent) {
        self.agents
            .apply_watcher_event(&watcher::Event::Apply(agent));
    }

    /// Caches the agents as the server now holds them.
    pub fn sync_agents(&mut self, stored: &Objects, names: &[&str]) {
        for name in names {
            let value = stored.lock().unwrap()[&agent_path(name)].clone();
            self.set_agent(serde_json::from_value(value).unwrap());
        }
    }
}

pub fn node(name: &str) -> Node {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "labels": {"pool": "gpu"}}}))
    .unwrap()
}

pub fn agent(name: &str, models: Value) -> NodeAgent {
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

/// A Model that already carries the operator's finalizer.
pub fn model(name: &str, replicas: u32, batch_policy: Option<&str>) -> Model {
    let mut spec = json!({"source": {"uri": "file:///models/m"}, "resources": {"gpus": 0},
        "nodeSelector": {"pool": "gpu"}, "replicas": {"min": replicas, "max": replicas}});
    if let Some(p) = batch_policy {
        spec["batchPolicyRef"] = json!({"name": p});
    }
    serde_json::from_value(json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": name, "namespace": "ml", "generation": 1, "uid": format!("uid-{name}"),
                     "finalizers": ["weir.dev/unassign"]},
        "spec": spec}))
    .unwrap()
}

pub fn context(client: kube::Client, caches: Caches) -> Arc<Context> {
    let metrics = OperatorMetrics::register(&mut prometheus_client::registry::Registry::default());
    Arc::new(Context::new(client, metrics, caches))
}

pub async fn reconcile_models(ctx: &Arc<Context>, models: &[Model]) {
    for m in models {
        model::reconcile(Arc::new(m.clone()), ctx.clone())
            .await
            .unwrap();
    }
}

pub fn take(calls: &Calls) -> Vec<Call> {
    std::mem::take(&mut *calls.lock().unwrap())
}

/// Agents whose spec writes assign `served`, with the field managers used.
pub fn assigned_to(calls: &[Call], served: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = calls
        .iter()
        .filter(|c| {
            c.method == Method::PATCH
                && c.path.contains("/nodeagents/")
                && !c.path.ends_with("/status")
        })
        .filter(|c| {
            c.body["spec"]["models"]
                .as_array()
                .is_some_and(|ms| ms.iter().any(|m| m["servedName"] == served))
        })
        .map(|c| {
            let manager = c
                .query
                .split('&')
                .find_map(|kv| kv.strip_prefix("fieldManager="))
                .unwrap_or_default();
            (
                c.path.rsplit('/').next().unwrap().to_owned(),
                manager.replace("%2F", "/"),
            )
        })
        .collect();
    out.sort();
    out
}

pub fn agents_of(calls: &[Call], served: &str) -> Vec<String> {
    assigned_to(calls, served)
        .into_iter()
        .map(|(a, _)| a)
        .collect()
}

pub fn events<'a>(calls: &'a [Call], reason: &str) -> Vec<&'a Call> {
    calls
        .iter()
        .filter(|c| {
            c.method == Method::POST && c.path.ends_with("/events") && c.body["reason"] == reason
        })
        .collect()
}
