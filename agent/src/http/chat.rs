//! `POST /v1/chat/completions` and `POST /v1/completions`: resolve the
//! target (an ensemble, a model served here, or one a peer serves), validate
//! into a job ([`crate::pipeline::validate`]), and answer through the
//! request pipeline ([`super::respond`]).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::extract::OpenAiBytes;
use super::render::Shape;
use super::respond::respond;
use crate::api::ApiError;
use crate::api::extract::parse;
use crate::api::types::{ChatCompletionRequest, CompletionRequest, MessageContent, Prompt};
use crate::pipeline::validate::{self, Prepared, PriorityHeader};

/// The `x-weir-priority` header, read for validation.
fn priority_header(headers: &HeaderMap) -> PriorityHeader<'_> {
    headers.get("x-weir-priority").map(|v| {
        v.to_str()
            .map_err(|_| ApiError::invalid("x-weir-priority", "the header is not ASCII"))
    })
}

/// Which OpenAI route a body belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

impl Kind {
    /// The route's path.
    pub fn path(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Completion => "/v1/completions",
        }
    }
}

#[derive(serde::Deserialize)]
struct ModelOnly {
    model: String,
}

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

/// Ensembles first, then models served here or by peers.
async fn entry(state: AppState, headers: HeaderMap, body: Bytes, kind: Kind) -> Response {
    if let Ok(ModelOnly { model }) = serde_json::from_slice::<ModelOnly>(&body)
        && let Some(ensemble) = state.ensembles.get(&model)
    {
        return super::ensemble::serve(state, ensemble, headers, body, kind).await;
    }
    serve_model(state, headers, body, kind).await
}

/// Serves a body naming a model (not an ensemble): here if the model is
/// local, else by forwarding to a peer.
pub async fn serve_model(state: AppState, headers: HeaderMap, body: Bytes, kind: Kind) -> Response {
    match kind {
        Kind::Chat => serve_chat(state, headers, body).await,
        Kind::Completion => serve_completion(state, headers, body).await,
    }
}

async fn serve_chat(state: AppState, headers: HeaderMap, body: Bytes) -> Response {
    let request: ChatCompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if !state.is_local(&request.model) {
        let prefix = request.messages.iter().find_map(|m| match &m.content {
            Some(MessageContent::Text(t)) => Some(t.clone()),
            _ => None,
        });
        let prefix = prefix.unwrap_or_default();
        return state
            .forward(&request.model, Kind::Chat.path(), &headers, body, &prefix)
            .await;
    }
    let prepared = state
        .model(&request.model)
        .and_then(|model| validate::chat_job(model, priority_header(&headers), &request));
    answer(state, prepared, Shape::Chat).await
}

async fn serve_completion(state: AppState, headers: HeaderMap, body: Bytes) -> Response {
    let request: CompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if !state.is_local(&request.model) {
        let prefix = match &request.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Texts(ts) => ts.first().cloned().unwrap_or_default(),
            Prompt::Tokens(ids) => format!("{:?}", &ids[..ids.len().min(64)]),
            Prompt::TokenLists(l) => {
                format!("{:?}", l.first().map(|ids| &ids[..ids.len().min(64)]))
            }
        };
        return state
            .forward(
                &request.model,
                Kind::Completion.path(),
                &headers,
                body,
                &prefix,
            )
            .await;
    }
    let prepared = state
        .model(&request.model)
        .and_then(|model| validate::completion_job(model, priority_header(&headers), &request));
    answer(state, prepared, Shape::Completion).await
}

/// A validated request answered through the pipeline; a refused one as its
/// error.
async fn answer(state: AppState, prepared: Result<Prepared, ApiError>, shape: Shape) -> Response {
    match prepared {
        Ok((model, job, meta, stream)) => respond(state, model, job, meta, shape, stream).await,
        Err(e) => e.into_response(),
    }
}
