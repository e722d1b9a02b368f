//! The one mapping from [`ApiError`] to an HTTP response: its status, its
//! OpenAI error body, and `Retry-After` when the client should come back.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::api::ApiError;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if let Some(after) = self.retry_after() {
            let secs = after.as_millis().div_ceil(1000).max(1).to_string();
            if let Ok(value) = HeaderValue::from_str(&secs) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        if let ApiError::RateLimited { headers, .. } = &self {
            for (name, value) in headers {
                if let Ok(value) = HeaderValue::from_str(value) {
                    response.headers_mut().insert(*name, value);
                }
            }
        }
        if matches!(self, ApiError::Draining(_)) {
            response.headers_mut().insert(
                crate::route::forward::DRAINING_HEADER,
                HeaderValue::from_static("1"),
            );
        }
        response
    }
}
