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

use crate::admission::Permit;
use crate::api::ApiError;
use crate::generate::{self, GenEvent, GenStream, Job};
use crate::metrics::{Metrics, ModelLabel, OutcomeLabel};
use crate::models::ServedModel;
use crate::render::{self, ResponseMeta, Shape};
use crate::server::AppState;

/// Runs `job` on `model` and answers as JSON or SSE.
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
    if let Err(wait) = model.breaker.allow(Instant::now()) {
        return ApiError::Unavailable {
            message: format!(
                "model `{}` is failing; the circuit breaker is open",
                model.name
            ),
            retry_after: wait,
        }
        .into_response();
    }
    let cost = job.prompts.len() * job.n;
    let permits = match model.admission.try_admit(job.template.priority, cost) {
        Ok(p) => p,
        Err(retry_after) => {
            state.metrics.rejected.get_or_create(&label).inc();
            return ApiError::Overloaded {
                message: format!(
                    "model `{}` has too many requests queued; retry shortly",
                    model.name
                ),
                retry_after,
            }
            .into_response();
        }
    };
    let events = match generate::run(&model.engine, model.tokenizer.clone(), &job) {
        Ok(events) => events,
        Err(e) => return e.into_response(),
    };
    let events = instrument(events, &state.metrics, model.clone(), permits);
    if stream {
        let body = render::sse(meta, shape, events);
        return Sse::new(body)
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    match render::collect(events).await {
        Ok(generation) => match shape {
            Shape::Chat => Json(render::chat_body(&meta, &generation)).into_response(),
            Shape::Completion => Json(render::completion_body(&meta, &generation)).into_response(),
        },
        Err((status, body)) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Json(body),
        )
            .into_response(),
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
