//! A JSON body extractor whose rejections take OpenAI's error shape: a body
//! over the limit is 413, malformed JSON (or invalid UTF-8) is 400, a body
//! with wrong types or missing fields is 422 naming the field.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

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
    Bytes::from_request(req, state).await.map_err(|rejection| {
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

/// Parses a JSON body, classifying failures as OpenAI does.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(ApiError::InvalidRequest {
            message: "the request body is not valid UTF-8".into(),
            param: None,
        });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_data() {
            ApiError::Unprocessable(if path == "." {
                flattened_field_error(bytes).unwrap_or_else(|| inner.to_string())
            } else {
                format!("{path}: {inner}")
            })
        } else {
            syntax_error(&inner)
        }
    })?;
    de.end().map_err(|e| syntax_error(&e))?;
    Ok(value)
}

/// Serde loses the path of errors inside `#[serde(flatten)]` fields; the
/// shared sampling fields are parsed once more on their own to name it.
fn flattened_field_error(bytes: &[u8]) -> Option<String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, super::types::SamplingFields>(&mut de) {
        Err(err) => {
            let path = err.path().to_string();
            (path != ".").then(|| format!("{path}: {}", err.into_inner()))
        }
        Ok(_) => None,
    }
}

fn syntax_error(err: &serde_json::Error) -> ApiError {
    ApiError::InvalidRequest {
        message: format!("the request body is not valid JSON: {err}"),
        param: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::ChatCompletionRequest;

    #[test]
    fn classifies_bad_bodies() {
        let syntax = parse::<ChatCompletionRequest>(b"{not json").unwrap_err();
        assert_eq!(syntax.status(), 400);
        let utf8 = parse::<ChatCompletionRequest>(b"{\"model\": \"\xff\"}").unwrap_err();
        assert_eq!(utf8.status(), 400);
        let missing = parse::<ChatCompletionRequest>(br#"{"model": "m"}"#).unwrap_err();
        assert_eq!(missing.status(), 422);
        assert!(missing.to_string().contains("messages"), "{missing}");
        let wrong = parse::<ChatCompletionRequest>(
            br#"{"model": "m", "messages": [], "max_tokens": "ten"}"#,
        )
        .unwrap_err();
        assert_eq!(wrong.status(), 422);
        assert!(wrong.to_string().contains("max_tokens"), "{wrong}");
        let trailing =
            parse::<ChatCompletionRequest>(br#"{"model": "m", "messages": []} x"#).unwrap_err();
        assert_eq!(trailing.status(), 400);
    }
}
