//! Step 1, resolving the target: the body's `model` names an ensemble, a
//! model served here, or a model a peer serves. Ensembles are looked up
//! by name before the body is parsed in full, so that a body meant for an
//! external member passes on as the client wrote it. A model being taken
//! out of service here ([`crate::models::drain`]) goes to a peer that
//! serves it, or is refused as retryable (503 with `Retry-After`).

use std::sync::Arc;

use super::{Context, Incoming};
use crate::api::extract::parse;
use crate::api::types::{ChatCompletionRequest, CompletionRequest, MessageContent, Prompt};
use crate::api::{ApiError, Kind};
use crate::models::ServedModel;
use crate::route::ensemble::Ensemble;

/// Where a generation request goes.
pub enum Target {
    /// An ensemble: its members are tried in the strategy's order.
    Ensemble(Ensemble),
    /// A model served here.
    Local(Arc<ServedModel>, GenerationRequest),
    /// A model only peers serve (or nobody: forwarding says so).
    Peer(GenerationRequest),
}

/// A generation request, parsed.
pub enum GenerationRequest {
    /// A chat completion.
    Chat(ChatCompletionRequest),
    /// A text completion.
    Completion(CompletionRequest),
}

impl GenerationRequest {
    /// Parses `body` as the route `kind` expects, with OpenAI's errors.
    pub fn parse(kind: Kind, body: &[u8]) -> Result<Self, ApiError> {
        Ok(match kind {
            Kind::Chat => Self::Chat(parse(body)?),
            Kind::Completion => Self::Completion(parse(body)?),
        })
    }

    /// The model it names.
    pub fn model(&self) -> &str {
        match self {
            Self::Chat(r) => &r.model,
            Self::Completion(r) => &r.model,
        }
    }

    /// Whether the client asked for SSE.
    pub fn stream(&self) -> bool {
        match self {
            Self::Chat(r) => r.sampling.stream,
            Self::Completion(r) => r.sampling.stream,
        }
        .unwrap_or(false)
    }

    /// The text a peer replica is chosen by: the first message or prompt,
    /// so that requests sharing a prefix meet its cached KV blocks.
    pub fn routing_prefix(&self) -> String {
        match self {
            Self::Chat(r) => r
                .messages
                .iter()
                .find_map(|m| match &m.content {
                    Some(MessageContent::Text(t)) => Some(t.clone()),
                    _ => None,
                })
                .unwrap_or_default(),
            Self::Completion(r) => match &r.prompt {
                Prompt::Text(t) => t.clone(),
                Prompt::Texts(ts) => ts.first().cloned().unwrap_or_default(),
                Prompt::Tokens(ids) => format!("{:?}", &ids[..ids.len().min(64)]),
                Prompt::TokenLists(l) => {
                    format!("{:?}", l.first().map(|ids| &ids[..ids.len().min(64)]))
                }
            },
        }
    }
}

#[derive(serde::Deserialize)]
struct ModelOnly {
    model: String,
}

/// Resolves `incoming`'s target. A request an ensemble sends to one of its
/// members is never resolved to an ensemble again.
pub fn resolve(ctx: &Context<'_>, incoming: &Incoming) -> Result<Target, ApiError> {
    if !incoming.for_member
        && let Ok(ModelOnly { model }) = serde_json::from_slice::<ModelOnly>(&incoming.body)
        && let Some(ensemble) = ctx.ensembles.get(&model)
    {
        return Ok(Target::Ensemble(ensemble));
    }
    let request = GenerationRequest::parse(incoming.kind, &incoming.body)?;
    if !ctx.is_local(request.model()) {
        return Ok(Target::Peer(request));
    }
    let model = ctx.model(request.model())?;
    if model.drain.is_draining() {
        // Taken out of service here: a peer answers, else the client retries.
        if !ctx.peers.serving(&model.name).is_empty()
            && !crate::route::forward::was_forwarded(&incoming.headers)
        {
            return Ok(Target::Peer(request));
        }
        return Err(ApiError::Draining(format!(
            "model `{}` is being taken out of service on this agent; retry",
            model.name
        )));
    }
    Ok(Target::Local(model, request))
}
