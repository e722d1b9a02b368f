//! Placement under Kubernetes node semantics: cordons and `NoSchedule`
//! taints keep new replicas away and move none; `PreferNoSchedule` nodes
//! come last; `NoExecute` moves replicas unless tolerated, after
//! `tolerationSeconds` from the taint's `timeAdded`, with the default
//! 300 s for `not-ready` / `unreachable`.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use weir_operator::placement::{ModelDemand, NodeView, place_at};
use weir_operator::taints::{NOT_READY, UNREACHABLE};

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn node(name: &str) -> NodeView {
    NodeView {
        name: name.into(),
        labels: BTreeMap::new(),
        taints: vec![],
        unschedulable: false,
        draining: false,
        gpu_memory: vec![80 << 30],
        ready: true,
        failed: BTreeSet::new(),
        serving: BTreeSet::new(),
    }
}

fn model(replicas: u32) -> ModelDemand {
    ModelDemand {
        key: "ns/m".into(),
        served_name: "m".into(),
        replicas,
        max_unavailable: 0,
        gpus: 1,
        memory_per_gpu: 20 << 30,
        node_selector: BTreeMap::new(),
        tolerations: vec![],
    }
}

fn taint(key: &str, effect: &str, added: Option<i64>) -> Taint {
    Taint {
        key: key.into(),
        effect: effect.into(),
        time_added: added.map(|s| Time(at(s))),
        value: None,
    }
}

fn on(nodes: &[&str]) -> BTreeMap<String, Vec<String>> {
    BTreeMap::from([(
        "ns/m".to_owned(),
        nodes.iter().map(|n| n.to_string()).collect(),
    )])
}

fn placed(
    nodes: &[NodeView],
    m: &ModelDemand,
    current: &BTreeMap<String, Vec<String>>,
    now: i64,
) -> Vec<String> {
    place_at(nodes, std::slice::from_ref(m), current, at(now))["ns/m"]
        .nodes
        .clone()
}

#[test]
fn cordon_moves_nothing_and_keeps_new_replicas_away() {
    let mut nodes = vec![node("a"), node("b"), node("c")];
    nodes[0].unschedulable = true;
    assert_eq!(
        placed(&nodes, &model(2), &on(&["a", "b"]), 0),
        vec!["a", "b"],
        "a cordon moves nothing"
    );
    assert_eq!(
        placed(&nodes, &model(3), &on(&["b"]), 0).len(),
        2,
        "no new replica on the cordoned node"
    );
    let out = place_at(&nodes, &[model(3)], &on(&["b"]), at(0));
    assert!(
        out["ns/m"]
            .unplaced
            .as_ref()
            .unwrap()
            .contains("node.kubernetes.io/unschedulable")
    );
}

#[test]
fn the_lifecycle_controllers_no_schedule_taints_move_nothing() {
    // What kube-controller-manager puts on a node without a kubelet after
    // about 40 s: the replica must stay.
    let mut nodes = vec![node("a"), node("b")];
    nodes[0].taints = vec![taint(UNREACHABLE, "NoSchedule", Some(0))];
    assert_eq!(placed(&nodes, &model(1), &on(&["a"]), 100), vec!["a"]);
    assert_eq!(
        placed(&nodes, &model(1), &on(&[]), 100),
        vec!["b"],
        "new ones go elsewhere"
    );
}

#[test]
fn unreachable_no_execute_moves_after_the_default_300_s() {
    let mut nodes = vec![node("a"), node("b")];
    nodes[0].taints = vec![taint(UNREACHABLE, "NoExecute", Some(0))];
    nodes[0].serving.insert("m".into());
    assert_eq!(
        placed(&nodes, &model(1), &on(&["a"]), 299),
        vec!["a", "b"],
        "within 300 s it stays while its replacement loads"
    );
    assert_eq!(
        placed(&nodes, &model(1), &on(&["a", "b"]), 300),
        vec!["b"],
        "then it goes, replacement Ready or not"
    );
    nodes[0].taints = vec![taint(NOT_READY, "NoExecute", Some(0))];
    assert_eq!(placed(&nodes, &model(1), &on(&["a"]), 301), vec!["b"]);
}

#[test]
fn no_execute_honours_the_models_toleration_seconds() {
    let mut nodes = vec![node("a"), node("b")];
    nodes[0].taints = vec![taint("maintenance", "NoExecute", Some(0))];
    let mut m = model(1);
    assert_eq!(
        placed(&nodes, &m, &on(&["a"]), 0),
        vec!["b"],
        "untolerated: at once"
    );
    m.tolerations = vec![Toleration {
        key: Some("maintenance".into()),
        operator: Some("Exists".into()),
        effect: Some("NoExecute".into()),
        toleration_seconds: Some(60),
        value: None,
    }];
    // Time left: the replacement is placed now, the old replica (which
    // serves) kept until the replacement reports Ready ...
    nodes[0].serving.insert("m".into());
    let out = place_at(&nodes, std::slice::from_ref(&m), &on(&["a"]), at(10));
    assert_eq!(out["ns/m"].nodes, vec!["a", "b"]);
    assert!(
        out["ns/m"].leaving[0].1.contains("tolerates until"),
        "{out:?}"
    );
    assert_eq!(placed(&nodes, &m, &on(&["a", "b"]), 59), vec!["a", "b"]);
    nodes[1].serving.insert("m".into());
    assert_eq!(
        placed(&nodes, &m, &on(&["a", "b"]), 20),
        vec!["b"],
        "... and then it goes"
    );
    // ... or at the deadline, whether the replacement is Ready or not.
    nodes[1].serving.clear();
    assert_eq!(placed(&nodes, &m, &on(&["a", "b"]), 60), vec!["b"]);
    m.tolerations[0].toleration_seconds = None;
    assert_eq!(
        placed(&nodes, &m, &on(&["a"]), 100_000),
        vec!["a"],
        "tolerated forever"
    );
    // Overriding the default: an unreachable node keeps it only 10 s.
    nodes[0].taints = vec![taint(UNREACHABLE, "NoExecute", Some(0))];
    m.tolerations = vec![Toleration {
        key: Some(UNREACHABLE.into()),
        operator: Some("Exists".into()),
        effect: Some("NoExecute".into()),
        toleration_seconds: Some(10),
        value: None,
    }];
    assert_eq!(placed(&nodes, &m, &on(&["a"]), 11), vec!["b"]);
}

#[test]
fn prefer_no_schedule_nodes_come_last() {
    let mut nodes = vec![node("a"), node("b"), node("c")];
    nodes[0].taints = vec![taint("spot", "PreferNoSchedule", None)];
    assert_eq!(placed(&nodes, &model(2), &on(&[]), 0), vec!["b", "c"]);
    assert_eq!(
        placed(&nodes, &model(3), &on(&[]), 0),
        vec!["a", "b", "c"],
        "used when needed"
    );
    assert_eq!(
        placed(&nodes, &model(1), &on(&["a"]), 0),
        vec!["a"],
        "and never moved off"
    );
}
