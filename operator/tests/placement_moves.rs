//! Make before break: voluntary moves (a drain, a `NoExecute` taint
//! tolerated for a while, a node selector that no longer matches) place
//! the replacement first and take the old replica away once enough
//! replicas report Ready, at most `maxUnavailable` down at a time (one at a
//! time when no replacement can be placed); forced moves (node or agent
//! gone, model failed there, `NoExecute` past its toleration) are
//! immediate. Unit cases per rule, then a property over several rounds in
//! which replacements become Ready after a random number of rounds.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;
use weir_operator::placement::{ModelDemand, NodeView, Placed, place_at};

const GIB: u64 = 1 << 30;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn node(name: &str, gpus: usize) -> NodeView {
    NodeView {
        name: name.into(),
        labels: BTreeMap::from([("pool".into(), "a".into())]),
        taints: vec![],
        unschedulable: false,
        draining: false,
        gpu_memory: vec![80 * GIB; gpus],
        ready: true,
        failed: BTreeSet::new(),
        serving: BTreeSet::new(),
    }
}

fn model(key: &str, replicas: u32, max_unavailable: u32) -> ModelDemand {
    ModelDemand {
        key: key.into(),
        served_name: key.into(),
        replicas,
        max_unavailable,
        gpus: 1,
        memory_per_gpu: 40 * GIB,
        node_selector: BTreeMap::new(),
        tolerations: vec![],
    }
}

fn on(key: &str, nodes: &[&str]) -> BTreeMap<String, Vec<String>> {
    BTreeMap::from([(
        key.to_owned(),
        nodes.iter().map(|n| n.to_string()).collect(),
    )])
}

fn serve(nodes: &mut [NodeView], served: &str, on: &[&str]) {
    for n in nodes.iter_mut().filter(|n| on.contains(&n.name.as_str())) {
        n.serving.insert(served.into());
    }
}

fn round(nodes: &[NodeView], m: &ModelDemand, current: &[&str]) -> Placed {
    place_at(nodes, std::slice::from_ref(m), &on(&m.key, current), at(0))[&m.key].clone()
}

#[test]
fn a_drain_places_the_replacement_first_and_removes_the_old_one_once_it_is_ready() {
    let mut nodes = vec![node("a", 1), node("b", 1), node("c", 1)];
    serve(&mut nodes, "m", &["a"]);
    nodes[0].draining = true;
    let m = model("m", 1, 0);
    let first = round(&nodes, &m, &["a"]);
    assert_eq!(first.nodes, ["a", "b"], "replacement on b, a kept");
    assert_eq!(
        first.leaving,
        [("a".to_owned(), "node a is draining".to_owned())]
    );
    assert!(first.unplaced.is_none() && first.unreplaced.is_none());
    // The replacement loads: nothing changes.
    assert_eq!(round(&nodes, &m, &["a", "b"]).nodes, ["a", "b"]);
    // It reports Ready: the old replica goes.
    serve(&mut nodes, "m", &["b"]);
    let done = round(&nodes, &m, &["a", "b"]);
    assert_eq!(done.nodes, ["b"]);
    assert!(done.leaving.is_empty());
    // Nothing new goes to a draining node.
    assert_eq!(round(&nodes, &model("m", 3, 0), &[]).nodes, ["b", "c"]);
}

#[test]
fn a_drain_without_spare_capacity_breaks_before_making_one_at_a_time() {
    // Two nodes, one GPU each; b's GPU is taken by another model.
    let mut nodes = vec![node("a", 1), node("b", 1)];
    serve(&mut nodes, "m", &["a"]);
    serve(&mut nodes, "other", &["b"]);
    nodes[0].draining = true;
    let (m, other) = (model("m", 1, 0), model("other", 1, 0));
    let current = BTreeMap::from([
        ("m".to_owned(), vec!["a".to_owned()]),
        ("other".to_owned(), vec!["b".to_owned()]),
    ]);
    let out = place_at(&nodes, &[m, other], &current, at(0));
    let placed = &out["m"];
    assert!(
        placed.nodes.is_empty(),
        "the drain still finishes: {placed:?}"
    );
    assert!(
        placed
            .unplaced
            .as_ref()
            .unwrap()
            .contains("node a is draining")
    );
    let why = placed.unreplaced.as_ref().expect("explained");
    assert!(why.contains("break before make"), "{why}");
    assert_eq!(out["other"].nodes, ["b"]);
}

#[test]
fn max_unavailable_one_lets_one_replica_go_before_its_replacement_is_ready() {
    let mut nodes = vec![node("a", 1), node("b", 1), node("c", 1), node("d", 1)];
    serve(&mut nodes, "m", &["a", "b"]);
    nodes[0].draining = true;
    nodes[1].draining = true;
    let zero = round(&nodes, &model("m", 2, 0), &["a", "b"]);
    assert_eq!(zero.nodes, ["a", "b", "c", "d"], "0: both kept");
    let one = round(&nodes, &model("m", 2, 1), &["a", "b"]);
    assert_eq!(one.nodes, ["b", "c", "d"], "1: one goes at once");
    assert!(one.unreplaced.is_none(), "its replacement is placed");
    // With one replacement Ready, maxUnavailable 0 lets one old one go.
    serve(&mut nodes, "m", &["c"]);
    let zero = round(&nodes, &model("m", 2, 0), &["a", "b", "c", "d"]);
    assert_eq!(zero.nodes, ["b", "c", "d"]);
}

#[test]
fn a_selector_change_moves_replicas_make_before_break() {
    let mut nodes = vec![node("a", 1), node("b", 1)];
    nodes[1].labels.insert("pool".into(), "b".into());
    serve(&mut nodes, "m", &["a"]);
    let mut m = model("m", 1, 0);
    m.node_selector.insert("pool".into(), "b".into());
    let moving = round(&nodes, &m, &["a"]);
    assert_eq!(moving.nodes, ["a", "b"]);
    assert!(
        moving.leaving[0].1.contains("nodeSelector pool=b"),
        "{moving:?}"
    );
    serve(&mut nodes, "m", &["b"]);
    assert_eq!(round(&nodes, &m, &["a", "b"]).nodes, ["b"]);
}

#[test]
fn forced_moves_are_immediate_whatever_max_unavailable_says() {
    let mut nodes = vec![node("a", 1), node("b", 1), node("c", 1)];
    serve(&mut nodes, "m", &["a", "b"]);
    let m = model("m", 2, 0);
    // The agent on a stops being ready.
    nodes[0].ready = false;
    assert_eq!(round(&nodes, &m, &["a", "b"]).nodes, ["b", "c"]);
    // The model failed on a (agent ready again).
    nodes[0].ready = true;
    nodes[0].failed.insert("m".into());
    assert_eq!(round(&nodes, &m, &["a", "b"]).nodes, ["b", "c"]);
    // Node a is gone from the list.
    assert_eq!(round(&nodes[1..], &m, &["a", "b"]).nodes, ["b", "c"]);
    // An untolerated NoExecute taint.
    nodes[0].failed.clear();
    nodes[0].taints = vec![Taint {
        key: "maintenance".into(),
        effect: "NoExecute".into(),
        value: None,
        time_added: None,
    }];
    assert_eq!(round(&nodes, &m, &["a", "b"]).nodes, ["b", "c"]);
}

#[test]
fn leaving_replicas_keep_their_gpus_and_do_not_count_toward_the_wanted_replicas() {
    // One GPU each; a is draining and serves m. A second model wants one
    // replica too: it must not take a's GPU while m's replica is there.
    let mut nodes = vec![node("a", 1), node("b", 1), node("c", 1)];
    serve(&mut nodes, "m", &["a"]);
    nodes[0].draining = true;
    nodes[0].taints.clear();
    let out = place_at(
        &nodes,
        &[model("m", 1, 0), model("n", 2, 0)],
        &on("m", &["a"]),
        at(0),
    );
    assert_eq!(out["m"].nodes, ["a", "b"]);
    assert_eq!(out["n"].nodes, ["c"], "a's GPU is still held");
    assert!(out["n"].unplaced.is_some());
}

/// One simulated cluster: nodes, models, and when each replica was placed.
struct Sim {
    nodes: Vec<NodeView>,
    models: Vec<ModelDemand>,
    current: BTreeMap<String, Vec<String>>,
    /// (model, node) → round at which that replica reports Ready.
    ready_at: BTreeMap<(String, String), usize>,
}

impl Sim {
    /// Readiness as agents report it in round `r`.
    fn observe(&mut self, r: usize) {
        for n in &mut self.nodes {
            n.serving = self
                .ready_at
                .iter()
                .filter(|((_, node), at)| *node == n.name && **at <= r)
                .map(|((m, _), _)| m.clone())
                .collect();
        }
    }

    fn ready(&self, key: &str, nodes: &[String]) -> u32 {
        let by_name: BTreeMap<&str, &NodeView> =
            self.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
        nodes
            .iter()
            .filter(|n| by_name.get(n.as_str()).is_some_and(|v| v.serves(key)))
            .count() as u32
    }

    /// Applies a round's outcome; new replicas become Ready `delay` later.
    fn apply(&mut self, out: &BTreeMap<String, Placed>, r: usize, delays: &[usize]) {
        for (key, placed) in out {
            let before = self.current.get(key).cloned().unwrap_or_default();
            for n in &placed.nodes {
                if !before.contains(n) {
                    let delay = delays[(r + n.len() + key.len()) % delays.len()];
                    self.ready_at
                        .insert((key.clone(), n.clone()), r + 1 + delay);
                }
            }
            self.ready_at
                .retain(|(k, n), _| k != key || placed.nodes.contains(n));
            self.current.insert(key.clone(), placed.nodes.clone());
        }
    }
}

const MAINTENANCE: &str = "maintenance";

/// A generated scenario.
#[derive(Clone, Debug)]
struct Scenario {
    /// Nodes (two GPUs each; odd ones labelled `zone=x`).
    nodes: usize,
    /// Per model: replicas, maxUnavailable, whether its selector changes
    /// to `zone=x`.
    models: Vec<(u32, u32, bool)>,
    /// Nodes drained (the last node is tainted instead).
    drained: Vec<usize>,
    /// Rounds a new replica takes to report Ready, used in turn.
    delays: Vec<usize>,
    /// `tolerationSeconds` of the `maintenance` NoExecute taint (one
    /// round is one second).
    toleration: i64,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        3usize..8,
        prop::collection::vec((1u32..4, 0u32..3, any::<bool>()), 1..4),
        prop::collection::vec(0usize..8, 1..4),
        prop::collection::vec(0usize..5, 1..6),
        2i64..10,
    )
        .prop_map(|(nodes, models, drained, delays, toleration)| Scenario {
            nodes,
            models,
            drained,
            delays,
            toleration,
        })
}

impl Sim {
    /// Round 0 of `s`: every replica placed and Ready.
    fn start(s: &Scenario) -> Self {
        let nodes: Vec<NodeView> = (0..s.nodes)
            .map(|i| {
                let mut n = node(&format!("n{i}"), 2);
                if i % 2 == 1 {
                    n.labels.insert("zone".into(), "x".into());
                }
                n
            })
            .collect();
        let models: Vec<ModelDemand> = s
            .models
            .iter()
            .enumerate()
            .map(|(i, (replicas, max_unavailable, _))| {
                let mut m = model(&format!("m{i}"), *replicas, *max_unavailable);
                m.tolerations = vec![Toleration {
                    key: Some(MAINTENANCE.into()),
                    operator: Some("Exists".into()),
                    effect: Some("NoExecute".into()),
                    toleration_seconds: Some(s.toleration),
                    value: None,
                }];
                m
            })
            .collect();
        let mut sim = Sim {
            nodes,
            models,
            current: BTreeMap::new(),
            ready_at: BTreeMap::new(),
        };
        let out = place_at(&sim.nodes, &sim.models, &sim.current, at(0));
        sim.apply(&out, 0, &[0]);
        sim.ready_at.values_mut().for_each(|v| *v = 0);
        sim
    }

    /// Round 1's changes: drains, a `maintenance` NoExecute taint added at
    /// 1 s on the last node, selector changes. Returns the tainted node.
    fn disrupt(&mut self, s: &Scenario) -> String {
        let last = self.nodes.len() - 1;
        for d in s.drained.iter().filter(|d| **d < last) {
            self.nodes[*d].draining = true;
        }
        self.nodes[last].taints = vec![Taint {
            key: MAINTENANCE.into(),
            effect: "NoExecute".into(),
            value: None,
            time_added: Some(Time(at(1))),
        }];
        for (m, (_, _, picky)) in self.models.iter_mut().zip(&s.models) {
            if *picky {
                m.node_selector.insert("zone".into(), "x".into());
            }
        }
        self.nodes[last].name.clone()
    }

    /// The invariants of one round's outcome for `m` (round `r`; the
    /// tainted node's deadline is `deadline`).
    fn check(
        &self,
        m: &ModelDemand,
        placed: &Placed,
        r: usize,
        tainted: &str,
        deadline: usize,
    ) -> Result<(), TestCaseError> {
        let before = self.current.get(&m.key).cloned().unwrap_or_default();
        let after = &placed.nodes;
        // Forced: from the deadline on nothing stays on the tainted node.
        if r >= deadline {
            prop_assert!(!after.iter().any(|n| n == tainted), "round {r}: {placed:?}");
        }
        // Nothing new goes to a draining node.
        for n in after.iter().filter(|n| !before.contains(n)) {
            let v = self.nodes.iter().find(|x| &x.name == n).unwrap();
            prop_assert!(!v.draining, "new replica on draining {n}");
        }
        // Voluntary: Ready replicas never drop below the floor (what the
        // forced deadline took aside).
        let lost: Vec<String> = before.iter().filter(|n| *n == tainted).cloned().collect();
        let forced = if r == deadline {
            self.ready(&m.key, &lost)
        } else {
            0
        };
        let budget = if placed.unplaced.is_some() {
            m.max_unavailable.max(1)
        } else {
            m.max_unavailable
        };
        let floor = m.replicas.saturating_sub(budget);
        let was = self.ready(&m.key, &before) - forced;
        let now = self.ready(&m.key, after);
        prop_assert!(
            now >= was.min(floor),
            "round {r}, {}: ready {now} < min({was}, {floor}); before {before:?}, after {placed:?}",
            m.key
        );
        for (n, _) in &placed.leaving {
            prop_assert!(after.contains(n), "a held leaving replica keeps its entry");
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn voluntary_moves_keep_enough_replicas_ready_and_finish(s in scenario()) {
        let mut sim = Sim::start(&s);
        let tainted = sim.disrupt(&s);
        let deadline = 1 + s.toleration as usize;
        let rounds = deadline + 12;
        for r in 1..=rounds {
            sim.observe(r);
            let out = place_at(&sim.nodes, &sim.models, &sim.current, at(r as i64));
            for m in &sim.models {
                sim.check(m, &out[&m.key], r, &tainted, deadline)?;
            }
            sim.apply(&out, r, &s.delays);
        }
        // Eventually every leaving replica has gone, unless no replacement
        // could be placed (then the model is short and says so).
        sim.observe(rounds + 1);
        let last = place_at(&sim.nodes, &sim.models, &sim.current, at(rounds as i64 + 1));
        for m in &sim.models {
            let placed = &last[&m.key];
            prop_assert!(
                placed.leaving.is_empty() || placed.unplaced.is_some(),
                "{}: still leaving after {rounds} rounds: {placed:?}", m.key
            );
            if placed.unplaced.is_none() {
                for n in &placed.nodes {
                    let v = sim.nodes.iter().find(|x| &x.name == n).unwrap();
                    prop_assert!(!v.draining && v.taints.is_empty(), "{}: left on {n}", m.key);
                }
            }
        }
    }
}
