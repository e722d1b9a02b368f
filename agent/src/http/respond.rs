//! Answering one job over HTTP: the pipeline's events rendered as one JSON
//! body or as SSE, with the header saying where the answer came from.

use std::sync::Arc;

use axum::Json;
use axum::http::StatusCode;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::render::{self, Shape};
use crate::generate::{self, GenStream, Job};
use crate::models::ServedModel;
use crate::pipeline::validate::ResponseMeta;
use crate::pipeline::{self, Services};

/// Runs `job` on `model` through the request pipeline and answers as JSON
/// or SSE.
pub async fn respond(
    state: AppState,
    model: Arc<ServedModel>,
    job: Job,
    meta: ResponseMeta,
    shape: Shape,
    stream: bool,
) -> Response {
    let services = Services {
        metrics: &state.metrics,
        encoder_named: |name: &str| state.encoder(name),
    };
    match pipeline::run(&services, model, job).await {
        Ok(answer) => {
            let response = render_events(meta, shape, stream, answer.events).await;
            match answer.header {
                Some((name, value)) => with_header(response, name, value),
                None => response,
            }
        }
        Err(e) => e.into_response(),
    }
}

fn with_header(mut response: Response, name: &'static str, value: &'static str) -> Response {
    response
        .headers_mut()
        .insert(name, axum::http::HeaderValue::from_static(value));
    response
}

/// Renders events as SSE or as one JSON body.
async fn render_events(
    meta: ResponseMeta,
    shape: Shape,
    stream: bool,
    events: GenStream,
) -> Response {
    if stream {
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
        Err((status, body)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (status, Json(body)).into_response();
            if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE
            {
                response.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("1"),
                );
            }
            response
        }
    }
}
