//! The ensemble step: members in the order the strategy gives, the body's
//! `model` rewritten for each, and the next member tried after a
//! connection failure, a timeout or a 5xx/429 answer (before any of the
//! answer has been passed on). A model member goes through the rest of the
//! pipeline ([`super::generate`]); an external one is posted to its
//! endpoint. Each attempt is measured per member, for the operator's
//! reweighting.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Context, Incoming, Outcome, Reply};
use crate::api::ApiError;
use crate::route::ensemble::{Ensemble, Member, Target};
use crate::route::forward;

/// Header naming the member that answered.
pub const MEMBER_HEADER: &str = "x-weir-ensemble-member";

/// Serves `incoming` through `ensemble`.
pub async fn serve(
    ctx: &Context<'_>,
    ensemble: &Ensemble,
    incoming: &Incoming,
) -> Result<Outcome, ApiError> {
    let latency = |m: &Member| ctx.metrics.member_latency(&ensemble.name, &m.name);
    let load = |m: &Member| match &m.target {
        Target::Model(name) => ctx.load_of(name),
        Target::External { .. } => 0.0,
    };
    let order = ensemble.order(rand_unit(), latency, load);
    let mut last = ApiError::Unavailable {
        message: format!("no member of ensemble `{}` is available", ensemble.name),
        retry_after: Duration::from_secs(1),
    };
    for (n, i) in order.iter().enumerate() {
        let member = &ensemble.members[*i];
        let started = Instant::now();
        let result = attempt(ctx, member, incoming).await;
        let ok = match &result {
            Ok(outcome) => !retryable(outcome.status()),
            Err(Failure::Refused(e)) => !retryable(e.status().as_u16()),
            Err(Failure::Unreachable(_)) => false,
        };
        ctx.metrics
            .record_member(&ensemble.name, &member.name, ok, started.elapsed());
        let last_one = n + 1 == order.len();
        match result {
            Ok(mut outcome) if ok || last_one => {
                outcome.headers.push((MEMBER_HEADER, member.name.clone()));
                return Ok(outcome);
            }
            // A request the member refuses as invalid, every member would.
            Err(Failure::Refused(e)) if ok || last_one => return Err(e),
            Ok(outcome) => {
                tracing::warn!(ensemble = %ensemble.name, member = %member.name, status = outcome.status(), "member failed; trying the next");
                last = unavailable(format!(
                    "member `{}` answered {}",
                    member.name,
                    outcome.status()
                ));
            }
            Err(Failure::Refused(e)) => {
                tracing::warn!(ensemble = %ensemble.name, member = %member.name, error = %e, "member failed; trying the next");
                last = unavailable(format!(
                    "member `{}` answered {}",
                    member.name,
                    e.status().as_u16()
                ));
            }
            Err(Failure::Unreachable(e)) => {
                tracing::warn!(ensemble = %ensemble.name, member = %member.name, error = %e, "member failed; trying the next");
                last = unavailable(format!("member `{}` failed: {e}", member.name));
            }
        }
    }
    Err(last)
}

/// Why one member gave no answer to pass on.
enum Failure {
    /// The pipeline refused the request for this member.
    Refused(ApiError),
    /// The member could not be asked (bad body, connection, timeout).
    Unreachable(String),
}

async fn attempt(
    ctx: &Context<'_>,
    member: &Member,
    incoming: &Incoming,
) -> Result<Outcome, Failure> {
    match &member.target {
        Target::Model(model) => {
            let body = with_model(&incoming.body, model).map_err(Failure::Unreachable)?;
            let for_member = Incoming {
                kind: incoming.kind,
                body,
                headers: incoming.headers.clone(),
                for_member: true,
            };
            // Boxed: the pipeline calls this step, and this step the pipeline.
            Box::pin(super::generate(ctx, for_member))
                .await
                .map_err(Failure::Refused)
        }
        Target::External {
            url,
            model,
            api_key,
            timeout,
        } => {
            let body = with_model(&incoming.body, model).map_err(Failure::Unreachable)?;
            let path = incoming.kind.path().trim_start_matches("/v1");
            let relayed =
                forward::to_external(ctx.http, url, api_key.as_deref(), *timeout, path, body)
                    .await
                    .map_err(Failure::Unreachable)?;
            Ok(Outcome {
                reply: Reply::Relayed(relayed),
                headers: Vec::new(),
            })
        }
    }
}

fn with_model(body: &Bytes, model: &str) -> Result<Bytes, String> {
    let mut value: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    value["model"] = serde_json::Value::String(model.to_owned());
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

fn retryable(status: u16) -> bool {
    (500..600).contains(&status) || status == 429
}

fn unavailable(message: String) -> ApiError {
    ApiError::Unavailable {
        message,
        retry_after: Duration::from_secs(1),
    }
}

/// A uniform draw in [0, 1) from the standard library's randomly seeded
/// hasher (no RNG crate needed for one choice per request).
fn rand_unit() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    (RandomState::new().hash_one(Instant::now()) >> 11) as f64 / (1u64 << 53) as f64
}
