//! `/ready` and `/metrics` (and `/health`, answered by the router).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::api::ApiError;

/// Ready once the agent takes traffic, knows where models are served, and
/// serves a model (or runs in cluster mode).
pub(super) async fn ready(State(state): State<AppState>) -> Response {
    let has_models = state
        .models
        .read()
        .map(|m| m.iter().next().is_some())
        .unwrap_or(false);
    let routing = state.synced.load(Ordering::Acquire);
    if state.ready.load(Ordering::Acquire) && routing && (has_models || state.cluster) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// The metrics in OpenMetrics text.
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics.encode() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => ApiError::Internal(format!("encoding metrics: {e}")).into_response(),
    }
}
