//! Cluster-mode discovery: peers from every NodeAgent's status (endpoint,
//! models Ready, heartbeat fresh), and ensembles from ModelEnsembles with
//! the effective weights the operator wrote. Refreshed on an interval from
//! watched caches, so a stale peer stops receiving traffic by itself.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use weir_crds::node_agent::ModelPhase;
use weir_crds::{Model, ModelEnsemble, NodeAgent};

use crate::http::AppState;
use crate::route::ensemble::Ensemble;
use crate::route::hold::HoldLimits;
use crate::route::peers::Peer;

/// Peers from NodeAgents: every other agent whose heartbeat is younger than
/// `stale_after`, with the models it reports Ready.
pub fn peers_from(
    agents: &[Arc<NodeAgent>],
    me: &str,
    now: Timestamp,
    stale_after: Duration,
) -> Vec<Peer> {
    let limit = SignedDuration::try_from(stale_after).unwrap_or(SignedDuration::from_secs(45));
    agents
        .iter()
        .filter(|a| a.name_any() != me)
        .filter_map(|a| {
            let status = a.status.as_ref()?;
            let url = status.endpoint.clone()?;
            let fresh = status
                .last_heartbeat_time
                .as_ref()
                .is_some_and(|t| t.0 + limit > now);
            let models = status
                .models
                .iter()
                .filter(|m| m.phase == ModelPhase::Ready)
                .map(|m| m.served_name.clone())
                .collect();
            Some(Peer {
                url,
                models,
                ready: fresh,
            })
        })
        .collect()
}

/// A store of `api`'s objects kept by a watch; `changed` is notified at
/// every event.
fn store<K>(api: Api<K>, changed: Arc<tokio::sync::Notify>) -> Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    tokio::spawn(stream.for_each(move |_| {
        changed.notify_one();
        async {}
    }));
    reader
}

/// The peer table, the models that exist and their hold limits, from the
/// stores now.
fn refresh_peers(state: &AppState, me: &str, agents: &Store<NodeAgent>, models: &Store<Model>) {
    state.peers.replace(peers_from(
        &agents.state(),
        me,
        Timestamp::now(),
        Duration::from_secs(45),
    ));
    let models = models.state();
    let served = |m: &Model| m.spec.served_name.clone().unwrap_or_else(|| m.name_any());
    state.holds.configure(
        models
            .iter()
            .map(|m| (served(m), HoldLimits::of(&m.spec.replicas)))
            .collect(),
    );
    state
        .peers
        .declare(models.iter().map(|m| served(m)).collect());
}

/// Keeps `state.peers` and `state.ensembles` current until the process
/// ends: the peer table is rebuilt at every NodeAgent or Model change (and
/// every 3 s, for heartbeats going stale), ensembles every 3 s (they read
/// Secrets). The agent reports ready only after the first rebuild from
/// synced stores, so a restarted agent never answers 404 for a model that
/// exists elsewhere.
pub async fn run(client: kube::Client, me: String, state: AppState) {
    let changed = Arc::new(tokio::sync::Notify::new());
    let agents = store(Api::<NodeAgent>::all(client.clone()), changed.clone());
    let ensembles = store(Api::<ModelEnsemble>::all(client.clone()), Arc::default());
    let models = store(Api::<Model>::all(client.clone()), changed.clone());
    let secrets: Api<Secret> = Api::all(client);
    let _ = agents.wait_until_ready().await;
    let _ = models.wait_until_ready().await;
    refresh_peers(&state, &me, &agents, &models);
    state
        .synced
        .store(true, std::sync::atomic::Ordering::Release);
    let mut tick = tokio::time::interval(Duration::from_secs(3));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = changed.notified() => {
                // Let a burst of events land before rebuilding.
                tokio::time::sleep(Duration::from_millis(20)).await;
                refresh_peers(&state, &me, &agents, &models);
                continue;
            }
        }
        refresh_peers(&state, &me, &agents, &models);
        let models = models.state();
        let mut resolved = Vec::new();
        for e in ensembles.state() {
            let ns = e.namespace().unwrap_or_default();
            let mut keys = Vec::new();
            for m in &e.spec.members {
                if let Some(s) = m
                    .endpoint
                    .as_ref()
                    .and_then(|x| x.api_key_secret_ref.as_ref())
                {
                    let value = Api::<Secret>::namespaced(secrets.clone().into_client(), &ns)
                        .get_opt(&s.name)
                        .await;
                    let key = value
                        .ok()
                        .flatten()
                        .and_then(|sec| sec.data?.get(&s.key).cloned());
                    keys.push((
                        (s.name.clone(), s.key.clone()),
                        key.and_then(|b| String::from_utf8(b.0).ok()),
                    ));
                }
            }
            let model_of = |name: &str| {
                models
                    .iter()
                    .find(|m| m.name_any() == name && m.namespace().as_deref() == Some(ns.as_str()))
                    .map_or_else(
                        || name.to_owned(),
                        |m| m.spec.served_name.clone().unwrap_or_else(|| m.name_any()),
                    )
            };
            let secret = |name: &str, key: &str| {
                keys.iter()
                    .find(|((n, k), _)| n == name && k == key)
                    .and_then(|(_, v)| v.clone())
            };
            resolved.push(Ensemble::resolve(
                &e.name_any(),
                &e.spec,
                e.status.as_ref(),
                model_of,
                secret,
            ));
        }
        state.ensembles.replace(resolved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use weir_crds::node_agent::{LoadedModelStatus, NodeAgentSpec, NodeAgentStatus};

    fn agent(name: &str, beat: Timestamp, models: &[(&str, ModelPhase)]) -> Arc<NodeAgent> {
        let mut a = NodeAgent::new(
            name,
            NodeAgentSpec {
                node_name: name.into(),
                ..Default::default()
            },
        );
        a.status = Some(NodeAgentStatus {
            endpoint: Some(format!("http://{name}:8080")),
            last_heartbeat_time: Some(Time(beat)),
            models: models
                .iter()
                .map(|(m, phase)| LoadedModelStatus {
                    served_name: (*m).into(),
                    phase: *phase,
                    progress: None,
                    reason: None,
                    message: None,
                    kv_cache_usage: 0.0,
                    running: 0,
                    waiting: 0,
                    weights_bytes: None,
                    tuning: None,
                })
                .collect(),
            ..Default::default()
        });
        Arc::new(a)
    }

    #[test]
    fn peers_exclude_self_stale_agents_and_unready_models() {
        let now = Timestamp::now();
        let old = now - SignedDuration::from_secs(300);
        let agents = [
            agent("me", now, &[("a", ModelPhase::Ready)]),
            agent(
                "n1",
                now,
                &[("a", ModelPhase::Ready), ("b", ModelPhase::Loading)],
            ),
            agent("n2", old, &[("a", ModelPhase::Ready)]),
        ];
        let peers = peers_from(&agents, "me", now, Duration::from_secs(45));
        assert_eq!(peers.len(), 2);
        let n1 = peers.iter().find(|p| p.url == "http://n1:8080").unwrap();
        assert!(n1.ready);
        assert_eq!(n1.models, vec!["a".to_owned()]);
        assert!(
            !peers
                .iter()
                .find(|p| p.url == "http://n2:8080")
                .unwrap()
                .ready
        );
    }
}
