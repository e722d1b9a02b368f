//! The Model controller. Each reconcile runs inside the
//! [`MODEL_FINALIZER`] finalizer:
//!
//! - **Apply**: resolve the Model's policies (a missing one is a
//!   `PolicyNotFound` condition and event, and no replicas), decide its
//!   replica count from collected load, place every Model's replicas over
//!   the nodes (placement is global and stable, so this Model's result is
//!   what its own reconcile would have produced in any order), write this
//!   Model's entry into the NodeAgents that should serve it and take it off
//!   the others, then write its status. Voluntary moves (drains,
//!   `NoExecute` taints with time left, selector changes) keep the old
//!   entry until the replacement's NodeAgent reports the model Ready
//!   ([`crate::placement`]); the status names the replicas still leaving.
//!   Requeued every interval, so load, heartbeats and `NoExecute`
//!   deadlines are re-evaluated.
//! - **Cleanup** (the Model is being deleted): take its entries off every
//!   NodeAgent, record `Unassigned`, and only then release the finalizer; a
//!   failed write keeps the Model and retries with backoff.
//!
//! Placement decisions are serialized by the context's ledger lock, and
//! the ledger remembers what was written this term, so two reconciles never
//! place against a store that has not yet seen the other's writes.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use weir_crds::node_agent::AssignedModel;
use weir_crds::{BatchPolicy, CachePolicy, Model, NodeAgent};

use super::{Context, Error, observe};
use crate::autoscale;
use crate::placement::{self, ModelDemand, NodeView};
use crate::scale_zero::{self, ZeroChange};
use crate::scrape::ModelFigures;
use crate::{apply, drain, world};

/// Finalizer that holds a deleted Model until its replicas are unassigned.
pub const MODEL_FINALIZER: &str = "weir.dev/unassign";

/// `namespace/name` of a Model.
pub fn key(model: &Model) -> String {
    format!(
        "{}/{}",
        model.namespace().unwrap_or_default(),
        model.name_any()
    )
}

/// Reconciles one Model (the controller's entry point).
pub async fn reconcile(model: Arc<Model>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<Model> =
        Api::namespaced(ctx.client.clone(), &model.namespace().unwrap_or_default());
    let work = finalizer(&api, MODEL_FINALIZER, model.clone(), |event| async {
        match event {
            Finalizer::Apply(m) => apply(&m, &ctx).await,
            Finalizer::Cleanup(m) => cleanup(&m, &ctx).await,
        }
    });
    observe(&ctx, model.as_ref(), async {
        let result = work.await;
        ctx.metrics.record("ModelFinalizer", &result);
        result.map_err(super::finalizer_error)
    })
    .await
}

/// Whether an assignment entry comes from `model`.
fn entry_of(entry: &AssignedModel, model: &Model) -> bool {
    entry.model_ref.name == model.name_any()
        && entry.model_ref.namespace == model.namespace().unwrap_or_default()
}

fn node_view(
    agent: &NodeAgent,
    nodes: &[Arc<k8s_openapi::api::core::v1::Node>],
    now: Timestamp,
    ctx: &Context,
) -> NodeView {
    let node = nodes.iter().find(|n| n.name_any() == agent.spec.node_name);
    let status = agent.status.as_ref();
    NodeView {
        name: agent.name_any(),
        labels: node.map(|n| n.labels().clone()).unwrap_or_default(),
        taints: node
            .and_then(|n| n.spec.as_ref()?.taints.clone())
            .unwrap_or_default(),
        unschedulable: node
            .and_then(|n| n.spec.as_ref()?.unschedulable)
            .unwrap_or(false),
        draining: drain::requested(agent, node.map(|n| n.as_ref())),
        gpu_memory: status
            .map(|s| s.gpus.iter().map(|g| g.memory_total_bytes).collect())
            .unwrap_or_default(),
        // A NodeAgent whose Node is gone is not a placement target.
        ready: node.is_some() && world::agent_ready(agent, now, ctx.stale_after),
        failed: status
            .map(|s| {
                s.models
                    .iter()
                    .filter(|m| m.phase == weir_crds::node_agent::ModelPhase::Failed)
                    .map(|m| m.served_name.clone())
                    .collect()
            })
            .unwrap_or_default(),
        serving: status
            .map(|s| {
                s.models
                    .iter()
                    .filter(|m| m.phase == weir_crds::node_agent::ModelPhase::Ready)
                    .map(|m| m.served_name.clone())
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn demand(model: &Model, replicas: u32, weights: u64) -> ModelDemand {
    let gpus = model.spec.resources.gpus;
    ModelDemand {
        key: key(model),
        served_name: world::served_name(model),
        replicas,
        max_unavailable: model.spec.replicas.max_unavailable,
        gpus,
        memory_per_gpu: if weights == 0 {
            0
        } else {
            placement::memory_per_gpu(weights, gpus, model.spec.engine.gpu_memory_utilization)
        },
        node_selector: model.spec.node_selector.clone(),
        tolerations: model.spec.tolerations.clone(),
    }
}

/// The replica count for `model` now: its autoscaler runs on the collected
/// figures, then the scale-to-zero rule (`decide`, with the move to or from
/// zero for its event); or, for the other Models placed alongside it, their
/// last decision stands. A `min: 0` Model starts from the count its status
/// shows, so that an operator restart does not wake every idle Model.
async fn replicas(
    ctx: &Context,
    model: &Model,
    replicas_now: usize,
    figures: &BTreeMap<String, ModelFigures>,
    decide: bool,
) -> (u32, Option<ZeroChange>) {
    let policy = &model.spec.replicas;
    let mut start = policy.min.max(1).min(policy.max);
    if policy.min == 0
        && let Some(status) = &model.status
    {
        start = status.desired_replicas.min(policy.max);
    }
    let mut scale = ctx.scale.lock().await;
    let slot = scale.entry(key(model)).or_insert_with(|| {
        (
            autoscale::ScaleState::default(),
            start,
            scale_zero::IdleState::default(),
        )
    });
    if !decide {
        return (slot.1, None);
    }
    let served = figures.get(&world::served_name(model));
    let observed = served
        .filter(|_| replicas_now > 0)
        .map(|f| match policy.metric {
            weir_crds::model::AutoscaleMetric::QueueDepth => f.waiting / replicas_now as f64,
            weir_crds::model::AutoscaleMetric::KvCacheUsage => f.kv_usage / replicas_now as f64,
        });
    let now = std::time::Instant::now();
    let autoscaled = match slot.1 {
        0 => 0,
        current => autoscale::desired_replicas(
            &scale_zero::autoscaler_policy(policy),
            current,
            observed,
            &mut slot.0,
            now,
        ),
    };
    let (n, change) = scale_zero::decide(policy, slot.1, autoscaled, served, &mut slot.2, now);
    slot.1 = n;
    (n, change)
}

/// Current assignments (Model key → nodes): the NodeAgent specs as cached,
/// overridden by this term's own writes.
fn current(
    agents: &[Arc<NodeAgent>],
    ledger: &BTreeMap<String, Vec<String>>,
) -> BTreeMap<String, Vec<String>> {
    let mut current: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for agent in agents {
        for m in &agent.spec.models {
            current
                .entry(format!("{}/{}", m.model_ref.namespace, m.model_ref.name))
                .or_default()
                .push(agent.name_any());
        }
    }
    current.extend(ledger.iter().map(|(k, v)| (k.clone(), v.clone())));
    current
}

/// Of the Models asking for `model`'s served name, the one that gets it:
/// the oldest, then the first by key. The others are not placed (a served
/// name routes to one Model cluster-wide).
fn name_holder<'a>(model: &Model, all: &[&'a Model]) -> &'a Model {
    let served = world::served_name(model);
    all.iter()
        .copied()
        .filter(|m| world::served_name(m) == served)
        .min_by_key(|m| (m.metadata.creation_timestamp.as_ref().map(|t| t.0), key(m)))
        .expect("the model itself asks for its name")
}

/// What apply decided for one Model.
struct Decision {
    replicas: u32,
    entry: Option<AssignedModel>,
    placed: placement::Placed,
    problem: Option<(String, String)>,
    /// A move to or from zero made now.
    zero: Option<ZeroChange>,
}

async fn decide(
    model: &Model,
    ctx: &Context,
    agents: &[Arc<NodeAgent>],
    current: &BTreeMap<String, Vec<String>>,
    now: Timestamp,
) -> Decision {
    let me = key(model);
    let c = &ctx.caches;
    let caches: Vec<CachePolicy> = c.caches.state().iter().map(|p| (**p).clone()).collect();
    let batches: Vec<BatchPolicy> = c.batches.state().iter().map(|p| (**p).clone()).collect();
    let nodes = c.nodes.state();
    let views: Vec<NodeView> = agents
        .iter()
        .map(|a| node_view(a, &nodes, now, ctx))
        .collect();
    let figures = ctx.figures.read().await.clone();
    let reported = crate::weights::reported(agents);
    let others: Vec<Arc<Model>> = c
        .models
        .state()
        .into_iter()
        .filter(|m| m.metadata.deletion_timestamp.is_none() && key(m) != me)
        .collect();
    let mut demands = Vec::new();
    let mut decision = Decision {
        replicas: 0,
        entry: None,
        placed: placement::Placed::default(),
        problem: None,
        zero: None,
    };
    let all: Vec<&Model> = others.iter().map(|m| m.as_ref()).chain([model]).collect();
    for &m in &all {
        let mine = key(m) == me;
        let holder = name_holder(m, &all);
        if key(holder) != key(m) {
            if mine {
                let message = format!(
                    "served name `{}` is already used by Model {}",
                    world::served_name(m),
                    key(holder)
                );
                decision.problem = Some(("ServedNameConflict".into(), message));
            }
            continue;
        }
        match world::resolve_policies(m, &caches, &batches) {
            Ok((cache, batch)) => {
                let now_placed = current.get(&key(m)).map_or(0, Vec::len);
                let (n, zero) = replicas(ctx, m, now_placed, &figures, mine).await;
                demands.push(demand(m, n, ctx.weights.of(m, &reported).await));
                if mine {
                    decision.replicas = n;
                    decision.zero = zero;
                    decision.entry = Some(world::assignment(m, cache, batch));
                }
            }
            Err(missing) if mine => {
                let message = format!(
                    "{} names `{}`, which does not exist in this namespace",
                    missing.field, missing.name
                );
                decision.problem = Some(("PolicyNotFound".into(), message));
            }
            Err(_) => {}
        }
    }
    // Replicas whose tolerated NoExecute taints run out move at the next
    // reconcile after the deadline (every `interval`).
    let mut placed = placement::place_at(&views, &demands, current, now);
    decision.placed = placed.remove(&me).unwrap_or_default();
    if decision.problem.is_none() {
        decision.problem = placement_problem(&decision.placed);
    }
    decision
}

/// The Model's problem from its placement: a replica that went before its
/// replacement was Ready (`MovedBeforeReplacement`), or too few replicas
/// placed (`Unplaced`).
fn placement_problem(placed: &placement::Placed) -> Option<(String, String)> {
    match (&placed.unreplaced, &placed.unplaced) {
        (Some(early), Some(why)) => {
            Some(("MovedBeforeReplacement".into(), format!("{early}; {why}")))
        }
        (Some(early), None) => Some(("MovedBeforeReplacement".into(), early.clone())),
        (None, Some(why)) => Some(("Unplaced".into(), why.clone())),
        (None, None) => None,
    }
}

/// What the Model's condition and `Placed` event say about replicas that
/// are leaving (kept until their replacements report Ready).
fn moving_note(placed: &placement::Placed) -> Option<String> {
    if placed.leaving.is_empty() {
        return None;
    }
    let list: Vec<String> = placed
        .leaving
        .iter()
        .map(|(node, why)| format!("{node} ({why})"))
        .collect();
    Some(format!(
        "moving off {}: kept until replacements report Ready",
        list.join(", ")
    ))
}

async fn apply(model: &Model, ctx: &Context) -> Result<Action, Error> {
    let now = Timestamp::now();
    let agents = ctx.caches.agents.state();
    let mut ledger = ctx.placing.lock().await;
    let current = current(&agents, &ledger);
    let d = decide(model, ctx, &agents, &current, now).await;
    let previously = current.get(&key(model)).cloned().unwrap_or_default();
    let written = assign(
        ctx,
        model,
        d.entry.as_ref(),
        &d.placed.nodes,
        &agents,
        &previously,
    )
    .await;
    match &written {
        Ok(()) => ledger.insert(key(model), d.placed.nodes.clone()),
        // What a failed write left is unknown: trust the store again.
        Err(_) => ledger.remove(&key(model)),
    };
    drop(ledger);
    write_status(ctx, model, &d, &agents, now).await?;
    written?;
    Ok(Action::requeue(ctx.interval))
}

/// Writes `model`'s entry where it is placed and removes it elsewhere.
async fn assign(
    ctx: &Context,
    model: &Model,
    entry: Option<&AssignedModel>,
    nodes: &[String],
    agents: &[Arc<NodeAgent>],
    previously: &[String],
) -> Result<(), Error> {
    let manager = apply::model_manager(&model.namespace().unwrap_or_default(), &model.name_any());
    let served = world::served_name(model);
    let mut failed = Vec::new();
    for agent in agents {
        let name = agent.name_any();
        let has = agent.spec.models.iter().find(|m| entry_of(m, model));
        let want = entry.filter(|_| nodes.contains(&name));
        let (reason, note) = match (want, has) {
            (Some(w), Some(h)) if w == h => continue,
            (None, None) if !previously.contains(&name) => continue,
            (Some(_), Some(_)) => ("Updated", format!("settings of `{served}` changed")),
            (Some(_), None) => ("Assigned", format!("serves `{served}`")),
            (None, Some(_)) => ("Unassigned", format!("no longer serves `{served}`")),
            // Our own earlier write the cache has not seen yet.
            (None, None) => ("", String::new()),
        };
        let result = apply::assignment(&ctx.client, &name, &manager, want).await;
        ctx.metrics.record("NodeAgent", &result);
        match result {
            Ok(()) if !reason.is_empty() => {
                apply::event(&ctx.client, agent.as_ref(), false, reason, note).await;
            }
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(agent = %name, model = %key(model), error = %e, "writing NodeAgent spec");
                failed.push(e);
            }
        }
    }
    match failed.len() {
        0 => Ok(()),
        n => Err(Error::AgentsNotWritten(n, failed.remove(0))),
    }
}

async fn write_status(
    ctx: &Context,
    model: &Model,
    d: &Decision,
    agents: &[Arc<NodeAgent>],
    now: Timestamp,
) -> Result<(), Error> {
    let by_name: BTreeMap<String, &NodeAgent> =
        agents.iter().map(|a| (a.name_any(), a.as_ref())).collect();
    let mut status = world::model_status(
        model,
        d.replicas,
        &d.placed.nodes,
        &by_name,
        now,
        ctx.stale_after,
        d.problem.as_ref().map(|(r, m)| (r.as_str(), m.clone())),
    );
    status.performance = ctx.history.read().await.report(&world::served_name(model));
    let was_alert = model
        .status
        .as_ref()
        .and_then(|s| s.performance.as_ref())
        .is_some_and(|p| p.alert);
    if let (Some(note), Some(c)) = (moving_note(&d.placed), status.common.conditions.first_mut()) {
        c.message = format!("{}; {note}", c.message);
    }
    let result = apply::model_status(&ctx.client, model, &status).await;
    ctx.metrics.record("Model", &result);
    let changed = result?;
    if let Some(zero) = &d.zero {
        let (reason, note) = zero.event(&world::served_name(model));
        tracing::info!(model = %key(model), reason, "{note}");
        apply::event(&ctx.client, model, false, reason, note).await;
    }
    if changed {
        if let Some(alarm) = performance_event(was_alert, status.performance.as_ref()) {
            let (warning, reason, message) = alarm;
            apply::event(&ctx.client, model, warning, reason, message).await;
        }
        if let Some((reason, message)) = &d.problem {
            apply::event(&ctx.client, model, true, reason, message.clone()).await;
        } else if model.status.as_ref().map(|s| &s.nodes) != Some(&d.placed.nodes) {
            let mut note = format!("replicas on {:?}", d.placed.nodes);
            if let Some(moving) = moving_note(&d.placed) {
                note = format!("{note}; {moving}");
            }
            apply::event(&ctx.client, model, false, "Placed", note).await;
        }
    }
    Ok(())
}

/// The event for a Model whose performance entered or left alert.
fn performance_event(
    was_alert: bool,
    now: Option<&weir_crds::performance::PerformanceReport>,
) -> Option<(bool, &'static str, String)> {
    let report = now?;
    let f = &report.figures;
    let figures = format!(
        "grade {}: {:.1} % success, TTFT p50 {:.0} ms, latency p50 {:.0} ms over {} requests",
        report.grade,
        f.success_rate * 100.0,
        f.p50_ttft_ms,
        f.p50_latency_ms,
        f.requests
    );
    match (was_alert, report.alert) {
        (false, true) => Some((true, "PerformanceAlert", figures)),
        (true, false) => Some((false, "PerformanceRecovered", figures)),
        _ => None,
    }
}

async fn cleanup(model: &Model, ctx: &Context) -> Result<Action, Error> {
    let agents = ctx.caches.agents.state();
    let mut ledger = ctx.placing.lock().await;
    let previously = ledger.get(&key(model)).cloned().unwrap_or_default();
    assign(ctx, model, None, &[], &agents, &previously).await?;
    ledger.remove(&key(model));
    ctx.scale.lock().await.remove(&key(model));
    drop(ledger);
    let note = format!(
        "`{}` is no longer served by any node",
        world::served_name(model)
    );
    apply::event(&ctx.client, model, false, "Unassigned", note).await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_terms_writes_override_the_cached_specs() {
        let agent: NodeAgent = serde_json::from_value(serde_json::json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "NodeAgent", "metadata": {"name": "gpu-1"},
            "spec": {"nodeName": "gpu-1", "models": [{"servedName": "a",
                "modelRef": {"namespace": "ml", "name": "a"}, "source": {"uri": "file:///m"}}]}}))
        .unwrap();
        let agents = vec![Arc::new(agent)];
        let mut ledger = BTreeMap::new();
        assert_eq!(current(&agents, &ledger)["ml/a"], ["gpu-1"]);
        ledger.insert("ml/a".to_owned(), vec!["gpu-2".to_owned()]);
        ledger.insert("ml/b".to_owned(), vec![]);
        let c = current(&agents, &ledger);
        assert_eq!(c["ml/a"], ["gpu-2"]);
        assert!(c["ml/b"].is_empty());
    }
}
