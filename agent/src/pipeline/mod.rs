//! The request pipeline: what happens to a generation request once the HTTP
//! layer has resolved its target to a local model and validated it into a
//! [`Job`]. [`run`] reads, in order: the response cache (L1, L2), coalescing
//! with an identical request in flight, the semantic cache, the circuit
//! breaker and admission, the engine, filling the caches, and the
//! measurements on the way out. It knows no HTTP: it answers with events
//! and the header that says where they came from.

pub mod measure;
pub mod response_cache;
pub mod semantic_cache;
pub mod validate;

use std::sync::Arc;
use std::time::Instant;

use crate::api::ApiError;
use crate::cache::CacheKey;
use crate::coalesce::{Joined, Publisher, Subscription};
use crate::generate::{self, GenEvent, GenStream, Generation, Job};
use crate::metrics::{Metrics, ModelLabel, OutcomeLabel, TierLabel};
use crate::models::{ServedEncoder, ServedModel};
use semantic_cache::Probe;

/// Header saying which cache tier answered (`l1`, `l2`, `semantic`, or
/// `miss`).
pub const CACHE_HEADER: &str = "x-weir-cache";
/// Header marking an answer shared with an identical request in flight.
pub const COALESCED_HEADER: &str = "x-weir-coalesced";

/// The events that answer a job, and the header (name, value) saying where
/// they came from, if any.
pub struct Answer {
    /// The generation's events, to render as JSON or SSE.
    pub events: GenStream,
    /// `x-weir-cache` or `x-weir-coalesced` with its value.
    pub header: Option<(&'static str, &'static str)>,
}

/// What the pipeline needs from the agent: its metrics and the encoders it
/// serves (for the semantic cache).
pub struct Services<'a, F> {
    /// The agent's metrics.
    pub metrics: &'a Metrics,
    /// The encoder served under a name, if any.
    pub encoder_named: F,
}

/// Runs `job` on `model`: from the response cache when it holds the answer,
/// by joining an identical generation in flight when there is one, else
/// from the semantic cache or the engine (filling the caches).
pub async fn run<F>(
    services: &Services<'_, F>,
    model: Arc<ServedModel>,
    job: Job,
) -> Result<Answer, ApiError>
where
    F: Fn(&str) -> Option<Arc<ServedEncoder>>,
{
    let metrics = services.metrics;
    let label = ModelLabel {
        model_name: model.name.clone(),
    };
    let key = response_cache::cache_key(&model, &job);
    if let Some(answer) = cached_answer(metrics, &model, key, &label).await {
        return Ok(answer);
    }
    let leader = match coalesce(metrics, &model, key, &label) {
        Coalesced::Follower(answer) => return Ok(answer),
        Coalesced::Leader(leader) => leader,
    };
    // Only a leader asks the semantic cache: followers share its answer.
    let (events, tier) = match semantic_or_engine(services, &model, &job, &label, key).await {
        Ok(found) => found,
        Err(e) => {
            // Requests that joined meanwhile get the same answer.
            if let Some((publisher, _)) = leader {
                publisher.send(GenEvent::error(&e));
            }
            return Err(e);
        }
    };
    let events = share_with_followers(events, leader);
    Ok(Answer {
        events,
        header: tier.map(|tier| (CACHE_HEADER, tier)),
    })
}

/// The response cache's answer (L1, then L2), counting the hit or miss.
async fn cached_answer(
    metrics: &Metrics,
    model: &ServedModel,
    key: Option<CacheKey>,
    label: &ModelLabel,
) -> Option<Answer> {
    let (Some(key), Some(cache)) = (key, model.cache.clone()) else {
        return None;
    };
    if let Some((tier, bytes)) = cache.get(&key).await
        && let Ok(generation) = serde_json::from_slice::<Generation>(&bytes)
    {
        let tier_label = TierLabel {
            model_name: model.name.clone(),
            tier: tier.label().into(),
        };
        metrics.cache_hits.get_or_create(&tier_label).inc();
        count_success(metrics, model);
        return Some(Answer {
            events: generate::replay(&generation),
            header: Some((CACHE_HEADER, tier.label())),
        });
    }
    metrics.cache_misses.get_or_create(label).inc();
    None
}

type Leader = Option<(Publisher<CacheKey, GenEvent>, Subscription<GenEvent>)>;

/// Whether this request joins one in flight or leads its own generation.
enum Coalesced {
    Follower(Answer),
    Leader(Leader),
}

/// Joins an identical generation in flight when the policy coalesces.
fn coalesce(
    metrics: &Metrics,
    model: &ServedModel,
    key: Option<CacheKey>,
    label: &ModelLabel,
) -> Coalesced {
    let Some(key) = key.filter(|_| model.cache_policy.coalescing.enabled) else {
        return Coalesced::Leader(None);
    };
    match model.coalescer.join(key) {
        Joined::Follower(subscription) => {
            metrics.coalesced.get_or_create(label).inc();
            count_success(metrics, model);
            Coalesced::Follower(Answer {
                events: response_cache::subscription_stream(subscription),
                header: Some((COALESCED_HEADER, "true")),
            })
        }
        Joined::Leader(publisher, subscription) => {
            Coalesced::Leader(Some((publisher, subscription)))
        }
    }
}

/// A leader's events go to every follower; the leader reads its own
/// subscription like them.
fn share_with_followers(events: GenStream, leader: Leader) -> GenStream {
    match leader {
        Some((publisher, subscription)) => {
            response_cache::pump(events, publisher);
            response_cache::subscription_stream(subscription)
        }
        None => events,
    }
}

/// A semantic hit's replay, else a fresh generation that fills the caches;
/// with the `x-weir-cache` value to answer with, if any.
async fn semantic_or_engine<F>(
    services: &Services<'_, F>,
    model: &Arc<ServedModel>,
    job: &Job,
    label: &ModelLabel,
    key: Option<CacheKey>,
) -> Result<(GenStream, Option<&'static str>), ApiError>
where
    F: Fn(&str) -> Option<Arc<ServedEncoder>>,
{
    let metrics = services.metrics;
    let mut semantic = None;
    match semantic_cache::probe(metrics, &services.encoder_named, model, job).await {
        Some(Probe::Hit(hit)) => {
            if let Ok(generation) = serde_json::from_slice::<Generation>(&hit.answer) {
                let tier_label = TierLabel {
                    model_name: model.name.clone(),
                    tier: "semantic".into(),
                };
                metrics.cache_hits.get_or_create(&tier_label).inc();
                count_success(metrics, model);
                return Ok((generate::replay(&generation), Some("semantic")));
            }
        }
        Some(Probe::Miss(fill)) => semantic = Some(fill),
        None => {}
    }
    let events = admit_and_generate(metrics, model, job, label)?;
    let sinks = response_cache::Sinks {
        exact: key.zip(model.cache.clone()).map(|(k, c)| (c, k)),
        semantic,
    };
    let tier = (key.is_some() && model.cache.is_some()).then_some("miss");
    Ok((response_cache::fill_cache(events, sinks), tier))
}

/// Counts a request answered without the engine (cache hit, coalesced).
fn count_success(metrics: &Metrics, model: &ServedModel) {
    let label = OutcomeLabel {
        model_name: model.name.clone(),
        outcome: "success".into(),
    };
    metrics.requests.get_or_create(&label).inc();
}

/// Breaker, admission and the engine: the events of a fresh generation.
fn admit_and_generate(
    metrics: &Metrics,
    model: &Arc<ServedModel>,
    job: &Job,
    label: &ModelLabel,
) -> Result<GenStream, ApiError> {
    if let Err(wait) = model.breaker.allow(Instant::now()) {
        return Err(ApiError::Unavailable {
            message: format!(
                "model `{}` is failing; the circuit breaker is open",
                model.name
            ),
            retry_after: wait,
        });
    }
    let cost = job.prompts.len() * job.n;
    let permits = model
        .admission
        .try_admit(job.template.priority, cost)
        .map_err(|retry_after| {
            metrics.rejected.get_or_create(label).inc();
            ApiError::Overloaded {
                message: format!(
                    "model `{}` has too many requests queued; retry shortly",
                    model.name
                ),
                retry_after,
            }
        })?;
    let events = generate::run(&model.engine, model.tokenizer.clone(), job)?;
    Ok(measure::instrument(events, metrics, model.clone(), permits))
}
