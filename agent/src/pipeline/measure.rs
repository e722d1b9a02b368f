//! Measurements on the way out of the engine: time to first token,
//! inter-token latency, end-to-end latency and outcome, the queue timeout
//! (no first token in time: a 429 error event), and the circuit breaker's
//! record. Admission permits live as long as the stream, so a client that
//! goes away frees its place and its KV blocks at once. The stream counts
//! as in flight for the model's drain, and ends with a 503 error event if
//! the drain times out before it finishes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};

use crate::admission::Permit;
use crate::api::ApiError;
use crate::generate::{GenEvent, GenStream};
use crate::metrics::{Metrics, ModelLabel, OutcomeLabel};
use crate::models::ServedModel;
use crate::models::drain::InFlight;

struct Watch {
    events: GenStream,
    _in_flight: InFlight,
    aborted: tokio::sync::watch::Receiver<bool>,
    metrics: Metrics,
    model: Arc<ServedModel>,
    _permits: Vec<Permit>,
    start: Instant,
    last_token: Option<Instant>,
    ttft: Option<std::time::Duration>,
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
        let now = Instant::now();
        self.model.breaker.record(engine_ok, now);
        self.model
            .recent
            .record(now, outcome == "success", now - self.start, self.ttft);
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
                        self.ttft = Some(ttft);
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
            // The engine has started on it: no longer queued.
            GenEvent::PromptLogprobs { .. } => self.deadline = None,
            GenEvent::ChoiceDone { .. } => {}
        }
    }
}

/// Observes latencies and outcome, enforces the queue timeout (no first
/// token within the BatchPolicy's limit → a 429 error event), and keeps the
/// admission permits alive as long as the stream.
pub fn instrument(
    events: GenStream,
    metrics: &Metrics,
    model: Arc<ServedModel>,
    permits: Vec<Permit>,
) -> GenStream {
    let timeout = model.admission.queue_timeout();
    let start = Instant::now();
    let watch = Watch {
        events,
        _in_flight: model.drain.enter(),
        aborted: model.drain.aborted(),
        metrics: metrics.clone(),
        model,
        _permits: permits,
        start,
        last_token: None,
        ttft: None,
        deadline: Some(start + timeout),
        done: false,
    };
    Box::pin(stream::unfold(watch, |mut w| async move {
        if w.done {
            return None;
        }
        let next = tokio::select! {
            biased;
            next = next_event(&mut w.events, w.deadline, &w.model) => next,
            _ = w.aborted.wait_for(|aborted| *aborted) => {
                let err = ApiError::Unavailable {
                    message: format!(
                        "model `{}` was taken out of service on this agent before the answer \
                         finished; retry",
                        w.model.name
                    ),
                    retry_after: Duration::from_secs(1),
                };
                Some(GenEvent::error(&err))
            }
        };
        let event = next?;
        w.observe(&event);
        Some((event, w))
    }))
}

/// The next event, or a 429 error event when no first token came before
/// `deadline`.
async fn next_event(
    events: &mut GenStream,
    deadline: Option<Instant>,
    model: &ServedModel,
) -> Option<GenEvent> {
    let Some(deadline) = deadline else {
        return events.next().await;
    };
    match tokio::time::timeout_at(deadline.into(), events.next()).await {
        Ok(next) => next,
        Err(_) => {
            let err = ApiError::Overloaded {
                message: format!(
                    "no capacity within the queue timeout of {:?}",
                    model.admission.queue_timeout()
                ),
                retry_after: Duration::from_secs(1),
            };
            Some(GenEvent::error(&err))
        }
    }
}
