//! The operator's control loop. Watches every Weir kind, Nodes and
//! NodeAgents into local caches; on any change (and every `interval`, for
//! heartbeats and collected metrics) the leader runs one round: resolve
//! each Model's policies, decide its replica count from collected load,
//! place replicas on nodes, write NodeAgent specs, Model and policy
//! statuses, reweight ensembles, and explain decisions with events.
//!
//! Every Model carries the finalizer [`MODEL_FINALIZER`], added by the
//! round that first sees it: deleting a Model leaves it in place until a
//! round has taken its assignments off every NodeAgent (the agents stop
//! serving it), recorded an `Unassigned` event, and only then released it.
//! A round whose NodeAgent writes fail keeps the finalizer, and the next
//! round tries again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt, stream};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tokio::sync::Mutex;
use weir_crds::{BatchPolicy, CachePolicy, Model, ModelEnsemble, NodeAgent};

use crate::autoscale::{self, ScaleState};
use crate::placement::{self, ModelDemand, NodeView};
use crate::scrape::{self, ModelFigures};
use crate::{apply, world};

/// Finalizer that holds a deleted Model until its replicas are unassigned.
pub const MODEL_FINALIZER: &str = "weir.dev/unassign";

pub use crate::weights::WEIGHT_BYTES_ANNOTATION;

/// Shared state of the control loop.
pub struct Context {
    /// Kubernetes client.
    pub client: kube::Client,
    /// Whether this replica may write.
    pub leader: Arc<AtomicBool>,
    /// Client for scraping agents.
    pub http: reqwest::Client,
    /// Heartbeats older than this mark an agent not ready.
    pub stale_after: Duration,
    /// Seconds between rounds without changes.
    pub interval: Duration,
    /// Control-loop metrics.
    pub metrics: crate::metrics::OperatorMetrics,
    /// Weight sizes for the GPU memory estimate.
    pub weights: crate::weights::WeightSizes,
    scale: Mutex<HashMap<String, (ScaleState, u32)>>,
    last_reweight: Mutex<HashMap<String, Instant>>,
    previous_figures: Mutex<BTreeMap<String, ModelFigures>>,
}

impl Context {
    /// A context for `client`.
    pub fn new(
        client: kube::Client,
        leader: Arc<AtomicBool>,
        metrics: crate::metrics::OperatorMetrics,
    ) -> Self {
        Self {
            metrics,
            client,
            leader,
            http: reqwest::Client::new(),
            weights: crate::weights::WeightSizes::from_env(),
            stale_after: Duration::from_secs(45),
            interval: Duration::from_secs(10),
            scale: Mutex::default(),
            last_reweight: Mutex::default(),
            previous_figures: Mutex::default(),
        }
    }
}

/// The watched caches.
#[derive(Clone)]
pub struct Caches {
    models: Store<Model>,
    ensembles: Store<ModelEnsemble>,
    caches: Store<CachePolicy>,
    batches: Store<BatchPolicy>,
    agents: Store<NodeAgent>,
    nodes: Store<Node>,
}

impl Caches {
    /// Caches over existing stores (tests fill them from fixed objects).
    pub fn from_stores(
        models: Store<Model>,
        ensembles: Store<ModelEnsemble>,
        caches: Store<CachePolicy>,
        batches: Store<BatchPolicy>,
        agents: Store<NodeAgent>,
        nodes: Store<Node>,
    ) -> Self {
        Self {
            models,
            ensembles,
            caches,
            batches,
            agents,
            nodes,
        }
    }
}

fn watch<K>(api: Api<K>) -> (Store<K>, stream::BoxStream<'static, ()>)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let events = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .map(|_| ())
        .boxed();
    (reader, events)
}

/// Runs the loop forever.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let (models, s1) = watch(Api::<Model>::all(client.clone()));
    let (ensembles, s2) = watch(Api::<ModelEnsemble>::all(client.clone()));
    let (caches, s3) = watch(Api::<CachePolicy>::all(client.clone()));
    let (batches, s4) = watch(Api::<BatchPolicy>::all(client.clone()));
    let (agents, s5) = watch(Api::<NodeAgent>::all(client.clone()));
    let (nodes, s6) = watch(Api::<Node>::all(client.clone()));
    let caches_all = Caches {
        models,
        ensembles,
        caches,
        batches,
        agents,
        nodes,
    };
    let mut changes = stream::select_all([s1, s2, s3, s4, s5, s6]);
    let mut tick = tokio::time::interval(ctx.interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            change = changes.next() => if change.is_none() { return },
        }
        // Coalesce bursts of events into one round.
        tokio::time::sleep(Duration::from_millis(300)).await;
        while let Some(Some(())) = changes.next().now_or_never() {}
        if ctx.leader.load(Ordering::Acquire) {
            let started = Instant::now();
            round(&ctx, &caches_all).await;
            ctx.metrics.rounds.inc();
            ctx.metrics
                .round_seconds
                .observe(started.elapsed().as_secs_f64());
        }
    }
}

fn key(model: &Model) -> String {
    format!(
        "{}/{}",
        model.namespace().unwrap_or_default(),
        model.name_any()
    )
}

fn node_view(agent: &NodeAgent, nodes: &[Arc<Node>], now: Timestamp, stale: Duration) -> NodeView {
    let node = nodes.iter().find(|n| n.name_any() == agent.spec.node_name);
    let gpus = agent
        .status
        .as_ref()
        .map(|s| s.gpus.iter().map(|g| g.memory_total_bytes).collect())
        .unwrap_or_default();
    let failed = agent
        .status
        .as_ref()
        .map(|s| {
            s.models
                .iter()
                .filter(|m| m.phase == weir_crds::node_agent::ModelPhase::Failed)
                .map(|m| m.served_name.clone())
                .collect()
        })
        .unwrap_or_default();
    NodeView {
        name: agent.name_any(),
        labels: node.map(|n| n.labels().clone()).unwrap_or_default(),
        taints: node
            .and_then(|n| n.spec.as_ref()?.taints.clone())
            .unwrap_or_default(),
        gpu_memory: gpus,
        // A NodeAgent whose Node is gone is not a placement target.
        ready: node.is_some() && world::agent_ready(agent, now, stale),
        failed,
    }
}

/// Collected figures per served model, summed over the ready agents.
async fn collect(
    ctx: &Context,
    agents: &[Arc<NodeAgent>],
    now: Timestamp,
) -> BTreeMap<String, ModelFigures> {
    let endpoints: Vec<String> = agents
        .iter()
        .filter(|a| world::agent_ready(a, now, ctx.stale_after))
        .filter_map(|a| a.status.as_ref()?.endpoint.clone())
        .collect();
    let scrapes = futures::future::join_all(
        endpoints
            .iter()
            .map(|e| scrape::scrape(&ctx.http, e, Duration::from_secs(2))),
    )
    .await;
    let mut total: BTreeMap<String, ModelFigures> = BTreeMap::new();
    for result in scrapes {
        match result {
            Ok(models) => {
                for (name, f) in models {
                    let t = total.entry(name).or_default();
                    t.waiting += f.waiting;
                    t.running += f.running;
                    t.kv_usage += f.kv_usage;
                    t.successes += f.successes;
                    t.failures += f.failures;
                    t.e2e.add(&f.e2e);
                    t.ttft.add(&f.ttft);
                }
            }
            Err(e) => tracing::debug!(error = %e, "scrape"),
        }
    }
    total
}

/// One round of decisions and writes.
pub async fn round(ctx: &Context, c: &Caches) {
    let now = Timestamp::now();
    let (models, agents, nodes) = (c.models.state(), c.agents.state(), c.nodes.state());
    let caches: Vec<CachePolicy> = c.caches.state().iter().map(|p| (**p).clone()).collect();
    let batches: Vec<BatchPolicy> = c.batches.state().iter().map(|p| (**p).clone()).collect();
    let figures = collect(ctx, &agents, now).await;
    let views: Vec<NodeView> = agents
        .iter()
        .map(|a| node_view(a, &nodes, now, ctx.stale_after))
        .collect();
    let mut current: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for agent in &agents {
        for m in &agent.spec.models {
            current
                .entry(format!("{}/{}", m.model_ref.namespace, m.model_ref.name))
                .or_default()
                .push(agent.name_any());
        }
    }
    let reported = crate::weights::reported(&agents);
    let mut demands = Vec::new();
    let mut resolved = BTreeMap::new();
    let mut problems: BTreeMap<String, (String, String)> = BTreeMap::new();
    let (deleting, models): (Vec<Arc<Model>>, Vec<Arc<Model>>) = models
        .into_iter()
        .partition(|m| m.metadata.deletion_timestamp.is_some());
    for model in &models {
        match world::resolve_policies(model, &caches, &batches) {
            Ok((cache, batch)) => {
                let desired = desired(
                    ctx,
                    model,
                    current.get(&key(model)).map_or(0, Vec::len),
                    &figures,
                )
                .await;
                let weights = ctx.weights.of(model, &reported).await;
                demands.push(demand(model, desired, weights));
                resolved.insert(key(model), world::assignment(model, cache, batch));
            }
            Err(missing) => {
                let message = format!(
                    "{} names `{}`, which does not exist in this namespace",
                    missing.field, missing.name
                );
                problems.insert(key(model), ("PolicyNotFound".into(), message));
            }
        }
    }
    mark_stale_agents(ctx, &agents, now).await;
    let placed = placement::place(&views, &demands, &current);
    let agents_written = write_agents(ctx, &agents, &placed, &resolved).await;
    write_models(ctx, &models, &demands, &placed, &agents, problems, now).await;
    for model in models.iter().chain(&deleting) {
        finalize(ctx, model, agents_written).await;
    }
    write_policy_counts(ctx, &models, &caches, &batches).await;
    crate::ensembles::reweight_all(
        ctx,
        &c.ensembles.state(),
        &models,
        &figures,
        &ctx.previous_figures,
        &ctx.last_reweight,
    )
    .await;
}

async fn desired(
    ctx: &Context,
    model: &Model,
    replicas_now: usize,
    figures: &BTreeMap<String, ModelFigures>,
) -> u32 {
    let policy = &model.spec.replicas;
    let served = world::served_name(model);
    let observed = figures
        .get(&served)
        .filter(|_| replicas_now > 0)
        .map(|f| match policy.metric {
            weir_crds::model::AutoscaleMetric::QueueDepth => f.waiting / replicas_now as f64,
            weir_crds::model::AutoscaleMetric::KvCacheUsage => f.kv_usage / replicas_now as f64,
        });
    let mut scale = ctx.scale.lock().await;
    let entry = scale
        .entry(key(model))
        .or_insert_with(|| (ScaleState::default(), policy.min.max(1).min(policy.max)));
    let next = autoscale::desired_replicas(policy, entry.1, observed, &mut entry.0, Instant::now());
    entry.1 = next;
    next
}

fn demand(model: &Model, replicas: u32, weights: u64) -> ModelDemand {
    let gpus = model.spec.resources.gpus;
    ModelDemand {
        key: key(model),
        served_name: world::served_name(model),
        replicas,
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

/// Marks agents whose heartbeat went stale (and clears the mark when they
/// report again), with an event at each change.
async fn mark_stale_agents(ctx: &Context, agents: &[Arc<NodeAgent>], now: Timestamp) {
    for agent in agents {
        let Some(condition) = world::heartbeat_condition(agent, now, ctx.stale_after) else {
            continue;
        };
        let result = apply::agent_condition(&ctx.client, agent, &condition).await;
        ctx.metrics.record("NodeAgentStatus", &result);
        match result {
            Ok(()) => {
                let stale = condition.status == "False";
                apply::event(
                    &ctx.client,
                    agent.as_ref(),
                    stale,
                    &condition.reason,
                    condition.message.clone(),
                )
                .await;
            }
            Err(e) => {
                tracing::warn!(agent = %agent.name_any(), error = %e, "marking the heartbeat")
            }
        }
    }
}

/// Why a deleted Model is still held.
#[derive(Debug, thiserror::Error)]
#[error("NodeAgent writes failed this round; the Model stays until they succeed")]
struct AgentsNotWritten;

/// Adds the finalizer to a live Model; releases a deleted one once this
/// round's NodeAgent writes (which no longer assign it) all succeeded.
async fn finalize(ctx: &Context, model: &Arc<Model>, agents_written: bool) {
    use kube::runtime::controller::Action;
    use kube::runtime::finalizer::{Event as Finalizer, finalizer};
    let api: Api<Model> =
        Api::namespaced(ctx.client.clone(), &model.namespace().unwrap_or_default());
    let result = finalizer(&api, MODEL_FINALIZER, model.clone(), |event| async move {
        match event {
            Finalizer::Apply(_) => Ok(Action::await_change()),
            Finalizer::Cleanup(m) if agents_written => {
                let note = format!(
                    "`{}` is no longer served by any node",
                    world::served_name(&m)
                );
                apply::event(&ctx.client, m.as_ref(), false, "Unassigned", note).await;
                Ok(Action::await_change())
            }
            Finalizer::Cleanup(_) => Err(AgentsNotWritten),
        }
    })
    .await;
    ctx.metrics.record("ModelFinalizer", &result);
    if let Err(e) = result {
        tracing::warn!(model = %key(model), error = %e, "finalizer");
    }
}

/// Writes every NodeAgent's assignments; whether all writes succeeded.
async fn write_agents(
    ctx: &Context,
    agents: &[Arc<NodeAgent>],
    placed: &BTreeMap<String, placement::Placed>,
    resolved: &BTreeMap<String, weir_crds::node_agent::AssignedModel>,
) -> bool {
    let mut all_ok = true;
    for agent in agents {
        let name = agent.name_any();
        let mut models: Vec<_> = placed
            .iter()
            .filter(|(_, p)| p.nodes.contains(&name))
            .filter_map(|(k, _)| resolved.get(k).cloned())
            .collect();
        models.sort_by(|a, b| a.served_name.cmp(&b.served_name));
        let result = apply::agent_models(&ctx.client, agent, &models).await;
        ctx.metrics.record("NodeAgent", &result);
        match result {
            Ok(true) => {
                let names: Vec<&str> = models.iter().map(|m| m.served_name.as_str()).collect();
                apply::event(
                    &ctx.client,
                    agent.as_ref(),
                    false,
                    "Assigned",
                    format!("serves {names:?}"),
                )
                .await;
            }
            Ok(false) => {}
            Err(e) => {
                all_ok = false;
                tracing::warn!(agent = %name, error = %e, "writing NodeAgent spec");
            }
        }
    }
    all_ok
}

async fn write_models(
    ctx: &Context,
    models: &[Arc<Model>],
    demands: &[ModelDemand],
    placed: &BTreeMap<String, placement::Placed>,
    agents: &[Arc<NodeAgent>],
    problems: BTreeMap<String, (String, String)>,
    now: Timestamp,
) {
    let by_name: BTreeMap<String, &NodeAgent> =
        agents.iter().map(|a| (a.name_any(), a.as_ref())).collect();
    for model in models {
        let k = key(model);
        let desired = demands
            .iter()
            .find(|d| d.key == k)
            .map_or(0, |d| d.replicas);
        let empty = placement::Placed::default();
        let p = placed.get(&k).unwrap_or(&empty);
        let problem = problems
            .get(&k)
            .cloned()
            .or_else(|| p.unplaced.clone().map(|why| ("Unplaced".to_owned(), why)));
        let status = world::model_status(
            model,
            desired,
            &p.nodes,
            &by_name,
            now,
            ctx.stale_after,
            problem.as_ref().map(|(r, m)| (r.as_str(), m.clone())),
        );
        let result = apply::model_status(&ctx.client, model, &status).await;
        ctx.metrics.record("Model", &result);
        match result {
            Ok(true) => {
                if let Some((reason, message)) = &problem {
                    apply::event(&ctx.client, model.as_ref(), true, reason, message.clone()).await;
                } else if model.status.as_ref().map(|s| &s.nodes) != Some(&p.nodes) {
                    apply::event(
                        &ctx.client,
                        model.as_ref(),
                        false,
                        "Placed",
                        format!("replicas on {:?}", p.nodes),
                    )
                    .await;
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(model = %k, error = %e, "writing Model status"),
        }
    }
}

async fn write_policy_counts(
    ctx: &Context,
    models: &[Arc<Model>],
    caches: &[CachePolicy],
    batches: &[BatchPolicy],
) {
    let count = |ns: Option<String>, name: &str, batch: bool| {
        models
            .iter()
            .filter(|m| m.namespace() == ns)
            .filter(|m| {
                let r = if batch {
                    &m.spec.batch_policy_ref
                } else {
                    &m.spec.cache_policy_ref
                };
                r.as_ref().is_some_and(|r| r.name == name)
            })
            .count() as u32
    };
    for p in caches {
        let n = count(p.namespace(), &p.name_any(), false);
        if p.status.as_ref().map(|s| s.model_count) != Some(n)
            && let Err(e) = apply::policy_count(&ctx.client, p, "CachePolicy", n).await
        {
            tracing::warn!(error = %e, "writing CachePolicy status");
        }
    }
    for p in batches {
        let n = count(p.namespace(), &p.name_any(), true);
        if p.status.as_ref().map(|s| s.model_count) != Some(n)
            && let Err(e) = apply::policy_count(&ctx.client, p, "BatchPolicy", n).await
        {
            tracing::warn!(error = %e, "writing BatchPolicy status");
        }
    }
}
