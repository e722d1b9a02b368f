//! The one mapping from what went wrong to an HTTP status and OpenAI's error
//! body (`{"error": {"message", "type", "param", "code"}}`), also used for
//! errors in the middle of a stream.

use std::time::Duration;

use http::StatusCode;
use serde_json::json;

/// An error answered in OpenAI's shape.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or asks for something impossible (400).
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
        /// The offending parameter, if one.
        param: Option<String>,
    },
    /// The body parses but has wrong types or missing fields (422).
    #[error("{0}")]
    Unprocessable(String),
    /// Missing or wrong API key (401).
    #[error("{0}")]
    Unauthorized(String),
    /// No such model (404).
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// No such route (404).
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// The body is larger than the limit (413).
    #[error("the request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    /// The request did not arrive in time (408).
    #[error("{0}")]
    RequestTimeout(String),
    /// The request's headers are too many or too large (431).
    #[error("{0}")]
    HeadersTooLarge(String),
    /// Overloaded: retry after the given delay (429).
    #[error("{message}")]
    Overloaded {
        /// Why.
        message: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// The model is loading or unavailable (503).
    #[error("{message}")]
    Unavailable {
        /// Why.
        message: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// The model exists but no replica became ready in time, or too many
    /// requests are held for it already (503, code `model_unavailable`).
    #[error("{message}")]
    ModelUnavailable {
        /// Why.
        message: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// The model is being taken out of service on this agent (503, with
    /// `x-weir-draining` so a forwarding peer tries another replica).
    #[error("{0}")]
    Draining(String),
    /// Something failed inside (500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming a parameter.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.to_owned()),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound(_) | Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } | Self::ModelUnavailable { .. } | Self::Draining(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`, also the metric label.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. }
            | Self::Unprocessable(_)
            | Self::BodyTooLarge(_)
            | Self::RequestTimeout(_)
            | Self::HeadersTooLarge(_) => "invalid_request_error",
            Self::Unauthorized(_) => "authentication_error",
            Self::ModelNotFound(_) | Self::RouteNotFound(_) => "not_found_error",
            Self::Overloaded { .. } => "rate_limit_error",
            Self::Unavailable { .. } | Self::ModelUnavailable { .. } | Self::Draining(_) => {
                "service_unavailable_error"
            }
            Self::Internal(_) => "internal_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            Self::ModelNotFound(_) => Some("model_not_found"),
            Self::BodyTooLarge(_) => Some("request_too_large"),
            Self::RequestTimeout(_) => Some("request_timeout"),
            Self::HeadersTooLarge(_) => Some("request_header_fields_too_large"),
            Self::Overloaded { .. } => Some("rate_limit_exceeded"),
            Self::ModelUnavailable { .. } => Some("model_unavailable"),
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let param = match self {
            Self::InvalidRequest { param, .. } => param.clone(),
            Self::ModelNotFound(_) => Some("model".to_owned()),
            _ => None,
        };
        json!({"error": {
            "message": self.to_string(),
            "type": self.error_type(),
            "param": param,
            "code": self.code(),
        }})
    }

    /// How long a client should wait before retrying, for 429 and 503.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Overloaded { retry_after, .. }
            | Self::Unavailable { retry_after, .. }
            | Self::ModelUnavailable { retry_after, .. } => Some(*retry_after),
            Self::Draining(_) => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}
