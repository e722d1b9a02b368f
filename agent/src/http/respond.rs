//! Rendering the pipeline's outcome: a generation's events as one JSON
//! body or as SSE, a relayed answer passed through as it streams, each with
//! the headers saying where the answer came from.

use axum::Json;
use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};

use super::render::{self, Shape};
use futures::StreamExt;

use crate::generate::{self, GenEvent, GenStream};
use crate::pipeline::validate::ResponseMeta;
use crate::pipeline::{Outcome, Reply};
use crate::route::forward::Relayed;

/// The response for `outcome` on a route of shape `shape`.
pub async fn render(shape: Shape, outcome: Outcome) -> Response {
    let mut response = match outcome.reply {
        Reply::Answered {
            events,
            meta,
            stream,
        } => render_events(meta, shape, stream, events).await,
        Reply::Relayed(relayed) => relay(relayed),
    };
    for (name, value) in outcome.headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// An answer from a peer or an external endpoint, streamed through.
pub fn relay(relayed: Relayed) -> Response {
    let status = StatusCode::from_u16(relayed.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, Body::from_stream(relayed.body)).into_response();
    for (name, value) in relayed.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(&value),
        ) {
            response.headers_mut().insert(n, v);
        }
    }
    response
}

/// Renders events as SSE or as one JSON body. A stream's head waits for
/// its first event, so that a request shed before its first token (queue
/// timeout, engine refusal) is answered with its own status and
/// `Retry-After` rather than a 200 and an error event.
async fn render_events(
    meta: ResponseMeta,
    shape: Shape,
    stream: bool,
    mut events: GenStream,
) -> Response {
    if stream {
        let first = match events.next().await {
            Some(GenEvent::Error { status, body }) => return error_response(status, body),
            Some(first) => first,
            None => GenEvent::error(&crate::api::ApiError::Internal(
                "the generation ended without an event".into(),
            )),
        };
        let events: GenStream = Box::pin(futures::stream::once(async { first }).chain(events));
        if shape == Shape::Chat
            && let Some(tools) = meta.tools.clone()
        {
            let body = super::tool_stream::sse(meta, tools, events);
            return Sse::new(body)
                .keep_alive(KeepAlive::default())
                .into_response();
        }
        let body = render::sse(meta, shape, events);
        return Sse::new(body)
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    match generate::collect(events).await {
        Ok(generation) => match shape {
            Shape::Chat => Json(render::chat_body(&meta, &generation)).into_response(),
            Shape::Completion => Json(render::completion_body(&meta, &generation)).into_response(),
        },
        Err((status, body)) => error_response(status, body),
    }
}

/// An error event as a whole response: its status, its OpenAI body, and
/// `Retry-After` when retrying helps.
fn error_response(status: u16, body: serde_json::Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Json(body)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
    }
    response
}
