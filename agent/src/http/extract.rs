//! Body extractors whose rejections take OpenAI's error shape: a body over
//! the limit is 413, malformed JSON (or invalid UTF-8) is 400, a body with
//! wrong types or missing fields is 422 naming the field, a body that does
//! not arrive within [`BODY_READ_TIMEOUT`] is 408.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::listen::BodyDeadline;
use crate::api::ApiError;
use crate::api::extract::{MAX_BODY_BYTES, parse};

/// Time a client has to send a whole request body, unless the server set
/// a [`BodyDeadline`].
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `axum::Json` with OpenAI-shaped rejections.
#[derive(Debug)]
pub struct OpenAiJson<T>(pub T);

/// The raw body, with OpenAI-shaped rejections (for handlers that may
/// forward the body unchanged).
#[derive(Debug)]
pub struct OpenAiBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for OpenAiBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        read_body(req, state).await.map(OpenAiBytes)
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = read_body(req, state).await?;
        parse(&bytes).map(OpenAiJson)
    }
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    // Refuse a declared oversize body before reading any of it.
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(ApiError::BodyTooLarge(MAX_BODY_BYTES));
    }
    let deadline = req
        .extensions()
        .get::<BodyDeadline>()
        .map_or_else(|| tokio::time::Instant::now() + BODY_READ_TIMEOUT, |d| d.0);
    let read = tokio::time::timeout_at(deadline, Bytes::from_request(req, state));
    let Ok(read) = read.await else {
        return Err(ApiError::RequestTimeout(
            "the request body did not arrive in time".into(),
        ));
    };
    read.map_err(|rejection| {
        if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BodyTooLarge(MAX_BODY_BYTES)
        } else {
            ApiError::InvalidRequest {
                message: format!("could not read the request body: {}", rejection.body_text()),
                param: None,
            }
        }
    })
}
