//! `POST /v1/embeddings`: a local encoder ([`crate::models::ServedEncoder`])
//! answers; an encoder another agent holds is forwarded to, as for any
//! served model.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::json;

use super::AppState;
use super::extract::OpenAiBytes;
use crate::api::ApiError;
use crate::api::extract::parse;
use crate::api::types::EmbeddingRequest;
use crate::metrics::{ModelLabel, OutcomeLabel};

/// The handler: a local encoder answers; another agent's is forwarded to.
pub async fn embeddings(
    State(state): State<AppState>,
    headers: HeaderMap,
    OpenAiBytes(body): OpenAiBytes,
) -> Response {
    match embed(&state, &headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn embed(state: &AppState, headers: &HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let request: EmbeddingRequest = parse(&body)?;
    let Some(encoder) = state.encoder(&request.model) else {
        if state.is_local(&request.model) {
            return Err(ApiError::invalid(
                "model",
                format!(
                    "`{}` generates text; it does not serve embeddings",
                    request.model
                ),
            ));
        }
        return Ok(state
            .forward(&request.model, "/v1/embeddings", headers, body, "")
            .await);
    };
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("`{other}` is not one of float, base64"),
            ));
        }
    };
    let dim = encoder.embedder.dim();
    if let Some(d) = request.dimensions
        && d != dim as i64
    {
        return Err(ApiError::invalid(
            "dimensions",
            format!(
                "model `{}` gives {dim}-dimensional vectors only, got {d}",
                encoder.name
            ),
        ));
    }
    let inputs = encoder.inputs(request.input)?;
    let outcome = |o: &str| OutcomeLabel {
        model_name: encoder.name.clone(),
        outcome: o.to_owned(),
    };
    let embeddings = match encoder.embed_ids(inputs).await {
        Ok(e) => e,
        Err(e) => {
            state
                .metrics
                .requests
                .get_or_create(&outcome(e.error_type()))
                .inc();
            return Err(e);
        }
    };
    let tokens: usize = embeddings.iter().map(|e| e.tokens).sum();
    let label = ModelLabel {
        model_name: encoder.name.clone(),
    };
    state
        .metrics
        .embedding_tokens
        .get_or_create(&label)
        .inc_by(tokens as u64);
    state
        .metrics
        .requests
        .get_or_create(&outcome("success"))
        .inc();
    let data: Vec<_> = embeddings
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = e.vector.iter().flat_map(|v| v.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(e.vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}
