//! The operator's shared view of the cluster: one reflector per watched
//! kind, and two change signals derived from them. `world` fires when
//! something placement depends on changes (a Node's labels, taints or drain
//! annotation, a NodeAgent's drain annotation, assignments, GPUs, endpoint, loaded models or readiness, a
//! policy); heartbeat-only NodeAgent updates do not fire it, so agents
//! reporting every few seconds do not re-run every Model's reconcile.
//! `models` fires on any Model change (policy counts and ensembles follow
//! Models).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use futures::{Stream, StreamExt, stream};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tokio::sync::watch;
use weir_crds::{BatchPolicy, CachePolicy, Model, ModelEnsemble, NodeAgent};

/// The watched caches.
#[derive(Clone)]
pub struct Caches {
    /// Models.
    pub models: Store<Model>,
    /// Ensembles.
    pub ensembles: Store<ModelEnsemble>,
    /// Cache policies.
    pub caches: Store<CachePolicy>,
    /// Batch policies.
    pub batches: Store<BatchPolicy>,
    /// Node agents.
    pub agents: Store<NodeAgent>,
    /// Nodes.
    pub nodes: Store<Node>,
}

/// Signals that a watched kind changed.
#[derive(Clone)]
pub struct Changes {
    /// Placement inputs changed.
    pub world: watch::Sender<u64>,
    /// A Model changed.
    pub models: watch::Sender<u64>,
}

impl Changes {
    fn new() -> Self {
        Self {
            world: watch::channel(0).0,
            models: watch::channel(0).0,
        }
    }
}

/// A stream that yields once per change of `signal` (for a controller's
/// `reconcile_all_on`).
pub fn on(signal: &watch::Sender<u64>) -> impl Stream<Item = ()> + Send + 'static {
    stream::unfold(signal.subscribe(), |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

/// What of an object matters to the decisions that follow it; `None`:
/// every change matters.
type Fingerprint<K> = fn(&K) -> Option<u64>;

fn hash_of(value: &impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// A Node as placement sees it: labels, taints, cordon and drain.
fn node_fingerprint(node: &Node) -> Option<u64> {
    let drain = node.annotations().get(crate::drain::DRAIN_ANNOTATION);
    let cordoned = node.spec.as_ref().and_then(|s| s.unschedulable);
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(|ts| {
            ts.iter()
                .map(|t| (t.key.clone(), t.value.clone(), t.effect.clone()))
                .collect::<Vec<_>>()
        });
    Some(hash_of(&(node.labels(), taints, cordoned, drain)))
}

/// A NodeAgent as placement and routing see it: everything but the
/// heartbeat time and load figures, plus the drain annotation.
fn agent_fingerprint(agent: &NodeAgent) -> Option<u64> {
    let drain = agent.annotations().get(crate::drain::DRAIN_ANNOTATION);
    let spec = serde_json::to_string(&agent.spec).unwrap_or_default();
    let status = agent.status.as_ref().map(|s| {
        let models: Vec<String> = s
            .models
            .iter()
            .map(|m| format!("{}={:?}/{:?}", m.served_name, m.phase, m.weights_bytes))
            .collect();
        let gpus: Vec<u64> = s.gpus.iter().map(|g| g.memory_total_bytes).collect();
        let conditions: Vec<(String, String)> = s
            .common
            .conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone()))
            .collect();
        (models, gpus, conditions, s.endpoint.clone())
    });
    Some(hash_of(&(spec, status, drain)))
}

/// Reflects `api` into a store; the stream yields `()` for each change
/// whose fingerprint differs from the object's previous one (deletions
/// always count).
fn reflect<K>(
    api: Api<K>,
    fingerprint: Option<Fingerprint<K>>,
) -> (Store<K>, stream::BoxStream<'static, ()>)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let mut seen: HashMap<(Option<String>, String), u64> = HashMap::new();
    let events = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .filter_map(move |event| {
            let changed = match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    match fingerprint.and_then(|f| f(&o)) {
                        Some(print) => {
                            seen.insert((o.namespace(), o.name_any()), print) != Some(print)
                        }
                        None => true,
                    }
                }
                Ok(watcher::Event::Delete(o)) => {
                    seen.remove(&(o.namespace(), o.name_any()));
                    true
                }
                Ok(watcher::Event::InitDone) => true,
                Ok(watcher::Event::Init) | Err(_) => false,
            };
            std::future::ready(changed.then_some(()))
        })
        .boxed();
    (reader, events)
}

impl Caches {
    /// Starts watching every kind; the returned future drives the watches
    /// (and the change signals) and never ends.
    pub fn watch(
        client: &kube::Client,
    ) -> (
        Self,
        Changes,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (models, model_events) = reflect(Api::<Model>::all(client.clone()), None);
        let (ensembles, ensemble_events) = reflect(Api::<ModelEnsemble>::all(client.clone()), None);
        let (caches, cache_events) = reflect(Api::<CachePolicy>::all(client.clone()), None);
        let (batches, batch_events) = reflect(Api::<BatchPolicy>::all(client.clone()), None);
        let (agents, agent_events) = reflect(
            Api::<NodeAgent>::all(client.clone()),
            Some(agent_fingerprint),
        );
        let (nodes, node_events) =
            reflect(Api::<Node>::all(client.clone()), Some(node_fingerprint));
        let changes = Changes::new();
        let signals = changes.clone();
        let bump = |s: &watch::Sender<u64>| s.send_modify(|n| *n = n.wrapping_add(1));
        let driver = async move {
            let world = stream::select_all([cache_events, batch_events, agent_events, node_events]);
            let mut all = stream::select(
                world.map(|()| true),
                stream::select(model_events, ensemble_events).map(|()| false),
            );
            while let Some(placement) = all.next().await {
                if placement {
                    bump(&signals.world);
                } else {
                    bump(&signals.models);
                }
            }
        };
        let caches = Self::from_stores(models, ensembles, caches, batches, agents, nodes);
        (caches, changes, driver)
    }

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

    /// Waits until every store holds its initial listing.
    pub async fn ready(&self) {
        let _ = tokio::join!(
            self.models.wait_until_ready(),
            self.ensembles.wait_until_ready(),
            self.caches.wait_until_ready(),
            self.batches.wait_until_ready(),
            self.agents.wait_until_ready(),
            self.nodes.wait_until_ready(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_alone_do_not_change_an_agents_fingerprint() {
        let agent = |beat: &str, ready: &str| -> NodeAgent {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "weir.dev/v1alpha1", "kind": "NodeAgent",
                "metadata": {"name": "gpu-1"},
                "spec": {"nodeName": "gpu-1"},
                "status": {"lastHeartbeatTime": beat, "endpoint": "http://10.0.0.1:8000",
                    "conditions": [{"type": "Ready", "status": ready, "reason": "R",
                        "message": "", "lastTransitionTime": beat}]}}))
            .unwrap()
        };
        let a = agent("2026-12-01T00:00:00Z", "True");
        let later = agent("2026-12-01T00:00:10Z", "True");
        let unready = agent("2026-12-01T00:00:10Z", "False");
        assert_eq!(agent_fingerprint(&a), agent_fingerprint(&later));
        assert_ne!(agent_fingerprint(&a), agent_fingerprint(&unready));
    }
}
