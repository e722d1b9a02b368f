//! Reusing work across requests: the cache key of a job, filling the
//! response cache from a finished generation, and sharing one generation
//! among identical requests in flight.

use std::sync::Arc;

use futures::stream::{self, StreamExt};
use serde_json::json;
use weir_crds::cache_policy::Cacheability;

use crate::cache::semantic::SemanticFill;
use crate::cache::{CacheKey, ResponseCache};
use crate::coalesce::{Publisher, Subscription};
use crate::generate::{GenEvent, GenStream, Generation, Job, is_deterministic};
use crate::models::ServedModel;

/// Whether `job`'s answer may be stored and replayed under `model`'s
/// policy: by default only deterministic jobs (greedy, or seeded), since
/// replaying sampled output would change what a client receives.
pub fn cacheable(model: &ServedModel, job: &Job) -> bool {
    model.cache_policy.response_cache.cacheable == Cacheability::All || is_deterministic(job)
}

/// The cache key of `job` on `model`, when its policy lets it be cached.
pub fn cache_key(model: &ServedModel, job: &Job) -> Option<CacheKey> {
    if !model.cache_policy.response_cache.enabled || !cacheable(model, job) {
        return None;
    }
    // The prompt is in token ids, so equivalent chat messages (after the
    // template) share a key.
    Some(digest(model, job, json!(job.prompts)))
}

/// Digest of `prompt` (any JSON standing for the prompt) with the model and
/// every other input that changes the output.
pub fn digest(model: &ServedModel, job: &Job, prompt: serde_json::Value) -> CacheKey {
    let t = &job.template;
    let s = &t.sampling;
    let mut canonical = json!({
        "v": env!("CARGO_PKG_VERSION"),
        "model": model.name,
        "prompts": prompt,
        "n": job.n,
        "max_tokens": t.max_tokens,
        "stop": t.stop,
        "stop_token_ids": t.stop_token_ids,
        "ignore_eos": t.ignore_eos,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "repetition_penalty": s.repetition_penalty,
        "frequency_penalty": s.frequency_penalty,
        "presence_penalty": s.presence_penalty,
        "logit_bias": s.logit_bias,
        "seed": s.seed,
        "logprobs": s.logprobs,
        "prompt_logprobs": t.prompt_logprobs,
        "grammar": t.grammar.as_ref().map(|g| g.cache_key()),
    });
    // A tenant that does not share gets keys of its own: no entry, and no
    // generation in flight, is shared with another tenant.
    if let Some(scope) = &job.cache_scope {
        canonical["tenant"] = json!(scope.as_ref());
    }
    CacheKey::from_canonical(canonical.to_string().as_bytes())
}

/// Where a finished generation is stored.
#[derive(Default)]
pub struct Sinks {
    /// The exact-match response cache and the key.
    pub exact: Option<(Arc<ResponseCache>, CacheKey)>,
    /// The semantic index, scope and question vector.
    pub semantic: Option<SemanticFill>,
}

impl Sinks {
    fn is_empty(&self) -> bool {
        self.exact.is_none() && self.semantic.is_none()
    }

    async fn store(&self, generation: &Generation) {
        let Ok(bytes) = serde_json::to_vec(generation) else {
            return;
        };
        let bytes: Arc<[u8]> = bytes.into();
        if let Some(fill) = &self.semantic {
            fill.store(bytes.clone());
        }
        if let Some((cache, key)) = &self.exact {
            cache.put(*key, bytes).await;
        }
    }
}

/// Passes `events` through and, when they end with `Done`, stores the
/// generation in `sinks`.
pub fn fill_cache(events: GenStream, sinks: Sinks) -> GenStream {
    if sinks.is_empty() {
        return events;
    }
    let collected = Generation::default();
    Box::pin(stream::unfold(
        (events, collected, sinks),
        move |(mut events, mut g, sinks)| async move {
            let event = events.next().await?;
            match &event {
                GenEvent::PromptLogprobs { index, logprobs } => {
                    if g.choices.len() <= *index {
                        g.choices.resize_with(index + 1, Default::default);
                    }
                    g.choices[*index].prompt_logprobs = logprobs.clone();
                }
                GenEvent::Delta {
                    index,
                    text,
                    logprobs,
                } => {
                    if g.choices.len() <= *index {
                        g.choices.resize_with(index + 1, Default::default);
                    }
                    g.choices[*index].text.push_str(text);
                    g.choices[*index].logprobs.extend(logprobs.iter().cloned());
                }
                GenEvent::ChoiceDone {
                    index,
                    finish_reason,
                } => {
                    if let Some(c) = g.choices.get_mut(*index) {
                        c.finish_reason = finish_reason.clone();
                    }
                }
                GenEvent::Done { usage } => {
                    g.usage = *usage;
                    sinks.store(&g).await;
                }
                GenEvent::Error { .. } => {}
            }
            Some((event, (events, g, sinks)))
        },
    ))
}

/// A subscription as a stream of events.
pub fn subscription_stream(subscription: Subscription<GenEvent>) -> GenStream {
    Box::pin(stream::unfold(subscription, |mut s| async move {
        s.next().await.map(|e| (e, s))
    }))
}

/// Drives the leader's generation into `publisher` until it ends or nobody
/// listens any more (dropping `events` then aborts the engine requests).
pub fn pump(mut events: GenStream, publisher: Publisher<CacheKey, GenEvent>) {
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let last = matches!(event, GenEvent::Done { .. } | GenEvent::Error { .. });
            publisher.send(event);
            if last || publisher.subscriber_count() == 0 {
                break;
            }
        }
        publisher.finish();
    });
}
