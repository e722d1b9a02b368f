//! The operator's controllers: one `kube-runtime` [`Controller`] per kind
//! (Model, NodeAgent, ModelEnsemble, CachePolicy, BatchPolicy), sharing one
//! [`Context`], run only while this replica holds the leader Lease.
//!
//! - **Model** ([`model`]): reconciled inside the `weir.dev/unassign`
//!   finalizer. Decides the replica count from collected load, places
//!   replicas (placement is global, so every Model is reconciled again when
//!   a placement input changes), writes its own entry of each NodeAgent's
//!   spec and its status, and explains decisions with events. Cleanup takes
//!   its entries off every NodeAgent before the finalizer is released.
//! - **NodeAgent** ([`node_agent`]): marks agents whose heartbeat went
//!   stale, and clears the mark when they report again; reports drains
//!   asked for with `weir.dev/drain` in a `Drained` condition.
//! - **ModelEnsemble** ([`ensemble`]): reweights members from
//!   collected figures each reweighting interval.
//! - **CachePolicy / BatchPolicy** ([`policy`]): count the Models using
//!   them, and hold the deletion of one still in use.
//!
//! Every reconcile is timed and counted in the operator's metrics; a failed
//! reconcile is retried with per-object exponential backoff (2 s doubling
//! to 5 min), reset by the next success. Figures are collected from every
//! ready agent's `/metrics` on an interval by one task ([`collect`]).

pub mod ensemble;
pub mod model;
pub mod node_agent;
pub mod policy;
pub mod watch;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{Action, Config, Controller};
use kube::{Resource, ResourceExt};
use tokio::sync::{Mutex, RwLock};
use weir_crds::{BatchPolicy, CachePolicy, Model, ModelEnsemble, NodeAgent};

use crate::autoscale::ScaleState;
use crate::scale_zero::IdleState;
use crate::scrape::{self, ModelFigures};
use crate::world;

pub use model::MODEL_FINALIZER;
pub use watch::{Caches, Changes};

pub use crate::weights::WEIGHT_BYTES_ANNOTATION;

/// Why a reconcile failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// Adding or removing the finalizer failed, or its cleanup did.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// Some NodeAgent writes failed; the Model's finalizer stays until
    /// they succeed.
    #[error("{0} NodeAgent write(s) failed: {1}")]
    AgentsNotWritten(usize, kube::Error),
    /// A deleted policy is still named by this many Models.
    #[error("still named by {0} Model(s)")]
    InUse(usize),
}

/// The reconcile's own error out of kube-runtime's finalizer wrapper.
pub fn finalizer_error(e: kube::runtime::finalizer::Error<Error>) -> Error {
    use kube::runtime::finalizer::Error as F;
    match e {
        F::ApplyFailed(e) | F::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    }
}

/// Per ensemble: its last reweighting.
pub(crate) type Reweights = Mutex<HashMap<String, ensemble::Reweighted>>;

/// State shared by every controller.
pub struct Context {
    /// Kubernetes client.
    pub client: kube::Client,
    /// Client for scraping agents.
    pub http: reqwest::Client,
    /// Heartbeats older than this mark an agent not ready.
    pub stale_after: Duration,
    /// How often figures are collected and Models re-evaluated.
    pub interval: Duration,
    /// Controller metrics.
    pub metrics: crate::metrics::OperatorMetrics,
    /// Weight sizes for the GPU memory estimate.
    pub weights: crate::weights::WeightSizes,
    /// The watched objects.
    pub caches: Caches,
    /// The latest figures collected from the agents, per served model.
    pub figures: RwLock<BTreeMap<String, ModelFigures>>,
    /// The collections of the last grading window.
    pub history: RwLock<crate::grades::History>,
    /// How many collections have completed (ensembles reweight only on
    /// figures newer than their last reweighting).
    pub collections: AtomicU64,
    /// Placement ledger: the nodes each Model was last assigned by this
    /// term's writes (authoritative over a store that may lag them). Its
    /// lock serializes placement decisions.
    placing: Mutex<BTreeMap<String, Vec<String>>>,
    /// Autoscaler state, current decision and idleness, per Model.
    scale: Mutex<HashMap<String, (ScaleState, u32, IdleState)>>,
    /// Fired when a collection finds requests held somewhere, so that
    /// every Model is reconciled at once (a Model at zero scales to one).
    held: tokio::sync::watch::Sender<u64>,
    /// Per ensemble: when it was last reweighted and the figures then.
    reweights: Reweights,
    /// Consecutive failures per object, for backoff.
    failures: std::sync::Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context over `caches`.
    pub fn new(
        client: kube::Client,
        metrics: crate::metrics::OperatorMetrics,
        caches: Caches,
    ) -> Self {
        Self {
            metrics,
            client,
            caches,
            http: reqwest::Client::new(),
            weights: crate::weights::WeightSizes::from_env(),
            stale_after: Duration::from_secs(45),
            interval: Duration::from_secs(10),
            figures: RwLock::default(),
            history: RwLock::default(),
            collections: AtomicU64::new(0),
            placing: Mutex::default(),
            scale: Mutex::default(),
            held: tokio::sync::watch::channel(0).0,
            reweights: Mutex::default(),
            failures: std::sync::Mutex::default(),
        }
    }

    /// Forgets what an earlier leadership term decided (another replica
    /// may have acted since).
    async fn new_term(&self) {
        self.placing.lock().await.clear();
        self.scale.lock().await.clear();
        self.reweights.lock().await.clear();
    }

    /// Drops reweighting and backoff state of objects no longer cached, so
    /// those maps stay bounded by the objects that exist.
    pub async fn prune(&self) {
        let c = &self.caches;
        let mut live: std::collections::HashSet<String> = std::collections::HashSet::new();
        live.extend(c.models.state().iter().map(|o| object_key(o.as_ref())));
        live.extend(c.ensembles.state().iter().map(|o| object_key(o.as_ref())));
        live.extend(c.caches.state().iter().map(|o| object_key(o.as_ref())));
        live.extend(c.batches.state().iter().map(|o| object_key(o.as_ref())));
        live.extend(c.agents.state().iter().map(|o| object_key(o.as_ref())));
        let ensembles: std::collections::HashSet<String> = c
            .ensembles
            .state()
            .iter()
            .map(|e| format!("{}/{}", e.namespace().unwrap_or_default(), e.name_any()))
            .collect();
        self.reweights
            .lock()
            .await
            .retain(|k, _| ensembles.contains(k));
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| live.contains(k));
    }

    /// How many ensembles have reweighting state and objects backoff state.
    pub async fn tracked(&self) -> (usize, usize) {
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        (self.reweights.lock().await.len(), failures)
    }

    /// Last reweighting of an ensemble and the figures it was based on.
    pub(crate) fn reweights(&self) -> &Reweights {
        &self.reweights
    }
}

/// `kind:namespace/name` of an object, for backoff bookkeeping.
fn object_key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}:{}/{}",
        K::kind(&()),
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// Runs one reconcile, timing and counting it; a success resets the
/// object's backoff.
pub async fn observe<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    object: &K,
    reconcile: impl Future<Output = Result<Action, Error>>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile.await;
    ctx.metrics.reconciled(
        &K::kind(&()),
        started.elapsed().as_secs_f64(),
        result.is_err(),
    );
    if result.is_ok() {
        ctx.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&object_key(object));
    }
    result
}

/// The delay before retrying after `failures` consecutive failures.
pub fn backoff_delay(failures: u32) -> Duration {
    let secs = 2u64.saturating_pow(failures.clamp(1, 16));
    Duration::from_secs(secs.min(300))
}

/// Error policy of every controller: retry with per-object exponential
/// backoff.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    object: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let key = object_key(object.as_ref());
    let failures = {
        let mut map = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.clone()).or_default();
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff_delay(failures);
    match error {
        // An expected hold (a deleted policy still in use), not a fault.
        Error::InUse(_) => tracing::info!(object = %key, %error, retry_in = ?delay, "held"),
        _ => tracing::warn!(object = %key, %error, failures, retry_in = ?delay, "reconcile failed"),
    }
    Action::requeue(delay)
}

/// Runs the controllers while this replica is leader, forever. The caches
/// are watched all along (a standby takes over with warm caches);
/// controllers, with their own watches, start at each term.
pub async fn run(
    client: kube::Client,
    leader: Arc<AtomicBool>,
    metrics: crate::metrics::OperatorMetrics,
) {
    let (caches, changes, driver) = Caches::watch(&client);
    tokio::spawn(driver);
    caches.ready().await;
    let ctx = Arc::new(Context::new(client, metrics, caches));
    loop {
        while !leader.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tracing::info!("leading: starting controllers");
        ctx.new_term().await;
        let mut term = tokio::task::JoinSet::new();
        term.spawn(collect_forever(ctx.clone()));
        for controller in controllers(&ctx, &changes) {
            term.spawn(controller);
        }
        while leader.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tracing::info!("no longer leading: stopping controllers");
        term.abort_all();
        while term.join_next().await.is_some() {}
    }
}

type Task = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Drains a controller's stream of outcomes (errors are logged by the
/// error policy).
async fn drain<S: futures::Stream + Send>(stream: S) {
    stream.for_each(|_| std::future::ready(())).await;
}

/// The controller of one policy kind, reconciled again on Model changes.
fn policy_controller<P: policy::Policy>(ctx: &Arc<Context>, changes: &Changes) -> Task {
    Box::pin(drain(
        Controller::new(Api::<P>::all(ctx.client.clone()), Default::default())
            .with_config(Config::default().debounce(Duration::from_millis(300)))
            .reconcile_all_on(watch::on(&changes.models))
            .run(policy::reconcile::<P>, error_policy, ctx.clone()),
    ))
}

fn controllers(ctx: &Arc<Context>, changes: &Changes) -> Vec<Task> {
    let client = ctx.client.clone();
    let config = || Config::default().debounce(Duration::from_millis(300));
    let wc = kube::runtime::watcher::Config::default;
    vec![
        Box::pin(drain(
            Controller::new(Api::<Model>::all(client.clone()), wc())
                .with_config(config())
                .reconcile_all_on(watch::on(&changes.world))
                .reconcile_all_on(watch::on(&ctx.held))
                .run(model::reconcile, error_policy, ctx.clone()),
        )),
        Box::pin(drain(
            Controller::new(Api::<NodeAgent>::all(client.clone()), wc())
                .with_config(config())
                .run(node_agent::reconcile, error_policy, ctx.clone()),
        )),
        Box::pin(drain(
            Controller::new(Api::<ModelEnsemble>::all(client.clone()), wc())
                .with_config(config())
                .reconcile_all_on(watch::on(&changes.models))
                .run(ensemble::reconcile, error_policy, ctx.clone()),
        )),
        policy_controller::<CachePolicy>(ctx, changes),
        policy_controller::<BatchPolicy>(ctx, changes),
    ]
}

/// Collects figures every interval for as long as the term lasts, and
/// forgets per-object state of objects that are gone.
async fn collect_forever(ctx: Arc<Context>) {
    let mut tick = tokio::time::interval(ctx.interval);
    loop {
        tick.tick().await;
        let agents = ctx.caches.agents.state();
        let now = Timestamp::now();
        let figures = collect(&ctx, &agents, now).await;
        let held = figures.values().any(|f| f.held > 0.0);
        ctx.history.write().await.push(now, figures.clone());
        *ctx.figures.write().await = figures;
        if held {
            ctx.held.send_modify(|n| *n += 1);
        }
        ctx.collections.fetch_add(1, Ordering::AcqRel);
        ctx.prune().await;
    }
}

/// Collected figures per served model, summed over the ready agents.
pub async fn collect(
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
                    t.held += f.held;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_delay(0), Duration::from_secs(2));
        assert_eq!(backoff_delay(1), Duration::from_secs(2));
        assert_eq!(backoff_delay(3), Duration::from_secs(8));
        assert_eq!(backoff_delay(9), Duration::from_secs(300));
        assert_eq!(backoff_delay(u32::MAX), Duration::from_secs(300));
    }
}
