//! Serving one job: circuit breaker, admission, the engine, and the
//! measurements taken on the way out (TTFT, inter-token latency, end-to-end
//! latency, outcome). Permits are held until the stream ends or is dropped,
//! so a client that goes away frees its place and its KV blocks at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::StatusCode;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, StreamExt};

use super::AppState;
use super::render::{self, ResponseMeta, Shape};
use crate::admission::Permit;
use crate::api::ApiError;
use crate::coalesce::Joined;
use crate::generate::Generation;
use crate::generate::{self, GenEvent, GenStream, Job};
use crate::metrics::{Metrics, ModelLabel, OutcomeLabel, TierLabel};
use crate::models::ServedModel;
use crate::reuse;
use crate::semantic::Probe;

/// Runs `job` on `model` and answers as JSON or SSE: from the response
/// cache when it holds the answer, by joining an identical generation in
/// flight when there is one, else on the engine (filling the cache).
pub async fn respond(
    state: AppState,
    model: Arc<ServedModel>,
    job: Job,
    meta: ResponseMeta,
    shape: Shape,
    stream: bool,
) -> Response {
    let label = ModelLabel {
        model_name: model.name.clone(),
    };
    let key = reuse::cache_key(&model, &job);
    if let (Some(key), Some(cache)) = (key, model.cache.clone()) {
        if let Some((tier, bytes)) = cache.get(&key).await
            && let Ok(generation) = serde_json::from_slice::<Generation>(&bytes)
        {
            let tier_label = TierLabel {
                model_name: model.name.clone(),
                tier: tier.label().into(),
            };
            state.metrics.cache_hits.get_or_create(&tier_label).inc();
            count_success(&state, &model);
            let response = render_events(meta, shape, stream, generate::replay(&generation)).await;
            return with_header(response, CACHE_HEADER, tier.label());
        }
        state.metrics.cache_misses.get_or_create(&label).inc();
    }
    let mut leader = None;
    if let Some(key) = key.filter(|_| model.cache_policy.coalescing.enabled) {
        match model.coalescer.join(key) {
            Joined::Follower(subscription) => {
                state.metrics.coalesced.get_or_create(&label).inc();
                count_success(&state, &model);
                let events = reuse::subscription_stream(subscription);
                let response = render_events(meta, shape, stream, events).await;
                return with_header(response, COALESCED_HEADER, "true");
            }
            Joined::Leader(publisher, subscription) => leader = Some((publisher, subscription)),
        }
    }
    // Only a leader asks the semantic cache: followers share its answer.
    let (events, tier) = match semantic_or_engine(&state, &model, &job, &label, key).await {
        Ok(found) => found,
        Err(e) => {
            // Requests that joined meanwhile get the same answer.
            if let Some((publisher, _)) = leader {
                publisher.send(GenEvent::error(&e));
            }
            return e.into_response();
        }
    };
    let events = match leader {
        Some((publisher, subscription)) => {
            reuse::pump(events, publisher);
            reuse::subscription_stream(subscription)
        }
        None => events,
    };
    let response = render_events(meta, shape, stream, events).await;
    match tier {
        Some(tier) => with_header(response, CACHE_HEADER, tier),
        None => response,
    }
}

/// A semantic hit's replay, else a fresh generation that fills the caches;
/// with the `x-weir-cache` value to answer with, if any.
async fn semantic_or_engine(
    state: &AppState,
    model: &Arc<ServedModel>,
    job: &Job,
    label: &ModelLabel,
    key: Option<crate::cache::CacheKey>,
) -> Result<(GenStream, Option<&'static str>), ApiError> {
    let mut semantic = None;
    match crate::semantic::probe(&state.metrics, |name| state.encoder(name), model, job).await {
        Some(Probe::Hit(hit)) => {
            if let Ok(generation) = serde_json::from_slice::<Generation>(&hit.answer) {
                let tier_label = TierLabel {
                    model_name: model.name.clone(),
                    tier: "semantic".into(),
                };
                state.metrics.cache_hits.get_or_create(&tier_label).inc();
                count_success(state, model);
                return Ok((generate::replay(&generation), Some("semantic")));
            }
        }
        Some(Probe::Miss(fill)) => semantic = Some(fill),
        None => {}
    }
    let events = start(state, model, job, label)?;
    let sinks = reuse::Sinks {
        exact: key.zip(model.cache.clone()).map(|(k, c)| (c, k)),
        semantic,
    };
    let tier = (key.is_some() && model.cache.is_some()).then_some("miss");
    Ok((reuse::fill_cache(events, sinks), tier))
}

/// Counts a request answered without the engine (cache hit, coalesced).
fn count_success(state: &AppState, model: &ServedModel) {
    let label = OutcomeLabel {
        model_name: model.name.clone(),
        outcome: "success".into(),
    };
    state.metrics.requests.get_or_create(&label).inc();
}

/// Header saying which cache tier answered (`l1`, `l2`, `semantic`, or
/// `miss`).
pub const CACHE_HEADER: &str = "x-weir-cache";
/// Header marking an answer shared with an identical request in flight.
pub const COALESCED_HEADER: &str = "x-weir-coalesced";

fn with_header(mut response: Response, name: &'static str, value: &'static str) -> Response {
    response
        .headers_mut()
        .insert(name, axum::http::HeaderValue::from_static(value));
    response
}

/// Breaker, admission and the engine: the events of a fresh generation.
fn start(
    state: &AppState,
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
            state.metrics.rejected.get_or_create(label).inc();
            ApiError::Overloaded {
                message: format!(
                    "model `{}` has too many requests queued; retry shortly",
                    model.name
                ),
                retry_after,
            }
        })?;
    let events = generate::run(&model.engine, model.tokenizer.clone(), job)?;
    Ok(instrument(events, &state.metrics, model.clone(), permits))
}

/// Renders events as SSE or as one JSON body.
async fn render_events(
    meta: ResponseMeta,
    shape: Shape,
    stream: bool,
    events: GenStream,
) -> Response {
    if stream {
        let body = render::sse(meta, shape, events);
        return Sse::new(body)
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    match generate::collect(events).await {
        Ok(generation) => match shape {
            Shape::Chat => Json(render::chat_body(&meta, &generation)).into_response(),
            Shape::Completion => Json(render::completion_body(&meta, &generation)).into_response(),
        },
        Err((status, body)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (status, Json(body)).into_response();
            if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE
            {
                response.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("1"),
                );
            }
            response
        }
    }
}

struct Watch {
    events: GenStream,
    metrics: Metrics,
    model: Arc<ServedModel>,
    _permits: Vec<Permit>,
    start: Instant,
    last_token: Option<Instant>,
    deadline: Option<Instant>,
    done: bool,
}

impl Watch {
    fn finish(&mut self, outcome: &str, engine_ok: bool) {
        self.done = true;
        let label = ModelLabel {
            model_name: self.model.name.clone(),
        };
        self.metrics
            .e2e
            .get_or_create(&label)
            .observe(self.start.elapsed().as_secs_f64());
        self.metrics
            .requests
            .get_or_create(&OutcomeLabel {
                model_name: self.model.name.clone(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.model.breaker.record(engine_ok, Instant::now());
    }

    fn observe(&mut self, event: &GenEvent) {
        let label = ModelLabel {
            model_name: self.model.name.clone(),
        };
        match event {
            GenEvent::Delta { .. } => {
                let now = Instant::now();
                match self.last_token {
                    None => {
                        let ttft = now - self.start;
                        self.metrics
                            .ttft
                            .get_or_create(&label)
                            .observe(ttft.as_secs_f64());
                        self.metrics
                            .queue_time
                            .get_or_create(&label)
                            .observe(ttft.as_secs_f64());
                        self.deadline = None;
                    }
                    Some(prev) => self
                        .metrics
                        .inter_token
                        .get_or_create(&label)
                        .observe((now - prev).as_secs_f64()),
                }
                self.last_token = Some(now);
            }
            GenEvent::Done { .. } => self.finish("success", true),
            GenEvent::Error { body, .. } => {
                let kind = body["error"]["type"]
                    .as_str()
                    .unwrap_or("internal_error")
                    .to_owned();
                let engine_ok = kind != "internal_error";
                self.finish(&kind, engine_ok);
            }
            GenEvent::ChoiceDone { .. } => {}
        }
    }
}

/// Observes latencies and outcome, enforces the queue timeout (no first
/// token within the BatchPolicy's limit → a 429 error event), and keeps the
/// admission permits alive as long as the stream.
fn instrument(
    events: GenStream,
    metrics: &Metrics,
    model: Arc<ServedModel>,
    permits: Vec<Permit>,
) -> GenStream {
    let timeout = model.admission.queue_timeout();
    let start = Instant::now();
    let watch = Watch {
        events,
        metrics: metrics.clone(),
        model,
        _permits: permits,
        start,
        last_token: None,
        deadline: Some(start + timeout),
        done: false,
    };
    Box::pin(stream::unfold(watch, |mut w| async move {
        if w.done {
            return None;
        }
        let next = match w.deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), w.events.next()).await
            {
                Ok(next) => next,
                Err(_) => {
                    let err = ApiError::Overloaded {
                        message: format!(
                            "no capacity within the queue timeout of {:?}",
                            timeout_of(&w)
                        ),
                        retry_after: Duration::from_secs(1),
                    };
                    Some(GenEvent::error(&err))
                }
            },
            None => w.events.next().await,
        };
        let event = next?;
        w.observe(&event);
        Some((event, w))
    }))
}

fn timeout_of(w: &Watch) -> Duration {
    w.model.admission.queue_timeout()
}
