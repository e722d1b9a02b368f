//! How many bytes of weights a Model has, for the GPU memory estimate of
//! placement. In order: the `weir.dev/weights-bytes` annotation (an explicit
//! override); what an agent that loaded the model reports in its NodeAgent
//! status; for `hf://` sources, the sizes the Hub's API lists for the
//! revision's safetensors files (public repositories; answers cached). When
//! none is known the Model is placed as if it fit any GPU.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use serde::Deserialize;
use weir_crds::{Model, NodeAgent};

use crate::world;

/// Annotation giving a Model's weight size in bytes.
pub const WEIGHT_BYTES_ANNOTATION: &str = "weir.dev/weights-bytes";

/// How long a Hub answer (or its failure) is kept.
const KEEP: Duration = Duration::from_secs(600);

#[derive(Deserialize)]
struct RevisionInfo {
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
}

/// Weight sizes, with a cache of Hub answers.
pub struct WeightSizes {
    http: reqwest::Client,
    endpoint: String,
    hub: Mutex<HashMap<String, (Option<u64>, Instant)>>,
}

/// Largest weight size each served model's agents report.
pub fn reported(agents: &[std::sync::Arc<NodeAgent>]) -> BTreeMap<String, u64> {
    let mut sizes = BTreeMap::new();
    for m in agents
        .iter()
        .filter_map(|a| a.status.as_ref())
        .flat_map(|s| &s.models)
    {
        if let Some(bytes) = m.weights_bytes.filter(|b| *b > 0) {
            let e = sizes.entry(m.served_name.clone()).or_insert(0);
            *e = (*e).max(bytes);
        }
    }
    sizes
}

impl WeightSizes {
    /// Sizes from the Hub at `endpoint`.
    pub fn new(endpoint: &str) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            hub: Mutex::default(),
        }
    }

    /// `HF_ENDPOINT`, else the public Hub.
    pub fn from_env() -> Self {
        Self::new(&std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into()))
    }

    /// The weight bytes of `model` (0 when unknown).
    pub async fn of(&self, model: &Model, reported: &BTreeMap<String, u64>) -> u64 {
        if let Some(bytes) = model
            .annotations()
            .get(WEIGHT_BYTES_ANNOTATION)
            .and_then(|v| v.parse().ok())
        {
            return bytes;
        }
        if let Some(&bytes) = reported.get(&world::served_name(model)) {
            return bytes;
        }
        let Some(repo) = model.spec.source.uri.strip_prefix("hf://") else {
            return 0;
        };
        let revision = model.spec.source.revision.as_deref().unwrap_or("main");
        self.query_hub(repo, revision).await.unwrap_or(0)
    }

    async fn query_hub(&self, repo: &str, revision: &str) -> Option<u64> {
        let key = format!("{repo}@{revision}");
        if let Some((answer, at)) = self.lock().get(&key)
            && at.elapsed() < KEEP
        {
            return *answer;
        }
        let url = format!(
            "{}/api/models/{repo}/revision/{revision}?blobs=true",
            self.endpoint
        );
        let answer = async {
            let info: RevisionInfo = self
                .http
                .get(&url)
                .send()
                .await
                .ok()?
                .error_for_status()
                .ok()?
                .json()
                .await
                .ok()?;
            let total: u64 = info
                .siblings
                .iter()
                .filter(|s| s.rfilename.ends_with(".safetensors") && !s.rfilename.contains('/'))
                .filter_map(|s| s.size)
                .sum();
            (total > 0).then_some(total)
        }
        .await;
        if answer.is_none() {
            tracing::debug!(repo, revision, "no weight sizes from the Hub");
        }
        self.lock().insert(key, (answer, Instant::now()));
        answer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Option<u64>, Instant)>> {
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }
}
