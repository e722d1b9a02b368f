//! Who is calling: a peer agent (the cluster's peer token), a tenant (one
//! of its API keys), the agent's own `--api-key`, or anyone when neither
//! tenants nor a key are configured. The tenant header of a request is
//! dropped unless a peer sent it, and set to the tenant whose key the
//! request carries, so that everything below can trust it. `/metrics` may
//! need its own bearer token.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::api::ApiError;
use crate::tenants::keys::KeyHash;
use crate::tenants::{PEER_TOKEN_HEADER, TENANT_HEADER};

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Whether `sent` equals `secret`, compared as hashes in constant time.
fn same_secret(sent: Option<&str>, secret: &str) -> bool {
    sent.is_some_and(|s| KeyHash::of(s).matches(&KeyHash::of(secret)))
}

/// Whether the request carries this agent's peer token.
pub fn from_peer(state: &AppState, headers: &HeaderMap) -> bool {
    let sent = headers.get(PEER_TOKEN_HEADER).and_then(|v| v.to_str().ok());
    state
        .peer_token
        .as_deref()
        .is_some_and(|token| same_secret(sent, token))
}

/// Checks the caller of an OpenAI route (401 `invalid_api_key` when a key
/// is needed and none matches) and names its tenant in the request.
pub(super) async fn require_key(
    State(state): State<AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let peer = from_peer(&state, request.headers());
    let headers = request.headers_mut();
    headers.remove(PEER_TOKEN_HEADER);
    if peer {
        // A peer forwards what it authenticated: its tenant header stands.
        return next.run(request).await;
    }
    headers.remove(TENANT_HEADER);
    let sent = bearer(headers);
    if let Some(tenant) = sent.and_then(|k| state.tenants.by_key(k)) {
        if let Ok(value) = HeaderValue::from_str(&tenant.name) {
            headers.insert(TENANT_HEADER, value);
        }
        return next.run(request).await;
    }
    let open = state.api_key.is_none() && state.tenants.is_empty();
    let admin = state
        .api_key
        .as_deref()
        .is_some_and(|key| same_secret(sent, key));
    if open || admin {
        return next.run(request).await;
    }
    let message = if sent.is_some() {
        "incorrect API key provided"
    } else {
        "a valid API key is required (Authorization: Bearer ...)"
    };
    ApiError::Unauthorized(message.into()).into_response()
}

/// Checks `Authorization: Bearer <token>` on `/metrics` when the agent has
/// a metrics token.
pub(super) async fn require_metrics_token(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(token) = state.metrics_token.as_deref()
        && !same_secret(bearer(request.headers()), token)
    {
        return ApiError::Unauthorized("/metrics needs its bearer token".into()).into_response();
    }
    next.run(request).await
}
