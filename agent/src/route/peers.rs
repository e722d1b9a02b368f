//! Where else a model is served: the peer table. In standalone mode it is
//! built from a static list of peer URLs, each asked for `/v1/models` on an
//! interval; in cluster mode from the NodeAgents' status (endpoint, models
//! Ready, heartbeat). A peer that does not answer, or whose heartbeat is
//! stale, is not ready and never receives traffic. The table also knows
//! which models exist without a ready replica (declared by Model objects in
//! cluster mode, or seen on a peer in the last [`SEEN_FOR`]), so that a
//! request for one is told to retry (503) rather than that it does not
//! exist (404), or held until one is ([`super::hold`]): every rebuild or
//! update of the table runs the hook set with [`PeerTable::on_change`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::api::types::ModelList;

/// One peer agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Base URL (`http://host:port`).
    pub url: String,
    /// Models it serves now.
    pub models: Vec<String>,
    /// Whether it may receive traffic.
    pub ready: bool,
}

/// How long a model seen on a peer is still known after it was last seen.
pub const SEEN_FOR: Duration = Duration::from_secs(600);

/// The peers an agent can forward to, with in-flight counts for bounded
/// load.
#[derive(Debug, Default)]
pub struct PeerTable {
    peers: RwLock<BTreeMap<String, Peer>>,
    in_flight: RwLock<BTreeMap<String, Arc<std::sync::atomic::AtomicUsize>>>,
    declared: RwLock<BTreeSet<String>>,
    seen: RwLock<BTreeMap<String, Instant>>,
    on_change: RwLock<ChangeHook>,
}

/// What runs after every change of the table (releasing held requests).
#[derive(Default)]
struct ChangeHook(Option<Box<Hook>>);

type Hook = dyn Fn(&PeerTable) + Send + Sync;

impl std::fmt::Debug for ChangeHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "hook" } else { "none" })
    }
}

impl PeerTable {
    /// Replaces the whole table (cluster mode).
    pub fn replace(&self, peers: Vec<Peer>) {
        self.saw(&peers);
        let mut table = self.peers.write().unwrap_or_else(|p| p.into_inner());
        *table = peers.into_iter().map(|p| (p.url.clone(), p)).collect();
        drop(table);
        self.changed();
    }

    /// Sets one peer's entry (standalone polling).
    pub fn upsert(&self, peer: Peer) {
        self.saw(std::slice::from_ref(&peer));
        self.peers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer.url.clone(), peer);
        self.changed();
    }

    /// Runs `hook` after every later change of the table (replacing the
    /// hook set before).
    pub fn on_change(&self, hook: impl Fn(&PeerTable) + Send + Sync + 'static) {
        *self.on_change.write().unwrap_or_else(|p| p.into_inner()) =
            ChangeHook(Some(Box::new(hook)));
    }

    fn changed(&self) {
        if let Some(hook) = &self.on_change.read().unwrap_or_else(|p| p.into_inner()).0 {
            hook(self);
        }
    }

    fn saw(&self, peers: &[Peer]) {
        let now = Instant::now();
        let mut seen = self.seen.write().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, at| now.duration_since(*at) < SEEN_FOR);
        for model in peers.iter().filter(|p| p.ready).flat_map(|p| &p.models) {
            seen.insert(model.clone(), now);
        }
    }

    /// Sets the models that exist in the cluster (served names of the
    /// Model objects), whether or not a replica is ready.
    pub fn declare(&self, models: BTreeSet<String>) {
        *self.declared.write().unwrap_or_else(|p| p.into_inner()) = models;
    }

    /// Whether `model` exists somewhere even if no replica is ready now.
    pub fn is_known(&self, model: &str) -> bool {
        self.declared
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(model)
            || self
                .seen
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(model)
                .is_some_and(|at| at.elapsed() < SEEN_FOR)
    }

    /// Ready peers serving `model`, by URL.
    pub fn serving(&self, model: &str) -> Vec<Peer> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|p| p.ready && p.models.iter().any(|m| m == model))
            .cloned()
            .collect()
    }

    /// Whether the peer at `url` is in the table and ready.
    pub fn is_ready(&self, url: &str) -> bool {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(url)
            .is_some_and(|p| p.ready)
    }

    /// Every model some ready peer serves.
    pub fn models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|p| p.ready)
            .flat_map(|p| p.models.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The in-flight counter of a peer.
    pub fn counter(&self, url: &str) -> Arc<std::sync::atomic::AtomicUsize> {
        let mut counters = self.in_flight.write().unwrap_or_else(|p| p.into_inner());
        counters.entry(url.to_owned()).or_default().clone()
    }
}

/// Polls each static peer's `/v1/models` every `period`, marking a peer not
/// ready when it does not answer within `timeout`. Peers are asked with
/// `api_key`, the agent's own key (peers of one deployment share it).
pub fn poll_static(
    table: Arc<PeerTable>,
    urls: Vec<String>,
    client: reqwest::Client,
    period: Duration,
    api_key: Option<Arc<str>>,
) {
    let timeout = Duration::from_secs(2).min(period);
    for url in urls {
        let (table, client, key) = (table.clone(), client.clone(), api_key.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let started = Instant::now();
                let mut ask = client
                    .get(format!("{url}/v1/models"))
                    .header(super::FORWARDED, "1")
                    .timeout(timeout);
                if let Some(key) = &key {
                    ask = ask.bearer_auth(key);
                }
                let answer = ask.send().await;
                let models = match answer {
                    Ok(r) if r.status().is_success() => r.json::<ModelList>().await.ok(),
                    Ok(r) => {
                        tracing::warn!(peer = %url, status = %r.status(), "peer refused the model list");
                        None
                    }
                    Err(_) => None,
                };
                let ready = models.is_some();
                let models = models
                    .map(|m| m.data.into_iter().map(|c| c.id).collect())
                    .unwrap_or_default();
                if !ready {
                    tracing::debug!(peer = %url, elapsed = ?started.elapsed(), "peer did not answer");
                }
                table.upsert(Peer {
                    url: url.clone(),
                    models,
                    ready,
                });
            }
        });
    }
}
