//! Tokenizers of models this agent routes but does not serve, held without
//! their weights so that the prefix policy can hash any prompt's blocks:
//! each is fetched from a peer that serves the model
//! (`GET /v1/weir/tokenizer?model=M`, the serving agent's own tokenizer
//! in [`PortableTokenizer`] form, so both compute the same token ids).
//!
//! # Guarantees
//! - A fetch never delays a request: until a model's tokenizer is here,
//!   its requests are placed by hashing (and one fetch starts).
//! - Bounded: at most [`MAX_BYTES`] of serialized tokenizers are held
//!   (least recently used go first), one response is read up to
//!   [`MAX_ONE`] bytes, at most one fetch per model is in flight, and a
//!   model whose fetch failed is not asked for again before [`RETRY`].
//! - A tokenizer is dropped after [`REFRESH`] and fetched again, so a model
//!   redeployed under the same name with another tokenizer is picked up.
//!
//! # Caveat
//! A prompt the serving agent would shape (optimize, or truncate to its
//! context) hashes differently here than there; such requests lose the
//! cache score, not correctness.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weir_engine::tokenizer::{PortableTokenizer, TextTokenizer};

use super::peers::PeerTable;

/// Most bytes of serialized tokenizers held.
pub const MAX_BYTES: u64 = 256 << 20;
/// Most bytes one tokenizer response may have.
pub const MAX_ONE: usize = 64 << 20;
/// How long a failed fetch keeps the model from being asked for again.
pub const RETRY: Duration = Duration::from_secs(5);
/// How long a tokenizer is held before it is fetched again.
pub const REFRESH: Duration = Duration::from_secs(600);
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(20);

/// Where tokenizers are fetched from: the agent's pooled client and the
/// API key it presents to peers.
#[derive(Clone)]
struct Source {
    client: reqwest::Client,
    api_key: Option<Arc<str>>,
}

/// The gauge that shows how many tokenizers are held.
type HeldGauge = prometheus_client::metrics::gauge::Gauge;

/// The tokenizers of models served only by peers.
#[derive(Clone)]
pub struct PeerTokenizers {
    held: moka::sync::Cache<String, Arc<TextTokenizer>>,
    /// Models with a fetch in flight or failed, and since when.
    asked: Arc<Mutex<HashMap<String, Instant>>>,
    source: Option<Source>,
    /// Set to the number held whenever one comes or goes.
    gauge: HeldGauge,
}

impl Default for PeerTokenizers {
    /// Holds none and fetches none (tests, agents without peers).
    fn default() -> Self {
        Self::with_source(None, HeldGauge::default())
    }
}

impl std::fmt::Debug for PeerTokenizers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTokenizers")
            .field("held", &self.held.entry_count())
            .field("fetching", &self.source.is_some())
            .finish()
    }
}

impl PeerTokenizers {
    /// Fetches from peers with `client`, presenting `api_key`, and keeps
    /// `gauge` at the number held.
    pub fn fetching(client: reqwest::Client, api_key: Option<Arc<str>>, gauge: HeldGauge) -> Self {
        Self::with_source(Some(Source { client, api_key }), gauge)
    }

    fn with_source(source: Option<Source>, gauge: HeldGauge) -> Self {
        let on_evict = gauge.clone();
        let held = moka::sync::Cache::builder()
            .max_capacity(MAX_BYTES)
            .weigher(|_: &String, t: &Arc<TextTokenizer>| weight(t))
            .time_to_live(REFRESH)
            .eviction_listener(move |_, _, cause| {
                // A replaced entry is still one held.
                if cause != moka::notification::RemovalCause::Replaced {
                    on_evict.dec();
                }
            })
            .build();
        Self {
            held,
            asked: Arc::default(),
            source,
            gauge,
        }
    }

    /// Number of tokenizers held.
    pub fn len(&self) -> usize {
        self.held.run_pending_tasks();
        self.held.entry_count() as usize
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `model`'s tokenizer if held; otherwise starts fetching it from a
    /// ready peer serving it (unless a fetch is in flight or failed within
    /// [`RETRY`]) and returns `None`.
    pub fn get(&self, model: &str, peers: &PeerTable) -> Option<Arc<TextTokenizer>> {
        if let Some(t) = self.held.get(model) {
            return Some(t);
        }
        let source = self.source.clone()?;
        let urls: Vec<String> = peers.serving(model).into_iter().map(|p| p.url).collect();
        if urls.is_empty() || !self.claim(model, Instant::now()) {
            return None;
        }
        let this = self.clone();
        let model = model.to_owned();
        tokio::spawn(async move {
            for url in &urls {
                match fetch(&source, url, &model).await {
                    Ok(t) => {
                        this.insert(&model, t);
                        return;
                    }
                    Err(e) => tracing::debug!(peer = %url, %model, error = %e, "no tokenizer"),
                }
            }
            tracing::warn!(%model, "no peer gave its tokenizer; placing its requests by hashing");
        });
        None
    }

    /// Holds `tokenizer` as `model`'s and clears its fetch mark.
    pub fn insert(&self, model: &str, tokenizer: TextTokenizer) {
        if !self.held.contains_key(model) {
            self.gauge.inc();
        }
        self.held.insert(model.to_owned(), Arc::new(tokenizer));
        self.asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(model);
    }

    /// Marks `model` as being fetched at `now`; false when a fetch is in
    /// flight or failed less than [`RETRY`] ago.
    fn claim(&self, model: &str, now: Instant) -> bool {
        let mut asked = self.asked.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded by the models peers serve; stale marks go as they expire.
        asked.retain(|_, since| now.saturating_duration_since(*since) < RETRY);
        if asked.contains_key(model) {
            return false;
        }
        asked.insert(model.to_owned(), now);
        true
    }
}

/// A tokenizer's weight in the cache: the bytes of its vocabulary and
/// merges, estimated from the vocabulary size.
fn weight(t: &TextTokenizer) -> u32 {
    // A byte-level BPE entry (token, id, merge) takes ~64 bytes in memory.
    (t.vocab_size() as u64 * 64).min(u64::from(u32::MAX)) as u32
}

/// The body of a tokenizer answer.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct TokenizerAnswer {
    /// The model it belongs to.
    pub model: String,
    /// The tokenizer.
    #[serde(flatten)]
    pub tokenizer: PortableTokenizer,
}

async fn fetch(source: &Source, url: &str, model: &str) -> Result<TextTokenizer, String> {
    let mut ask = source
        .client
        .get(format!("{url}/v1/weir/tokenizer"))
        .query(&[("model", model)])
        .header(super::FORWARDED, "1")
        .timeout(FETCH_TIMEOUT);
    if let Some(key) = &source.api_key {
        ask = ask.bearer_auth(key);
    }
    let mut response = ask.send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ONE as u64)
    {
        return Err(format!("larger than {MAX_ONE} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_ONE {
            return Err(format!("larger than {MAX_ONE} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    let model = model.to_owned();
    tokio::task::spawn_blocking(move || {
        let answer: TokenizerAnswer = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        if answer.model != model {
            return Err(format!("answered for `{}`", answer.model));
        }
        TextTokenizer::from_portable(answer.tokenizer).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_fetch_per_model_and_none_again_before_the_retry_time() {
        let t = PeerTokenizers::default();
        let start = Instant::now();
        assert!(t.claim("m", start));
        assert!(!t.claim("m", start + Duration::from_secs(1)));
        assert!(t.claim("other", start + Duration::from_secs(1)));
        assert!(!t.claim("m", start + RETRY - Duration::from_millis(1)));
        assert!(t.claim("m", start + RETRY));
    }

    #[test]
    fn without_a_source_nothing_is_fetched() {
        let t = PeerTokenizers::default();
        assert!(t.get("m", &PeerTable::default()).is_none());
        assert!(t.is_empty());
    }
}
