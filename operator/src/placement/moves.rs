//! Which replicas move, how, and when a leaving one may go: the make
//! before break rule of placement.
//!
//! Guarantees: a forced move ([`Verdict::Goes`]) takes effect in the round
//! that sees its cause. A voluntary move ([`Verdict::Leaves`]) keeps the
//! replica (and its GPUs) while its replacement is placed and loads; a
//! leaving replica that reports Ready goes only when, without it, the
//! model keeps at least `replicas − maxUnavailable` replicas that report
//! Ready; one that does not report Ready serves nothing and goes at once.
//! When the model is short of replicas because no replacement could be
//! placed, the budget is at least one (break before make), so a drain
//! finishes without spare capacity, one replica down at a time.
//!
//! Assumption: readiness is what agents last reported ([`NodeView::serves`]);
//! each round re-derives everything from the nodes, so a leaving replica
//! needs no memory between rounds. Caveat: a `NoExecute` deadline is only
//! seen at the first round after it (every reconcile interval).

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;

use super::{ModelDemand, NodeView, Placed, gone, selector_mismatch};
use crate::taints;

/// What happens this round to a replica already on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It stays and counts toward the wanted replicas.
    Stays,
    /// It moves voluntarily (why): a replacement is placed first and it
    /// keeps its GPUs until [`release`] lets it go.
    Leaves(String),
    /// It goes at once (why): its node or agent is gone or not ready, the
    /// model failed there, or a `NoExecute` taint is not (or no longer)
    /// tolerated.
    Goes(String),
}

/// The verdict for `model`'s replica on the node called `name` (`node`:
/// `None` when no such node is known) at `now`.
pub fn verdict(
    model: &ModelDemand,
    node: Option<&NodeView>,
    name: &str,
    now: Timestamp,
) -> Verdict {
    let Some(node) = node else {
        return Verdict::Goes(format!("node {name} is gone"));
    };
    if let Some(why) = gone(model, node) {
        return Verdict::Goes(why);
    }
    let tolerations = taints::with_defaults(&model.tolerations);
    match taints::eviction_time(&tolerations, &node.taints, now) {
        Some(at) if at <= now => {
            return Verdict::Goes(format!(
                "node {name} has a NoExecute taint the model no longer tolerates"
            ));
        }
        Some(at) => {
            return Verdict::Leaves(format!(
                "node {name} has a NoExecute taint the model tolerates until {at}"
            ));
        }
        None => {}
    }
    if node.draining {
        return Verdict::Leaves(format!("node {name} is draining"));
    }
    match selector_mismatch(model, node) {
        Some(why) => Verdict::Leaves(why),
        None => Verdict::Stays,
    }
}

/// Pass 3 of a round: decides which of `placed.leaving` go now (see the
/// module guarantees), keeps the others in `placed.nodes` and
/// `placed.leaving`, and explains a break before make in
/// `placed.unreplaced`. `placed.nodes` holds the kept and new replicas on
/// entry and is sorted on return.
pub fn release(model: &ModelDemand, nodes: &BTreeMap<&str, &NodeView>, placed: &mut Placed) {
    let serves = |n: &str| nodes.get(n).is_some_and(|v| v.serves(&model.served_name));
    let mut ready = placed.nodes.iter().filter(|n| serves(n)).count() as u32
        + placed.leaving.iter().filter(|(n, _)| serves(n)).count() as u32;
    let short = (placed.nodes.len() as u32) < model.replicas;
    let budget = if short {
        model.max_unavailable.max(1)
    } else {
        model.max_unavailable
    };
    let floor = model.replicas.saturating_sub(budget);
    let mut leaving = std::mem::take(&mut placed.leaving);
    leaving.sort_by(|a, b| a.0.cmp(&b.0));
    let mut early = Vec::new();
    for (node, why) in leaving {
        if !serves(&node) {
            continue;
        }
        if ready > floor {
            ready -= 1;
            if short && ready < model.replicas {
                early.push(format!("{node} ({why})"));
            }
            continue;
        }
        placed.nodes.push(node.clone());
        placed.leaving.push((node, why));
    }
    placed.nodes.sort();
    if !early.is_empty() {
        placed.unreplaced = Some(format!(
            "no replacement could be placed, so the replica on {} went before one was Ready \
             (break before make, one at a time)",
            early.join(", ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn node(name: &str, serving: bool) -> NodeView {
        NodeView {
            name: name.into(),
            labels: BTreeMap::new(),
            taints: vec![],
            unschedulable: false,
            draining: false,
            gpu_memory: vec![],
            ready: true,
            failed: BTreeSet::new(),
            serving: if serving {
                BTreeSet::from(["m".to_owned()])
            } else {
                BTreeSet::new()
            },
        }
    }

    fn demand(replicas: u32, max_unavailable: u32) -> ModelDemand {
        ModelDemand {
            key: "ns/m".into(),
            served_name: "m".into(),
            replicas,
            max_unavailable,
            gpus: 0,
            memory_per_gpu: 0,
            node_selector: BTreeMap::new(),
            tolerations: vec![],
        }
    }

    /// Runs `release` with `kept` and `leaving` (name, serving) replicas.
    fn run(m: &ModelDemand, kept: &[(&str, bool)], leaving: &[(&str, bool)]) -> Placed {
        let views: Vec<NodeView> = kept
            .iter()
            .chain(leaving)
            .map(|(n, s)| node(n, *s))
            .collect();
        let by_name = views.iter().map(|v| (v.name.as_str(), v)).collect();
        let mut placed = Placed {
            nodes: kept.iter().map(|(n, _)| n.to_string()).collect(),
            leaving: leaving
                .iter()
                .map(|(n, _)| (n.to_string(), "draining".to_owned()))
                .collect(),
            ..Placed::default()
        };
        release(m, &by_name, &mut placed);
        placed
    }

    #[test]
    fn a_leaving_replica_waits_for_its_replacement_to_be_ready() {
        let waiting = run(&demand(1, 0), &[("new", false)], &[("old", true)]);
        assert_eq!(waiting.nodes, ["new", "old"]);
        assert_eq!(waiting.leaving.len(), 1);
        let done = run(&demand(1, 0), &[("new", true)], &[("old", true)]);
        assert_eq!(done.nodes, ["new"]);
        assert!(done.leaving.is_empty() && done.unreplaced.is_none());
    }

    #[test]
    fn a_leaving_replica_that_serves_nothing_goes_at_once() {
        let placed = run(&demand(1, 0), &[("new", false)], &[("old", false)]);
        assert_eq!(placed.nodes, ["new"]);
        assert!(placed.unreplaced.is_none());
    }

    #[test]
    fn max_unavailable_bounds_how_many_go_before_replacements_are_ready() {
        let kept = [("n1", false), ("n2", false)];
        let leaving = [("o1", true), ("o2", true)];
        let zero = run(&demand(2, 0), &kept, &leaving);
        assert_eq!(zero.leaving.len(), 2, "maxUnavailable 0: none goes");
        let one = run(&demand(2, 1), &kept, &leaving);
        assert_eq!(one.nodes, ["n1", "n2", "o2"], "maxUnavailable 1: one goes");
        assert!(one.unreplaced.is_none(), "replacements exist: not early");
        let two = run(&demand(2, 2), &kept, &leaving);
        assert_eq!(two.nodes, ["n1", "n2"]);
    }

    #[test]
    fn without_capacity_one_replica_goes_first() {
        // Two wanted, one kept, nothing placed for the leaving one.
        let placed = run(&demand(2, 0), &[("k", true)], &[("old", true)]);
        assert_eq!(placed.nodes, ["k"]);
        let why = placed.unreplaced.expect("break before make is explained");
        assert!(why.contains("old (draining)"), "{why}");
        // Three wanted, one kept: one of two leaving replicas goes, the
        // other waits for capacity.
        let second = run(&demand(3, 0), &[("k", true)], &[("o1", true), ("o2", true)]);
        assert_eq!(second.nodes, ["k", "o2"]);
        // One wanted, none placed: its only replica still goes.
        assert!(run(&demand(1, 0), &[], &[("old", true)]).nodes.is_empty());
    }

    #[test]
    fn verdicts_separate_forced_from_voluntary_moves() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let m = demand(1, 0);
        let mut n = node("a", true);
        assert_eq!(verdict(&m, Some(&n), "a", now), Verdict::Stays);
        assert!(matches!(verdict(&m, None, "a", now), Verdict::Goes(_)));
        n.draining = true;
        assert!(
            matches!(verdict(&m, Some(&n), "a", now), Verdict::Leaves(w) if w.contains("draining"))
        );
        n.failed.insert("m".into());
        assert!(
            matches!(verdict(&m, Some(&n), "a", now), Verdict::Goes(w) if w.contains("failed"))
        );
        let mut picky = m.clone();
        picky.node_selector.insert("pool".into(), "big".into());
        let plain = node("b", true);
        assert!(
            matches!(verdict(&picky, Some(&plain), "b", now), Verdict::Leaves(w) if w.contains("nodeSelector"))
        );
        let mut down = node("c", true);
        down.ready = false;
        assert!(matches!(
            verdict(&m, Some(&down), "c", now),
            Verdict::Goes(_)
        ));
    }
}
