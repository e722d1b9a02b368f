//! Forwarding a request to a peer that serves its model (the peer is
//! chosen by [`crate::route::order`]), streaming the answer back unchanged.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;

use crate::api::ApiError;
use crate::route::peers::{Peer, PeerTable};
use crate::route::{FORWARDED, order};

/// Headers passed through to the peer.
const PASS: [&str; 4] = ["content-type", "authorization", "x-weir-priority", "accept"];

/// Whether the request was forwarded to us already.
pub fn was_forwarded(headers: &HeaderMap) -> bool {
    headers.contains_key(FORWARDED)
}

/// Forwards `body` to a ready peer serving `model`, trying the next replica
/// when one cannot be reached. Streams the peer's answer through unchanged.
pub async fn forward(
    client: &reqwest::Client,
    table: &PeerTable,
    model: &str,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
    prefix: u64,
) -> Result<Response, ApiError> {
    let replicas: Vec<Peer> = table.serving(model);
    if replicas.is_empty() {
        return Err(ApiError::ModelNotFound(model.to_owned()));
    }
    let loads: Vec<(String, usize)> = replicas
        .iter()
        .map(|p| (p.url.clone(), table.counter(&p.url).load(Ordering::Acquire)))
        .collect();
    let mut last_error = String::new();
    for i in order(prefix, &loads) {
        let url = &replicas[i].url;
        let mut request = client
            .post(format!("{url}{path}"))
            .body(body.clone())
            .header(FORWARDED, "1");
        for name in PASS {
            if let Some(value) = headers.get(name) {
                request = request.header(name, value.clone());
            }
        }
        let counter = table.counter(url);
        counter.fetch_add(1, Ordering::AcqRel);
        match request.send().await {
            Ok(answer) => return Ok(relay(answer, counter)),
            Err(e) if e.is_connect() || e.is_timeout() => {
                counter.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(peer = %url, error = %e, "peer unreachable; trying the next replica");
                last_error = e.to_string();
            }
            Err(e) => {
                counter.fetch_sub(1, Ordering::AcqRel);
                return Err(ApiError::Unavailable {
                    message: format!("forwarding to {url}: {e}"),
                    retry_after: Duration::from_secs(1),
                });
            }
        }
    }
    Err(ApiError::Unavailable {
        message: format!("no replica of `{model}` could be reached: {last_error}"),
        retry_after: Duration::from_secs(1),
    })
}

/// The peer's answer as our response; the in-flight count drops when the
/// body has been passed on (or the client went away).
fn relay(
    answer: reqwest::Response,
    counter: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Response {
    struct Release(std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = HeaderMap::new();
    for (name, value) in answer.headers() {
        let keep = [
            "content-type",
            "retry-after",
            "x-weir-cache",
            "x-weir-coalesced",
        ];
        if keep.contains(&name.as_str())
            && let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_ref()),
                HeaderValue::from_bytes(value.as_bytes()),
            )
        {
            headers.insert(n, v);
        }
    }
    let release = Release(counter);
    let stream = answer.bytes_stream().map_ok(move |chunk| {
        let _keep = &release;
        chunk
    });
    let mut response = (status, Body::from_stream(stream)).into_response();
    response.headers_mut().extend(headers);
    response
}
