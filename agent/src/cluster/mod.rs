//! Cluster mode: the agent registers the `NodeAgent` named after its node
//! (owned by the Node, so it is collected with it, as a kubelet registers
//! its Node), serves what the operator writes into its spec — loading,
//! replacing and unloading models and applying new policies live — and
//! heartbeats its status: endpoint, GPUs, each model's phase and load.

pub mod discovery;
pub mod fetch;
pub mod plan;
pub mod status;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use weir_crds::node_agent::{ModelPhase, NodeAgent, NodeAgentSpec};

use crate::http::AppState;
use crate::models::{Loaded, ModelSpec};
use plan::{SourceRoots, SyncAction};
use status::ModelState;

/// Field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "weir-agent";

/// Settings of cluster mode.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Node the agent runs on (and the NodeAgent's name).
    pub node_name: String,
    /// Base URL peers and the operator reach this agent at.
    pub endpoint: String,
    /// Seconds between heartbeats.
    pub heartbeat: Duration,
    /// Where sources are found on the node.
    pub roots: SourceRoots,
    /// Downloads of `hf://` sources.
    pub downloads: fetch::Downloads,
    /// Bound on draining an unassigned model (or the agent on SIGTERM).
    pub drain_timeout: Duration,
    /// Wakes the heartbeat to report a change at once (a drain starting).
    pub beat_now: Arc<tokio::sync::Notify>,
}

/// Errors of cluster mode.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The API server refused or failed a call.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Per-model phases the agent reports (Loading, Ready, Failed ...).
pub type ModelStates = Arc<RwLock<BTreeMap<String, ModelState>>>;

/// Creates the NodeAgent for this node if it does not exist, owned by the
/// Node so that deleting the Node collects it.
pub async fn register(client: &kube::Client, node_name: &str) -> Result<NodeAgent, ClusterError> {
    let agents: Api<NodeAgent> = Api::all(client.clone());
    if let Some(existing) = agents.get_opt(node_name).await? {
        return Ok(existing);
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let owner = nodes.get_opt(node_name).await?.and_then(|node| {
        Some(OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: node_name.to_owned(),
            uid: node.metadata.uid?,
            ..OwnerReference::default()
        })
    });
    if owner.is_none() {
        tracing::warn!(
            node = node_name,
            "no Node object of this name: the NodeAgent will not be collected with it"
        );
    }
    let agent = NodeAgent {
        metadata: ObjectMeta {
            name: Some(node_name.to_owned()),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: NodeAgentSpec {
            node_name: node_name.to_owned(),
            ..NodeAgentSpec::default()
        },
        status: None,
    };
    match agents.create(&PostParams::default(), &agent).await {
        Ok(created) => Ok(created),
        // Another start of this agent won the race; use its object.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(agents.get(node_name).await?),
        Err(e) => Err(e.into()),
    }
}

/// Writes the agent's status with server-side apply.
pub async fn heartbeat(
    client: &kube::Client,
    config: &ClusterConfig,
    state: &AppState,
    states: &ModelStates,
    generation: Option<i64>,
) -> Result<(), ClusterError> {
    let agents: Api<NodeAgent> = Api::all(client.clone());
    let status = status::build(
        config,
        state,
        &states.read().unwrap_or_else(|p| p.into_inner()),
        generation,
    );
    let patch = serde_json::json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "NodeAgent",
        "status": status,
    });
    agents
        .patch_status(
            &config.node_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
    Ok(())
}

/// Registers, then serves the NodeAgent's spec and heartbeats until the
/// process ends. API errors are logged and retried; they never stop serving.
pub async fn run(client: kube::Client, config: ClusterConfig, state: AppState) {
    let states: ModelStates = Arc::default();
    let generation = Arc::new(RwLock::new(None));
    loop {
        match register(&client, &config.node_name).await {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "registering the NodeAgent; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
    let beat = {
        let (client, config, state, states, generation) = (
            client.clone(),
            config.clone(),
            state.clone(),
            states.clone(),
            generation.clone(),
        );
        async move {
            let mut tick = tokio::time::interval(config.heartbeat);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = config.beat_now.notified() => {}
                }
                let observed = *generation.read().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = heartbeat(&client, &config, &state, &states, observed).await {
                    tracing::warn!(error = %e, "heartbeat");
                }
            }
        }
    };
    tokio::spawn(beat);
    tokio::spawn(discovery::run(
        client.clone(),
        config.node_name.clone(),
        state.clone(),
    ));
    let agents: Api<NodeAgent> = Api::all(client.clone());
    let selector = format!("metadata.name={}", config.node_name);
    let mut events = watcher(agents, watcher::Config::default().fields(&selector)).boxed();
    let mut last: Option<NodeAgentSpec> = None;
    loop {
        tokio::select! {
            event = events.next() => match event {
                None => return,
                Some(Ok(watcher::Event::Apply(agent) | watcher::Event::InitApply(agent))) => {
                    *generation.write().unwrap_or_else(|p| p.into_inner()) =
                        agent.metadata.generation;
                    sync(&client, &config, &state, &states, &agent.spec).await;
                    last = Some(agent.spec);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "watching the NodeAgent"),
            },
            // A download ended: load what arrived, or report why not.
            () = config.downloads.finished() => {
                if let Some(spec) = &last {
                    sync(&client, &config, &state, &states, spec).await;
                }
            }
        }
    }
}

fn set_state(states: &ModelStates, name: &str, state: ModelState) {
    states
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.to_owned(), state);
}

/// A key of a Secret in `namespace`, trimmed (`None` when it cannot be read).
async fn secret_value(
    client: &kube::Client,
    namespace: &str,
    key: &weir_crds::common::SecretKeyRef,
) -> Option<String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let found = secrets.get_opt(&key.name).await;
    let value = found
        .as_ref()
        .ok()
        .and_then(|s| s.as_ref()?.data.as_ref()?.get(&key.key));
    value
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .map(|v| v.trim().to_owned())
}

/// The Redis URL of an assignment's L2 cache, from its Secret in the
/// Model's namespace (`None`, logged, when it cannot be read: L2 stays off).
async fn redis_url(
    client: &kube::Client,
    assigned: &weir_crds::node_agent::AssignedModel,
) -> Option<String> {
    let l2 = assigned.cache.response_cache.l2.as_ref()?;
    let url = secret_value(client, &assigned.model_ref.namespace, &l2.url_secret_ref).await;
    if url.is_none() {
        tracing::warn!(model = %assigned.served_name, secret = %l2.url_secret_ref.name, "no Redis URL: L2 cache off");
    }
    url
}

/// The download an `hf://` assignment still needs, if its files are not in
/// the model cache yet.
async fn pending_download(
    client: &kube::Client,
    assigned: &weir_crds::node_agent::AssignedModel,
    dir: &std::path::Path,
) -> Option<fetch::Fetch> {
    let source = assigned.source.uri.strip_prefix("hf://")?;
    // `org/name`, or `org/name/FILE.gguf`: one file into its own directory.
    let (repo, file) = match source.rsplit_once('/') {
        Some((repo, file)) if file.ends_with(".gguf") => (repo, Some(file.to_owned())),
        _ => (source, None),
    };
    let (present, target) = match &file {
        Some(_) => (dir.exists(), dir.parent()?.to_path_buf()),
        None => (dir.join("config.json").exists(), dir.to_path_buf()),
    };
    if present {
        return None;
    }
    let token = match &assigned.source.token_secret_ref {
        Some(key) => secret_value(client, &assigned.model_ref.namespace, key).await,
        None => None,
    };
    Some(fetch::Fetch {
        repo: repo.to_owned(),
        revision: assigned
            .source
            .revision
            .clone()
            .unwrap_or_else(|| "main".into()),
        token,
        dir: target,
        file,
    })
}

/// Brings the served models in line with `spec`.
pub async fn sync(
    client: &kube::Client,
    config: &ClusterConfig,
    state: &AppState,
    states: &ModelStates,
    spec: &NodeAgentSpec,
) {
    let mut desired = Vec::new();
    for assigned in &spec.models {
        match plan::model_spec(assigned, &config.roots) {
            Ok(mut s) => {
                if let Some(fetch) = pending_download(client, assigned, &s.dir).await {
                    set_state(states, &s.name, config.downloads.ensure(fetch));
                    continue;
                }
                s.redis_url = redis_url(client, assigned).await;
                desired.push(s)
            }
            Err(reason) => set_state(
                states,
                &assigned.served_name,
                ModelState::failed("SourceUnavailable", reason),
            ),
        }
    }
    if spec.draining {
        desired.clear();
    }
    // A model draining is on its way out: assigned again, it loads afresh.
    let loaded: BTreeMap<String, ModelSpec> = {
        let models = state.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .iter()
            .filter(|m| !m.drain.is_draining())
            .map(|m| (m.name.clone(), m.spec.clone()))
            .chain(models.encoders().map(|e| (e.name.clone(), e.spec.clone())))
            .collect()
    };
    let assigned: Vec<&str> = spec.models.iter().map(|m| m.served_name.as_str()).collect();
    states
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|name, _| assigned.contains(&name.as_str()));
    for action in plan::plan(&loaded, &desired) {
        apply(config, state, states, action).await;
    }
}

/// Takes `name` out of service: an encoder at once; a generator reported
/// `Unloading` by a heartbeat now, then drained (its requests in flight
/// finish within the drain timeout) and only then removed.
fn unload(config: &ClusterConfig, state: &AppState, name: &str) {
    let model = {
        let mut models = state.models.write().unwrap_or_else(|p| p.into_inner());
        if models.remove_encoder(name).is_some() {
            tracing::info!(model = %name, "unloaded");
        }
        models.get(name)
    };
    let Some(model) = model else { return };
    model.drain.begin();
    config.beat_now.notify_one();
    let (models, timeout) = (state.models.clone(), config.drain_timeout);
    tokio::spawn(async move {
        let drained = model.drain.run(timeout).await;
        let removed = models
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove_this(&model);
        tracing::info!(
            model = %model.name,
            in_flight = drained.in_flight,
            aborted = drained.aborted,
            removed,
            "drained and unloaded"
        );
    });
}

async fn apply(config: &ClusterConfig, state: &AppState, states: &ModelStates, action: SyncAction) {
    match action {
        SyncAction::Unload(name) => unload(config, state, &name),
        SyncAction::UpdatePolicies(spec) => {
            let mut models = state.models.write().unwrap_or_else(|p| p.into_inner());
            if let Some(current) = models.get(&spec.name) {
                let updated = models.insert(current.with_policies(&spec));
                crate::adaptive::spawn(updated, state.gpu.clone());
                tracing::info!(model = %spec.name, "applied new cache and batch policies");
            } else if let Some(encoder) = models.encoder(&spec.name) {
                // Encoders take no cache or batch policy; keep the new spec.
                models.insert_loaded(Loaded::Encoder(encoder.with_spec(&spec)));
            }
        }
        SyncAction::Load(spec) | SyncAction::Replace(spec) => {
            set_state(states, &spec.name, ModelState::loading());
            let name = spec.name.clone();
            let loaded = tokio::task::spawn_blocking(move || Loaded::load(&spec)).await;
            match loaded {
                Ok(Ok(loaded)) => {
                    let mut models = state.models.write().unwrap_or_else(|p| p.into_inner());
                    match loaded {
                        Loaded::Generator(model) => {
                            let model = models.insert(model);
                            crate::adaptive::spawn(model, state.gpu.clone());
                        }
                        encoder @ Loaded::Encoder(_) => models.insert_loaded(encoder),
                    }
                    drop(models);
                    set_state(states, &name, ModelState::phase(ModelPhase::Ready));
                    tracing::info!(model = %name, "loaded");
                    // Requests held here for it go to this replica now; a
                    // heartbeat at once tells peers holding requests too.
                    state.holds.release(&name);
                    config.beat_now.notify_one();
                }
                Ok(Err(e)) => set_state(
                    states,
                    &name,
                    ModelState::failed("LoadFailed", e.to_string()),
                ),
                Err(e) => set_state(
                    states,
                    &name,
                    ModelState::failed("LoadPanicked", e.to_string()),
                ),
            }
        }
    }
}
