//! Passing a request on over HTTP: to a peer that serves its model (the
//! replica chosen by [`super::order`]) or to an ensemble's external
//! endpoint, and the answer back as a [`Relayed`] stream, unchanged.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use http::HeaderMap;

use super::FORWARDED;
use super::peers::{Peer, PeerTable};
use crate::api::ApiError;

/// Request headers passed through to a peer.
const PASS: [&str; 4] = ["content-type", "authorization", "x-weir-priority", "accept"];
/// Answer headers passed back from a peer or an external endpoint.
const KEEP: [&str; 4] = [
    "content-type",
    "retry-after",
    "x-weir-cache",
    "x-weir-coalesced",
];

/// An answer from elsewhere, passed on as it arrives.
pub struct Relayed {
    /// Its HTTP status.
    pub status: u16,
    /// The headers worth passing on (content type, retry-after, Weir's own).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Its body, chunk by chunk.
    pub body: BoxStream<'static, Result<Bytes, std::io::Error>>,
}

/// Whether the request was forwarded to us already.
pub fn was_forwarded(headers: &HeaderMap) -> bool {
    headers.contains_key(FORWARDED)
}

/// Forwards `body` to a ready peer serving `model`, trying the next replica
/// when one cannot be reached. A request already forwarded once is not
/// forwarded again (the model is then not found).
pub async fn to_peer(
    client: &reqwest::Client,
    table: &PeerTable,
    model: &str,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
    prefix: u64,
) -> Result<Relayed, ApiError> {
    let replicas: Vec<Peer> = table.serving(model);
    if replicas.is_empty() || was_forwarded(headers) {
        return Err(ApiError::ModelNotFound(model.to_owned()));
    }
    let loads: Vec<(String, usize)> = replicas
        .iter()
        .map(|p| (p.url.clone(), table.counter(&p.url).load(Ordering::Acquire)))
        .collect();
    let mut last_error = String::new();
    for i in super::order(prefix, &loads) {
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
            Ok(answer) => return Ok(relay(answer, Some(counter))),
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

/// Posts `body` to an external OpenAI-compatible endpoint (`url` ends in
/// `/v1`; `path` is the route below it), within `timeout`.
pub async fn to_external(
    client: &reqwest::Client,
    url: &str,
    api_key: Option<&str>,
    timeout: Duration,
    path: &str,
    body: Bytes,
) -> Result<Relayed, String> {
    let mut request = client
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .timeout(timeout)
        .body(body);
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let answer = request.send().await.map_err(|e| e.to_string())?;
    Ok(relay(answer, None))
}

/// The answer as a [`Relayed`]; the peer's in-flight count (if any) drops
/// when the body has been passed on or the client went away.
fn relay(answer: reqwest::Response, counter: Option<Arc<AtomicUsize>>) -> Relayed {
    struct Release(Option<Arc<AtomicUsize>>);
    impl Drop for Release {
        fn drop(&mut self) {
            if let Some(counter) = &self.0 {
                counter.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
    let headers = answer
        .headers()
        .iter()
        .filter(|(name, _)| KEEP.contains(&name.as_str()))
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect();
    let status = answer.status().as_u16();
    let release = Release(counter);
    let body = answer
        .bytes_stream()
        .map_err(std::io::Error::other)
        .map_ok(move |chunk| {
            let _keep = &release;
            chunk
        })
        .boxed();
    Relayed {
        status,
        headers,
        body,
    }
}
