//! `POST /tokenize` and `POST /detokenize` as vLLM has them: a prompt (or
//! chat messages through the model's chat template) into token ids with
//! the count and the context length, and token ids back into text. A model
//! only a peer serves is passed on to that peer; an ensemble is refused,
//! since its members may tokenize differently.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::extract::OpenAiBytes;
use crate::api::ApiError;
use crate::api::extract::parse;
use crate::api::tokenize::{
    DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse,
};
use crate::api::types::ChatCompletionRequest;
use crate::models::ServedModel;
use crate::pipeline::validate::chat_prompt_ids;
use crate::route::forward;

/// Where a tokenizer request goes.
enum Holder {
    /// A model served here.
    Local(Arc<ServedModel>),
    /// A model a peer serves: the request is passed on as it came.
    Peer(String),
}

/// The model `name` names (or the only one served here when absent).
fn holder(state: &AppState, name: Option<&str>, headers: &HeaderMap) -> Result<Holder, ApiError> {
    let name = match name {
        Some(name) => name.to_owned(),
        None => {
            let models = state.models.read().unwrap_or_else(|p| p.into_inner());
            let mut names = models.iter().map(|m| m.name.clone());
            match (names.next(), names.next()) {
                (Some(only), None) => only,
                _ => {
                    return Err(ApiError::invalid(
                        "model",
                        "name the model (this agent serves more than one, or none)",
                    ));
                }
            }
        }
    };
    if state.ensembles.get(&name).is_some() {
        return Err(ApiError::invalid(
            "model",
            format!(
                "`{name}` is an ensemble, whose members may tokenize differently; name a member model"
            ),
        ));
    }
    if !state.is_local(&name) {
        if !forward::was_forwarded(headers) && !state.peers.serving(&name).is_empty() {
            return Ok(Holder::Peer(name));
        }
        return Err(ApiError::ModelNotFound(name));
    }
    state.pipeline().model(&name).map(Holder::Local)
}

/// `POST /tokenize`.
pub(super) async fn tokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    OpenAiBytes(body): OpenAiBytes,
) -> Response {
    let request: TokenizeRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match holder(&state, request.model.as_deref(), &headers) {
        Ok(Holder::Local(model)) => match tokens_of(&model, &request) {
            Ok(answer) => Json(answer).into_response(),
            Err(e) => e.into_response(),
        },
        Ok(Holder::Peer(name)) => pass_on(&state, &name, "/tokenize", &headers, body).await,
        Err(e) => e.into_response(),
    }
}

fn tokens_of(model: &ServedModel, request: &TokenizeRequest) -> Result<TokenizeResponse, ApiError> {
    let tokens = match (&request.prompt, &request.messages) {
        (Some(prompt), None) => model
            .tokenizer
            .encode(prompt, request.add_special_tokens.unwrap_or(true))
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))?,
        (None, Some(messages)) => {
            // The messages are read exactly as chat completions reads them.
            let chat = json!({"model": model.name, "messages": messages, "tools": request.tools});
            let chat: ChatCompletionRequest = parse(chat.to_string().as_bytes())?;
            chat_prompt_ids(
                model,
                &chat,
                request.add_generation_prompt.unwrap_or(true),
                request.add_special_tokens.unwrap_or(false),
            )?
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give either `prompt` or `messages`",
            ));
        }
    };
    let token_strs = request.return_token_strs.unwrap_or(false).then(|| {
        tokens
            .iter()
            .map(|&id| model.tokenizer.decode(&[id], false).unwrap_or_default())
            .collect()
    });
    Ok(TokenizeResponse {
        count: tokens.len(),
        max_model_len: model.max_model_len,
        tokens,
        token_strs,
    })
}

/// `POST /detokenize`.
pub(super) async fn detokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    OpenAiBytes(body): OpenAiBytes,
) -> Response {
    let request: DetokenizeRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match holder(&state, request.model.as_deref(), &headers) {
        Ok(Holder::Local(model)) => match text_of(&model, &request.tokens) {
            Ok(prompt) => Json(DetokenizeResponse { prompt }).into_response(),
            Err(e) => e.into_response(),
        },
        Ok(Holder::Peer(name)) => pass_on(&state, &name, "/detokenize", &headers, body).await,
        Err(e) => e.into_response(),
    }
}

fn text_of(model: &ServedModel, tokens: &[u32]) -> Result<String, ApiError> {
    let vocab = model.tokenizer.vocab_size() as u32;
    if let Some((i, bad)) = tokens.iter().enumerate().find(|(_, id)| **id >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("tokens[{i}] = {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    model
        .tokenizer
        .decode(tokens, false)
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))
}

async fn pass_on(
    state: &AppState,
    model: &str,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    state.forward(model, path, headers, body, "").await
}
