//! Placement: which nodes serve which model replicas.
//!
//! Guarantees: a new replica is only placed on a ready node whose labels
//! match the model's node selector, that is not cordoned or draining, whose
//! taints allow it (Kubernetes semantics, see [`crate::taints`]) and that
//! has enough free GPUs of enough memory; nodes with untolerated
//! `PreferNoSchedule` taints come last; one replica per node per model;
//! placement is stable — a replica on a node that is still valid stays
//! there, so a round with nothing changed moves nothing; `NoSchedule`
//! taints and cordons never move a replica; scale-down keeps the replicas
//! that report Ready first, then by node name; scale-up picks the least
//! loaded nodes. Deterministic: ties break by node name. Assumption: a GPU
//! holds one replica (no GPU sharing between models).
//!
//! Moves come in two kinds (`placement/moves.rs`, [`verdict`]). *Forced*:
//! the node or its agent is gone or not ready, the model failed there, or
//! a `NoExecute` taint is not tolerated at all or past its
//! `tolerationSeconds` — the replica goes at once. *Voluntary*: the node is draining, a `NoExecute` taint is
//! tolerated for a while only (time left), or the node selector no longer
//! matches — the replica is *leaving*: it keeps its GPUs, does not count
//! toward the wanted replicas, a replacement is placed elsewhere, and it
//! goes only once enough replicas report Ready (make before break, at most
//! `maxUnavailable` down at a time; see [`release`]).
//!
//! A round runs three passes over the models in key order: keep (classify
//! each current replica, reserve GPUs for the kept and the leaving), add
//! (replacements and scale-up on the least loaded fitting nodes), release
//! (which leaving replicas may go now).

mod moves;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Taint, Toleration};
use k8s_openapi::jiff::Timestamp;

use crate::taints;

pub use moves::{Verdict, release, verdict};

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
    /// A drain was asked for (`weir.dev/drain`): no new replicas go there
    /// and its replicas leave voluntarily.
    pub draining: bool,
    /// Memory of each GPU in bytes (empty: a CPU node).
    pub gpu_memory: Vec<u64>,
    /// Whether its agent heartbeats and is Ready.
    pub ready: bool,
    /// Served names that failed to load there.
    pub failed: BTreeSet<String>,
    /// Served names its agent reports Ready (serving traffic).
    pub serving: BTreeSet<String>,
}

impl NodeView {
    /// Whether this node's replica of `served` reports Ready.
    pub fn serves(&self, served: &str) -> bool {
        self.ready && self.serving.contains(served)
    }
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
    /// Most replicas that may be unavailable at once during voluntary
    /// moves (`replicas.maxUnavailable`).
    pub max_unavailable: u32,
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
    /// Every node that holds the model's entry after this round: kept
    /// replicas, new ones and leaving ones still needed.
    pub nodes: Vec<String>,
    /// Why fewer replicas than wanted were placed.
    pub unplaced: Option<String>,
    /// Leaving replicas kept this round until enough others report Ready:
    /// (node, why it leaves).
    pub leaving: Vec<(String, String)>,
    /// Set when a Ready leaving replica went this round with no Ready
    /// replacement because none could be placed (break before make).
    pub unreplaced: Option<String>,
}

/// Kubernetes toleration semantics for one taint.
pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    taints::tolerates(tolerations, taint)
}

/// Why a replica of `model` cannot be on `node` at all: the agent is not
/// ready or the model failed there (a forced move).
pub fn gone(model: &ModelDemand, node: &NodeView) -> Option<String> {
    if !node.ready {
        return Some(format!("node {} is not ready", node.name));
    }
    node.failed
        .contains(&model.served_name)
        .then(|| format!("the model failed to load on {}", node.name))
}

/// Why `node`'s labels do not match `model`'s node selector, if they do not.
pub fn selector_mismatch(model: &ModelDemand, node: &NodeView) -> Option<String> {
    model
        .node_selector
        .iter()
        .find(|(k, v)| node.labels.get(*k) != Some(v))
        .map(|(k, v)| format!("node {} does not match nodeSelector {k}={v}", node.name))
}

/// Why `node` cannot take a new replica of `model`, or `None` if it can
/// (capacity aside).
pub fn unfit(model: &ModelDemand, node: &NodeView) -> Option<String> {
    gone(model, node)
        .or_else(|| selector_mismatch(model, node))
        .or_else(|| {
            node.draining
                .then(|| format!("node {} is draining", node.name))
        })
        .or_else(|| {
            let tolerations = taints::with_defaults(&model.tolerations);
            let taints = taints::effective_taints(&node.taints, node.unschedulable);
            taints::blocks_new(&tolerations, &taints)
                .map(|why| format!("node {} has {why}", node.name))
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
    let mut round = Round::new(nodes);
    let mut ordered: Vec<&ModelDemand> = models.iter().collect();
    ordered.sort_by(|a, b| a.key.cmp(&b.key));
    let mut out: BTreeMap<String, Placed> = BTreeMap::new();
    for model in &ordered {
        let previous = current.get(&model.key).map_or(&[][..], Vec::as_slice);
        out.insert(model.key.clone(), round.keep(model, previous, now));
    }
    for model in &ordered {
        let placed = out
            .get_mut(&model.key)
            .expect("every model has an entry from the keep pass");
        round.add(model, placed);
    }
    for model in &ordered {
        let placed = out
            .get_mut(&model.key)
            .expect("every model has an entry from the keep pass");
        release(model, &round.by_name, placed);
    }
    out
}

/// The state of one placement round: free GPUs and replicas per node.
struct Round<'a> {
    nodes: &'a [NodeView],
    by_name: BTreeMap<&'a str, &'a NodeView>,
    /// Free GPUs per node, as memory sizes.
    free: BTreeMap<&'a str, Vec<u64>>,
    /// Replicas (of any model) per node.
    load: BTreeMap<&'a str, usize>,
}

impl<'a> Round<'a> {
    fn new(nodes: &'a [NodeView]) -> Self {
        Self {
            nodes,
            by_name: nodes.iter().map(|n| (n.name.as_str(), n)).collect(),
            free: nodes
                .iter()
                .map(|n| (n.name.as_str(), n.gpu_memory.clone()))
                .collect(),
            load: BTreeMap::new(),
        }
    }

    /// Reserves GPUs on `node` for a replica of `model`; false if they are
    /// not free.
    fn reserve(&mut self, model: &ModelDemand, node: &'a NodeView) -> bool {
        let taken = take_gpus(self.free.get_mut(node.name.as_str()), model);
        if taken {
            *self.load.entry(node.name.as_str()).or_default() += 1;
        }
        taken
    }

    /// Pass 1: the model's current replicas that stay (up to the wanted
    /// count, Ready ones first) and those that leave, each with its GPUs
    /// reserved. Forced moves, and replicas whose GPUs are no longer free,
    /// are dropped.
    fn keep(&mut self, model: &ModelDemand, previous: &[String], now: Timestamp) -> Placed {
        let mut previous: Vec<&String> = previous.iter().collect();
        let serves = |n: &String| {
            self.by_name
                .get(n.as_str())
                .is_some_and(|v| v.serves(&model.served_name))
        };
        previous.sort_by_key(|n| (!serves(n), n.as_str()));
        previous.dedup();
        let mut placed = Placed::default();
        for name in previous {
            let node = self.by_name.get(name.as_str()).copied();
            match (verdict(model, node, name, now), node) {
                (Verdict::Stays, Some(node))
                    if (placed.nodes.len() as u32) < model.replicas
                        && self.reserve(model, node) =>
                {
                    placed.nodes.push(name.clone());
                }
                (Verdict::Leaves(why), Some(node)) if self.reserve(model, node) => {
                    placed.leaving.push((name.clone(), why));
                }
                _ => {}
            }
        }
        placed
    }

    /// Pass 2: adds replicas on the least loaded fitting nodes until the
    /// model has the wanted count besides its leaving replicas.
    fn add(&mut self, model: &ModelDemand, placed: &mut Placed) {
        let mut reasons = Vec::new();
        let tolerations = taints::with_defaults(&model.tolerations);
        while (placed.nodes.len() as u32) < model.replicas {
            let leaving = |n: &NodeView| placed.leaving.iter().find(|(l, _)| *l == n.name);
            let nodes: &'a [NodeView] = self.nodes;
            let mut candidates: Vec<&'a NodeView> = nodes
                .iter()
                .filter(|n| !placed.nodes.contains(&n.name))
                .filter(|n| {
                    let free = self.free.get(n.name.as_str());
                    let why = leaving(n)
                        .map(|(_, why)| why.clone())
                        .or_else(|| unfit(model, n))
                        .or_else(|| (!fits(free, model)).then(|| capacity_reason(model, n, free)));
                    why.map(|why| reasons.push(why)).is_none()
                })
                .collect();
            candidates.sort_by_key(|n| {
                (
                    taints::soft_penalty(&tolerations, &n.taints),
                    self.load.get(n.name.as_str()).copied().unwrap_or(0),
                    n.name.clone(),
                )
            });
            let Some(node) = candidates.first().copied() else {
                placed.unplaced = Some(unplaced_reason(model, placed.nodes.len(), &reasons));
                break;
            };
            self.reserve(model, node);
            placed.nodes.push(node.name.clone());
        }
        placed.nodes.sort();
    }
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
            draining: false,
            gpu_memory: gpus.iter().map(|g| g * GIB).collect(),
            ready: true,
            failed: BTreeSet::new(),
            serving: BTreeSet::new(),
        }
    }

    fn demand(key: &str, replicas: u32, gpus: u32, gib_per_gpu: u64) -> ModelDemand {
        ModelDemand {
            key: key.into(),
            served_name: key.into(),
            replicas,
            max_unavailable: 0,
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
                    draining: false,
                    gpu_memory: gpus.iter().map(|g| g * GIB).collect(),
                    ready,
                    failed: BTreeSet::new(),
                    serving: BTreeSet::new(),
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
                    max_unavailable: 0,
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
