//! `POST /v1/chat/completions` and `POST /v1/completions`: the body and
//! headers handed to the request pipeline ([`crate::pipeline::generate`]),
//! its outcome rendered ([`super::respond`]).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::extract::OpenAiBytes;
use super::respond::render;
use crate::api::Kind;
use crate::pipeline::{self, Incoming};

pub(super) async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    OpenAiBytes(body): OpenAiBytes,
) -> Response {
    entry(state, headers, body, Kind::Chat).await
}

pub(super) async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    OpenAiBytes(body): OpenAiBytes,
) -> Response {
    entry(state, headers, body, Kind::Completion).await
}

/// Answers a generation request of route `kind` (also the chat answer
/// behind `/v1/responses`).
pub(super) async fn entry(
    state: AppState,
    headers: HeaderMap,
    body: Bytes,
    kind: Kind,
) -> Response {
    let incoming = Incoming {
        kind,
        body,
        headers,
        for_member: false,
    };
    match pipeline::generate(&state.pipeline(), incoming).await {
        Ok(outcome) => render(kind, outcome).await,
        Err(e) => e.into_response(),
    }
}
