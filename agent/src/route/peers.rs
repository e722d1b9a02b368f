//! Where else a model is served: the peer table. In standalone mode it is
//! built from a static list of peer URLs, each asked for `/v1/models` on an
//! interval; in cluster mode from the NodeAgents' status (endpoint, models
//! Ready, heartbeat). A peer that does not answer, or whose heartbeat is
//! stale, is not ready and never receives traffic.

use std::collections::BTreeMap;
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

/// The peers an agent can forward to, with in-flight counts for bounded
/// load.
#[derive(Debug, Default)]
pub struct PeerTable {
    peers: RwLock<BTreeMap<String, Peer>>,
    in_flight: RwLock<BTreeMap<String, Arc<std::sync::atomic::AtomicUsize>>>,
}

impl PeerTable {
    /// Replaces the whole table (cluster mode).
    pub fn replace(&self, peers: Vec<Peer>) {
        let mut table = self.peers.write().unwrap_or_else(|p| p.into_inner());
        *table = peers.into_iter().map(|p| (p.url.clone(), p)).collect();
    }

    /// Sets one peer's entry (standalone polling).
    pub fn upsert(&self, peer: Peer) {
        self.peers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer.url.clone(), peer);
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
/// ready when it does not answer within `timeout`.
pub fn poll_static(
    table: Arc<PeerTable>,
    urls: Vec<String>,
    client: reqwest::Client,
    period: Duration,
) {
    let timeout = Duration::from_secs(2).min(period);
    for url in urls {
        let (table, client) = (table.clone(), client.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let started = Instant::now();
                let answer = client
                    .get(format!("{url}/v1/models"))
                    .header(super::FORWARDED, "1")
                    .timeout(timeout)
                    .send()
                    .await;
                let models = match answer {
                    Ok(r) if r.status().is_success() => r.json::<ModelList>().await.ok(),
                    _ => None,
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
