//! `GET /v1/weir/kv?model=M[&epoch=E&since=S]`: what this agent's engine
//! for `M` holds in its prefix cache, as a delta since sequence number `S`
//! of epoch `E` or as a snapshot, with its load
//! ([`crate::route::summary`]).

use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::api::ApiError;
use crate::route::summary::KvReport;

/// The query.
#[derive(serde::Deserialize)]
pub(super) struct KvQuery {
    model: String,
    epoch: Option<u64>,
    since: Option<u64>,
}

/// The handler: 404 in OpenAI's shape for a model not served here.
pub(super) async fn kv_summary(
    State(state): State<AppState>,
    query: Result<Query<KvQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return ApiError::invalid("model", "expected ?model=NAME[&epoch=N&since=N]")
            .into_response();
    };
    let model = state
        .models
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&q.model);
    match model {
        Some(m) => Json(KvReport::of(&m.name, m.engine.stats(), q.epoch, q.since)).into_response(),
        None => ApiError::ModelNotFound(q.model).into_response(),
    }
}
