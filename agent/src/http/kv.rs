//! `GET /v1/weir/kv?model=M[&epoch=E&since=S]`: what this agent's engine
//! for `M` holds in its prefix cache, as a delta since sequence number `S`
//! of epoch `E` or as a snapshot, with its load
//! ([`crate::route::summary`]).
//!
//! `GET /v1/weir/tokenizer?model=M`: the tokenizer of `M` as this agent
//! serves it, for peers that route `M`'s requests without serving it
//! ([`crate::route::tokenizers`]).

use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::api::ApiError;
use crate::route::summary::KvReport;
use crate::route::tokenizers::TokenizerAnswer;

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

/// The tokenizer query.
#[derive(serde::Deserialize)]
pub(super) struct TokenizerQuery {
    model: String,
}

/// The handler: 404 in OpenAI's shape for a model not served here.
pub(super) async fn tokenizer(
    State(state): State<AppState>,
    query: Result<Query<TokenizerQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return ApiError::invalid("model", "expected ?model=NAME").into_response();
    };
    let model = state
        .models
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&q.model);
    let Some(model) = model else {
        return ApiError::ModelNotFound(q.model).into_response();
    };
    // Serializing a large vocabulary takes milliseconds: off the runtime.
    let tokenizer = model.tokenizer.clone();
    let portable = tokio::task::spawn_blocking(move || tokenizer.to_portable()).await;
    match portable {
        Ok(Ok(tokenizer)) => Json(TokenizerAnswer {
            model: model.name.clone(),
            tokenizer,
        })
        .into_response(),
        Ok(Err(e)) => ApiError::Internal(e.to_string()).into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}
