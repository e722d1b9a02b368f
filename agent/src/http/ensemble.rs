//! Serving a request for an ensemble: members in the order the strategy
//! gives, the body's `model` rewritten for each, and the next member tried
//! after a connection failure, a timeout or a 5xx/429 answer (before any of
//! the answer has been passed on). Each attempt is measured per member, for
//! the operator's reweighting.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use prometheus_client::encoding::EncodeLabelSet;

use super::{AppState, Kind, serve_model};
use crate::api::ApiError;
use crate::route::ensemble::{Ensemble, Member, Target};

/// Header naming the member that answered.
pub const MEMBER_HEADER: &str = "x-weir-ensemble-member";

/// Labels of per-member figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabel {
    /// Ensemble name.
    pub ensemble: String,
    /// Member name.
    pub member: String,
    /// `success` or `error`.
    pub outcome: String,
}

fn with_model(body: &Bytes, model: &str) -> Result<Bytes, ApiError> {
    let mut value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ApiError::InvalidRequest {
            message: e.to_string(),
            param: None,
        })?;
    value["model"] = serde_json::Value::String(model.to_owned());
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

fn retryable(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

async fn external(
    state: &AppState,
    url: &str,
    api_key: Option<&str>,
    timeout: Duration,
    kind: Kind,
    body: Bytes,
) -> Result<Response, String> {
    let path = kind.path().trim_start_matches("/v1");
    let mut request = state
        .http
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .timeout(timeout)
        .body(body);
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let answer = request.send().await.map_err(|e| e.to_string())?;
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = answer.headers().get("content-type").cloned();
    let stream = answer.bytes_stream().map_err(std::io::Error::other);
    let mut response = (status, Body::from_stream(stream)).into_response();
    if let Some(ct) = content_type.and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
        response.headers_mut().insert("content-type", ct);
    }
    Ok(response)
}

async fn attempt(
    state: &AppState,
    member: &Member,
    headers: &HeaderMap,
    body: &Bytes,
    kind: Kind,
) -> Result<Response, String> {
    match &member.target {
        Target::Model(model) => {
            let body = with_model(body, model).map_err(|e| e.to_string())?;
            Ok(serve_model(state.clone(), headers.clone(), body, kind).await)
        }
        Target::External {
            url,
            model,
            api_key,
            timeout,
        } => {
            let body = with_model(body, model).map_err(|e| e.to_string())?;
            external(state, url, api_key.as_deref(), *timeout, kind, body).await
        }
    }
}

/// Serves `body` through `ensemble`.
pub async fn serve(
    state: AppState,
    ensemble: Ensemble,
    headers: HeaderMap,
    body: Bytes,
    kind: Kind,
) -> Response {
    let u: f64 = rand_unit();
    let metrics = state.metrics.clone();
    let latency = |m: &Member| metrics.member_latency(&ensemble.name, &m.name);
    let load = |m: &Member| match &m.target {
        Target::Model(name) => state.load_of(name),
        Target::External { .. } => 0.0,
    };
    let order = ensemble.order(u, latency, load);
    let mut last = ApiError::Unavailable {
        message: format!("no member of ensemble `{}` is available", ensemble.name),
        retry_after: Duration::from_secs(1),
    };
    for (n, i) in order.iter().enumerate() {
        let member = &ensemble.members[*i];
        let started = Instant::now();
        let result = attempt(&state, member, &headers, &body, kind).await;
        let ok = matches!(&result, Ok(r) if !retryable(r.status()));
        state
            .metrics
            .record_member(&ensemble.name, &member.name, ok, started.elapsed());
        match result {
            Ok(mut response) if ok || n + 1 == order.len() => {
                if let Ok(v) = HeaderValue::from_str(&member.name) {
                    response.headers_mut().insert(MEMBER_HEADER, v);
                }
                return response;
            }
            Ok(response) => {
                tracing::warn!(ensemble = %ensemble.name, member = %member.name, status = %response.status(), "member failed; trying the next");
                last = ApiError::Unavailable {
                    message: format!("member `{}` answered {}", member.name, response.status()),
                    retry_after: Duration::from_secs(1),
                };
            }
            Err(e) => {
                tracing::warn!(ensemble = %ensemble.name, member = %member.name, error = %e, "member failed; trying the next");
                last = ApiError::Unavailable {
                    message: format!("member `{}` failed: {e}", member.name),
                    retry_after: Duration::from_secs(1),
                };
            }
        }
    }
    last.into_response()
}

/// A uniform draw in [0, 1) from the standard library's randomly seeded
/// hasher (no RNG crate needed for one choice per request).
fn rand_unit() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    (RandomState::new().hash_one(Instant::now()) >> 11) as f64 / (1u64 << 53) as f64
}
