//! Placement: which nodes serve which model replicas.
//!
//! Guarantees: a new replica is only placed on a ready node whose labels
//! match the model's node selector, that is not cordoned, whose taints
//! allow it (Kubernetes semantics, see [`crate::taints`]) and that has
//! enough free GPUs of enough memory; nodes with untolerated
//! `PreferNoSchedule` taints come last; one replica per node per model;
//! placement is stable — a replica on a node that is still valid stays
//! there, so a round with nothing changed moves nothing; `NoSchedule`
//! taints and cordons never move a replica; replicas on lost, unready or
//! no-longer-matching nodes, nodes where the model failed, or nodes with a
//! `NoExecute` taint not tolerated (or past its `tolerationSeconds`) are
//! moved; scale-down drops the replicas on the most loaded nodes first,
//! scale-up picks the least loaded nodes.
//! Deterministic: ties break by node name. Assumption: a GPU holds one
//! replica (no GPU sharing between models).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Taint, Toleration};
use k8s_openapi::jiff::Timestamp;

use crate::taints;

/// A node as placement sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Node taints.
    pub taints: Vec<Taint>,
    /// Cordoned (`spec.unschedulable`).
    pub unschedulable: bool,
    /// Memory of each GPU in bytes (empty: a CPU node).
    pub gpu_memory: Vec<u64>,
    /// Whether its agent heartbeats and is Ready.
    pub ready: bool,
    /// Served names that failed to load there.
    pub failed: BTreeSet<String>,
}

/// A model as placement sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelDemand {
    /// Key (`namespace/name`).
    pub key: String,
    /// Served name (to match failures reported by agents).
    pub served_name: String,
    /// Replicas wanted.
    pub replicas: u32,
    /// GPUs per replica (0: CPU).
    pub gpus: u32,
    /// GPU memory one replica needs on each of its GPUs, in bytes.
    pub memory_per_gpu: u64,
    /// Node selector.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations.
    pub tolerations: Vec<Toleration>,
}

/// The outcome for one model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placed {
    /// Nodes serving a replica.
    pub nodes: Vec<String>,
    /// Why fewer replicas than wanted were placed.
    pub unplaced: Option<String>,
}

/// Kubernetes toleration semantics for one taint.
pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    taints::tolerates(tolerations, taint)
}

/// Why `node` cannot host `model` for reasons other than its taints.
fn unfit_base(model: &ModelDemand, node: &NodeView) -> Option<String> {
    if !node.ready {
        return Some(format!("node {} is not ready", node.name));
    }
    if node.failed.contains(&model.served_name) {
        return Some(format!("the model failed to load on {}", node.name));
    }
    model
        .node_selector
        .iter()
        .find(|(k, v)| node.labels.get(*k) != Some(v))
        .map(|(k, v)| format!("node {} does not match nodeSelector {k}={v}", node.name))
}

/// Why `node` cannot take a new replica of `model`, or `None` if it can
/// (capacity aside).
pub fn unfit(model: &ModelDemand, node: &NodeView) -> Option<String> {
    unfit_base(model, node).or_else(|| {
        let tolerations = taints::with_defaults(&model.tolerations);
        let taints = taints::effective_taints(&node.taints, node.unschedulable);
        taints::blocks_new(&tolerations, &taints).map(|why| format!("node {} has {why}", node.name))
    })
}

/// Why a replica of `model` already on `node` must move at `now`, or `None`
/// if it stays (capacity aside). Cordons and `NoSchedule` taints never
/// move it.
pub fn must_move(model: &ModelDemand, node: &NodeView, now: Timestamp) -> Option<String> {
    unfit_base(model, node).or_else(|| {
        let tolerations = taints::with_defaults(&model.tolerations);
        taints::eviction_time(&tolerations, &node.taints, now)
            .filter(|at| *at <= now)
            .map(|_| {
                format!(
                    "node {} has a NoExecute taint the model no longer tolerates",
                    node.name
                )
            })
    })
}

/// Places every model now. `current` is the previous assignment
/// (key → nodes).
pub fn place(
    nodes: &[NodeView],
    models: &[ModelDemand],
    current: &BTreeMap<String, Vec<String>>,
) -> BTreeMap<String, Placed> {
    place_at(nodes, models, current, Timestamp::now())
}

/// Places every model as of `now` (which decides whether tolerated
/// `NoExecute` taints have run out).
pub fn place_at(
    nodes: &[NodeView],
    models: &[ModelDemand],
    current: &BTreeMap<String, Vec<String>>,
    now: Timestamp,
) -> BTreeMap<String, Placed> {
    // Free GPUs per node, as memory sizes; replicas kept first, then new ones.
    let mut free: BTreeMap<&str, Vec<u64>> = nodes
        .iter()
        .map(|n| (n.name.as_str(), n.gpu_memory.clone()))
        .collect();
    let by_name: BTreeMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    let mut out: BTreeMap<String, Placed> = BTreeMap::new();
    let mut ordered: Vec<&ModelDemand> = models.iter().collect();
    ordered.sort_by(|a, b| a.key.cmp(&b.key));
    // Pass 1: keep valid replicas (up to the wanted count, least loaded nodes kept).
    for model in &ordered {
        let mut kept = Vec::new();
        let mut previous: Vec<&String> = current
            .get(&model.key)
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        previous.sort();
        for name in previous {
            if kept.len() as u32 >= model.replicas {
                break;
            }
            let Some(node) = by_name.get(name.as_str()) else {
                continue;
            };
            if must_move(model, node, now).is_none()
                && take_gpus(free.get_mut(name.as_str()), model)
            {
                *load.entry(node.name.as_str()).or_default() += 1;
                kept.push(name.clone());
            }
        }
        out.insert(
            model.key.clone(),
            Placed {
                nodes: kept,
                unplaced: None,
            },
        );
    }
    // Pass 2: add replicas on the least loaded fitting nodes.
    for model in &ordered {
        let placed = out
            .get_mut(&model.key)
            .expect("every model has an entry from pass 1");
        let mut reasons = Vec::new();
        while (placed.nodes.len() as u32) < model.replicas {
            let mut candidates: Vec<&NodeView> = nodes
                .iter()
                .filter(|n| !placed.nodes.contains(&n.name))
                .filter(|n| match unfit(model, n) {
                    Some(why) => {
                        reasons.push(why);
                        false
                    }
                    None if fits(free.get(n.name.as_str()), model) => true,
                    None => {
                        reasons.push(capacity_reason(model, n, free.get(n.name.as_str())));
                        false
                    }
                })
                .collect();
            let tolerations = taints::with_defaults(&model.tolerations);
            candidates.sort_by_key(|n| {
                (
                    taints::soft_penalty(&tolerations, &n.taints),
                    load.get(n.name.as_str()).copied().unwrap_or(0),
                    n.name.clone(),
                )
            });
            let Some(node) = candidates.first() else {
                placed.unplaced = Some(unplaced_reason(model, placed.nodes.len(), &reasons));
                break;
            };
            take_gpus(free.get_mut(node.name.as_str()), model);
            *load.entry(node.name.as_str()).or_default() += 1;
            placed.nodes.push(node.name.clone());
        }
        placed.nodes.sort();
    }
    out
}

fn fits(free: Option<&Vec<u64>>, model: &ModelDemand) -> bool {
    model.gpus == 0
        || free.is_some_and(|f| {
            f.iter().filter(|m| **m >= model.memory_per_gpu).count() >= model.gpus as usize
        })
}

/// Takes the smallest GPUs that fit; false (and nothing taken) if too few.
fn take_gpus(free: Option<&mut Vec<u64>>, model: &ModelDemand) -> bool {
    if model.gpus == 0 {
        return true;
    }
    let Some(free) = free else { return false };
    free.sort_unstable();
    let idx: Vec<usize> = (0..free.len())
        .filter(|&i| free[i] >= model.memory_per_gpu)
        .take(model.gpus as usize)
        .collect();
    if idx.len() < model.gpus as usize {
        return false;
    }
    for i in idx.into_iter().rev() {
        free.remove(i);
    }
    true
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn capacity_reason(model: &ModelDemand, node: &NodeView, free: Option<&Vec<u64>>) -> String {
    let largest = free.and_then(|f| f.iter().max().copied()).unwrap_or(0);
    let count = free.map_or(0, Vec::len);
    format!(
        "node {} has {count} free GPU(s), the largest {:.1} GiB; a replica needs {} GPU(s) of {:.1} GiB",
        node.name,
        gib(largest),
        model.gpus,
        gib(model.memory_per_gpu)
    )
}

fn unplaced_reason(model: &ModelDemand, placed: usize, reasons: &[String]) -> String {
    let mut distinct: Vec<&String> = reasons.iter().collect();
    distinct.sort();
    distinct.dedup();
    let first: Vec<&str> = distinct.iter().take(4).map(|s| s.as_str()).collect();
    let why = if first.is_empty() {
        "no nodes".to_owned()
    } else {
        first.join("; ")
    };
    format!("placed {placed} of {} replicas: {why}", model.replicas)
}

/// GPU memory one replica needs per GPU: its weights split over its GPUs,
/// plus a KV cache reserve of a quarter of the weights (at least 1 GiB),
/// divided by the share of GPU memory the engine may use.
pub fn memory_per_gpu(weight_bytes: u64, gpus: u32, gpu_memory_utilization: f64) -> u64 {
    let gpus = u64::from(gpus.max(1));
    let per_gpu = weight_bytes.div_ceil(gpus);
    let reserve = (per_gpu / 4).max(1 << 30);
    ((per_gpu + reserve) as f64 / gpu_memory_utilization.clamp(0.05, 1.0)).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(name: &str, gpus: &[u64]) -> NodeView {
        NodeView {
            name: name.into(),
            labels: BTreeMap::from([("gpu".into(), "h100".into())]),
            taints: vec![],
            unschedulable: false,
            gpu_memory: gpus.iter().map(|g| g * GIB).collect(),
            ready: true,
            failed: BTreeSet::new(),
        }
    }

    fn demand(key: &str, replicas: u32, gpus: u32, gib_per_gpu: u64) -> ModelDemand {
        ModelDemand {
            key: key.into(),
            served_name: key.into(),
            replicas,
            gpus,
            memory_per_gpu: gib_per_gpu * GIB,
            node_selector: BTreeMap::new(),
            tolerations: vec![],
        }
    }

    #[test]
    fn spreads_replicas_and_is_stable() {
        let nodes = [node("a", &[80]), node("b", &[80]), node("c", &[80])];
        let models = [demand("m", 2, 1, 20)];
        let first = place(&nodes, &models, &BTreeMap::new());
        assert_eq!(first["m"].nodes, vec!["a", "b"]);
        let current = BTreeMap::from([("m".to_owned(), vec!["b".to_owned(), "c".to_owned()])]);
        assert_eq!(
            place(&nodes, &models, &current)["m"].nodes,
            vec!["b", "c"],
            "valid replicas stay"
        );
    }

    #[test]
    fn lost_failed_or_unready_nodes_lose_their_replicas() {
        let mut nodes = vec![node("a", &[80]), node("b", &[80]), node("c", &[80])];
        let current = BTreeMap::from([("m".to_owned(), vec!["a".to_owned(), "b".to_owned()])]);
        nodes.retain(|n| n.name != "a");
        assert_eq!(
            place(&nodes, &[demand("m", 2, 1, 20)], &current)["m"].nodes,
            vec!["b", "c"]
        );
        nodes[0].failed.insert("m".into());
        let current = BTreeMap::from([("m".to_owned(), vec!["b".to_owned(), "c".to_owned()])]);
        let placed = &place(&nodes, &[demand("m", 2, 1, 20)], &current)["m"];
        assert_eq!(placed.nodes, vec!["c"]);
        assert!(
            placed
                .unplaced
                .as_ref()
                .unwrap()
                .contains("failed to load on b"),
            "{placed:?}"
        );
    }

    #[test]
    fn selectors_taints_and_capacity_are_respected() {
        let mut tainted = node("t", &[80]);
        tainted.taints = vec![Taint {
            key: "nvidia.com/gpu".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        }];
        let mut small = node("s", &[24]);
        small.labels.insert("pool".into(), "small".into());
        let nodes = [tainted, small];
        let mut big = demand("big", 1, 1, 40);
        let placed = &place(&nodes, std::slice::from_ref(&big), &BTreeMap::new())["big"];
        assert!(placed.nodes.is_empty());
        let why = placed.unplaced.clone().unwrap();
        assert!(
            why.contains("taint nvidia.com/gpu:NoSchedule")
                && why.contains("node s has 1 free GPU(s), the largest 24.0 GiB"),
            "{why}"
        );
        big.tolerations = vec![Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Exists".into()),
            ..Default::default()
        }];
        assert_eq!(
            place(&nodes, std::slice::from_ref(&big), &BTreeMap::new())["big"].nodes,
            vec!["t"]
        );
        let mut picky = demand("p", 1, 1, 10);
        picky.node_selector.insert("pool".into(), "small".into());
        assert_eq!(
            place(&nodes, &[picky], &BTreeMap::new())["p"].nodes,
            vec!["s"]
        );
        // Two GPUs per replica on a one-GPU node does not fit.
        let wide = demand("w", 1, 2, 10);
        assert!(
            place(&nodes, &[wide], &BTreeMap::new())["w"]
                .nodes
                .is_empty()
        );
    }

    #[test]
    fn gpus_are_not_shared_between_models() {
        let nodes = [node("a", &[80, 80])];
        let models = [
            demand("m1", 1, 1, 40),
            demand("m2", 1, 1, 40),
            demand("m3", 1, 1, 40),
        ];
        let out = place(&nodes, &models, &BTreeMap::new());
        let placed: usize = out.values().map(|p| p.nodes.len()).sum();
        assert_eq!(placed, 2);
        assert!(out["m3"].unplaced.is_some());
    }

    #[test]
    fn memory_estimate_includes_the_kv_reserve() {
        let est = memory_per_gpu(16 * GIB, 1, 0.9);
        assert!(est > 16 * GIB && est < 24 * GIB, "{est}");
        assert!(memory_per_gpu(16 * GIB, 2, 0.9) < est);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn nodes() -> impl Strategy<Value = Vec<NodeView>> {
        prop::collection::vec(
            (
                prop::collection::vec(prop::sample::select(vec![24u64, 40, 80]), 0..4),
                any::<bool>(),
                any::<bool>(),
            ),
            1..6,
        )
        .prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (gpus, ready, big))| NodeView {
                    name: format!("n{i}"),
                    labels: BTreeMap::from([(
                        "pool".into(),
                        if big { "big" } else { "small" }.into(),
                    )]),
                    taints: vec![],
                    unschedulable: false,
                    gpu_memory: gpus.iter().map(|g| g * GIB).collect(),
                    ready,
                    failed: BTreeSet::new(),
                })
                .collect()
        })
    }

    fn models() -> impl Strategy<Value = Vec<ModelDemand>> {
        prop::collection::vec(
            (
                0u32..4,
                0u32..3,
                prop::sample::select(vec![10u64, 30, 60]),
                any::<bool>(),
            ),
            1..5,
        )
        .prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (replicas, gpus, mem, picky))| ModelDemand {
                    key: format!("m{i}"),
                    served_name: format!("m{i}"),
                    replicas,
                    gpus,
                    memory_per_gpu: mem * GIB,
                    node_selector: if picky {
                        BTreeMap::from([("pool".into(), "big".into())])
                    } else {
                        BTreeMap::new()
                    },
                    tolerations: vec![],
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn placements_fit_and_are_stable(nodes in nodes(), models in models()) {
            let out = place(&nodes, &models, &BTreeMap::new());
            let mut used: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
            for m in &models {
                let placed = &out[&m.key];
                prop_assert!(placed.nodes.len() as u32 <= m.replicas);
                let mut seen = BTreeSet::new();
                for n in &placed.nodes {
                    prop_assert!(seen.insert(n.clone()), "a node holds two replicas of one model");
                    let node = nodes.iter().find(|x| &x.name == n).unwrap();
                    prop_assert!(unfit(m, node).is_none());
                    for _ in 0..m.gpus {
                        used.entry(n.as_str()).or_default().push(m.memory_per_gpu);
                    }
                }
                prop_assert_eq!(placed.unplaced.is_some(), (placed.nodes.len() as u32) < m.replicas);
            }
            for (n, demands) in &used {
                let node = nodes.iter().find(|x| x.name == *n).unwrap();
                prop_assert!(demands.len() <= node.gpu_memory.len(), "more replicas than GPUs on {}", n);
            }
            let current: BTreeMap<String, Vec<String>> = out.iter().map(|(k, p)| (k.clone(), p.nodes.clone())).collect();
            let again = place(&nodes, &models, &current);
            for (k, p) in &out {
                prop_assert_eq!(&again[k].nodes, &p.nodes, "a round with nothing changed moved replicas");
            }
        }
    }
}
