//! The encoders behind `/v1/embeddings` and the semantic cache. An encoder
//! is a served model like any other. Encoding runs on the blocking pool one
//! batch at a time (the encoder parallelizes inside), behind a bounded wait
//! list: past it, 429.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use weir_engine::encoder::{Embedding, TextEmbedder, Truncation};

use super::{LoadError, ModelSpec};
use crate::api::ApiError;
use crate::api::types::EmbeddingInput;

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;
/// Requests waiting for an encoder beyond the one running; more get 429.
pub const MAX_WAITING: usize = 256;

/// A loaded encoder and its admission gate.
pub struct ServedEncoder {
    /// Name clients use.
    pub name: String,
    /// The tokenizer and encoder.
    pub embedder: Arc<TextEmbedder>,
    /// Unix seconds when loaded.
    pub created: u64,
    /// What was loaded.
    pub spec: ModelSpec,
    gate: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

impl ServedEncoder {
    /// Loads the encoder directory of `spec`.
    pub fn load(spec: &ModelSpec, created: u64) -> Result<Self, LoadError> {
        let embedder = TextEmbedder::load(&spec.dir).map_err(|source| LoadError::Engine {
            name: spec.name.clone(),
            source,
        })?;
        Ok(Self {
            name: spec.name.clone(),
            embedder: Arc::new(embedder),
            created,
            spec: spec.clone(),
            gate: Arc::new(Semaphore::new(1)),
            waiting: Arc::default(),
            max_waiting: MAX_WAITING,
        })
    }

    /// The same encoder under a new spec (nothing to reload).
    pub fn with_spec(&self, spec: &ModelSpec) -> Self {
        Self {
            name: spec.name.clone(),
            embedder: self.embedder.clone(),
            created: self.created,
            spec: spec.clone(),
            gate: self.gate.clone(),
            waiting: self.waiting.clone(),
            max_waiting: self.max_waiting,
        }
    }

    /// Vectors of already-tokenized inputs, off the async threads.
    pub async fn embed_ids(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Embedding>, ApiError> {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::Overloaded {
                message: format!("encoder `{}` has too many requests waiting", self.name),
                retry_after: Duration::from_secs(1),
            });
        }
        // Counted until the gate opens, or until the caller goes away.
        let waiting = WaitGuard(&self.waiting);
        let permit = self.gate.clone().acquire_owned().await;
        drop(waiting);
        let permit = permit.map_err(|_| ApiError::Internal("encoder closed".into()))?;
        let embedder = self.embedder.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            embedder.embed_ids(inputs)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("encoder task: {e}")))?
        .map_err(|e| ApiError::invalid("input", e.to_string()))
    }

    /// The vector of one text, cut to the encoder's length (for the
    /// semantic cache).
    pub async fn embed_text(&self, text: &str) -> Result<Vec<f32>, ApiError> {
        let ids = self
            .embedder
            .tokenize(text, Truncation::Keep)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut out = self.embed_ids(vec![ids]).await?;
        Ok(out.pop().map(|e| e.vector).unwrap_or_default())
    }

    /// Token ids of every input, refusing any that is empty or too long.
    pub fn inputs(&self, input: EmbeddingInput) -> Result<Vec<Vec<u32>>, ApiError> {
        let fit = |r: weir_engine::Result<Vec<u32>>, i: usize| {
            r.map_err(|e| ApiError::invalid("input", format!("input[{i}]: {e}")))
        };
        let e = &self.embedder;
        let inputs: Vec<Vec<u32>> = match input {
            EmbeddingInput::Text(t) => vec![fit(tokenize_nonempty(e, &t), 0)?],
            EmbeddingInput::Texts(ts) => {
                check_count(ts.len())?;
                ts.iter()
                    .enumerate()
                    .map(|(i, t)| fit(tokenize_nonempty(e, t), i))
                    .collect::<Result<_, _>>()?
            }
            EmbeddingInput::Tokens(ids) => vec![fit(wrap_nonempty(e, &ids), 0)?],
            EmbeddingInput::TokenLists(lists) => {
                check_count(lists.len())?;
                lists
                    .iter()
                    .enumerate()
                    .map(|(i, ids)| fit(wrap_nonempty(e, ids), i))
                    .collect::<Result<_, _>>()?
            }
        };
        Ok(inputs)
    }
}

/// Takes one off the wait count when dropped (also when the waiting
/// request is cancelled).
struct WaitGuard<'a>(&'a AtomicUsize);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn check_count(n: usize) -> Result<(), ApiError> {
    match n {
        0 => Err(ApiError::invalid(
            "input",
            "input must not be an empty list",
        )),
        n if n > MAX_INPUTS => Err(ApiError::invalid(
            "input",
            format!("at most {MAX_INPUTS} inputs per request, got {n}"),
        )),
        _ => Ok(()),
    }
}

fn tokenize_nonempty(e: &TextEmbedder, text: &str) -> weir_engine::Result<Vec<u32>> {
    if text.is_empty() {
        return Err(weir_engine::EngineError::InvalidRequest(
            "the input is an empty string".into(),
        ));
    }
    e.tokenize(text, Truncation::Error)
}

fn wrap_nonempty(e: &TextEmbedder, ids: &[u32]) -> weir_engine::Result<Vec<u32>> {
    if ids.is_empty() {
        return Err(weir_engine::EngineError::InvalidRequest(
            "the input has no tokens".into(),
        ));
    }
    e.wrap_ids(ids, Truncation::Error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ServedEncoder {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("engine/tests/fixtures/tiny-bert");
        let spec = ModelSpec {
            name: "tiny-bert".into(),
            dir,
            ..ModelSpec::default()
        };
        ServedEncoder::load(&spec, 0).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn beyond_the_wait_list_requests_get_429_and_waiters_finish() {
        let encoder = Arc::new(ServedEncoder {
            max_waiting: 3,
            ..tiny()
        });
        let waiting = |n: usize, what: &str| {
            let encoder = encoder.clone();
            let what = what.to_owned();
            async move {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while encoder.waiting.load(Ordering::Acquire) != n {
                    assert!(std::time::Instant::now() < deadline, "{what}");
                    tokio::task::yield_now().await;
                }
            }
        };
        // Hold the encoder as a long batch would.
        let busy = encoder.gate.clone().try_acquire_owned().unwrap();
        let mut waiters = Vec::new();
        for _ in 0..2 {
            let e = encoder.clone();
            waiters.push(tokio::spawn(async move { e.embed_text("the agent").await }));
        }
        waiting(2, "waiters never queued").await;
        let gone = encoder.clone();
        let cancelled = tokio::spawn(async move { gone.embed_text("cancelled").await });
        waiting(3, "the third waiter never queued").await;
        let refused = encoder.embed_text("one too many").await.unwrap_err();
        assert_eq!(refused.status(), http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            encoder.waiting.load(Ordering::Acquire),
            3,
            "a refusal leaves no count"
        );
        // A waiter whose client goes away leaves the list.
        cancelled.abort();
        let _ = cancelled.await;
        waiting(2, "a cancelled waiter stays counted").await;
        drop(busy);
        for w in waiters {
            assert_eq!(w.await.unwrap().unwrap().len(), 64);
        }
        assert_eq!(encoder.waiting.load(Ordering::Acquire), 0);
    }
}
