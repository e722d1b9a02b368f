//! Passing a request on over HTTP: to a peer that serves its model (the
//! replica chosen by [`super::order`]) or to an ensemble's external
//! endpoint, and the answer back as a [`Relayed`] stream, unchanged.
//!
//! Bounded in time: a peer must send its answer's head within
//! [`head_timeout`] (short for streams, whose head comes at once; long for
//! whole answers, which come when generated) or the next replica is tried,
//! as after any failure before a byte came back; after the head, a gap of
//! [`IDLE_TIMEOUT`] between chunks ends the answer (SSE keep-alives come
//! every 15 s). A stream that breaks or stalls ends with an OpenAI error
//! event and `[DONE]`, never a truncated body. While waiting for a head, a
//! peer that the peer table marks not ready (its poll or heartbeat failed:
//! a stopped or hung process) is given up at once and the next replica
//! tried, so a hung peer costs a whole-answer request one poll period, not
//! the whole head timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use http::HeaderMap;

use super::FORWARDED;
use super::peers::{Peer, PeerTable};
use crate::api::ApiError;

/// Request headers passed through to a peer (the tenant and the peer
/// token only as [`with_peer_token`] set them: the HTTP layer drops a
/// client's own).
const PASS: [&str; 6] = [
    "content-type",
    "authorization",
    "x-weir-priority",
    "accept",
    crate::tenants::TENANT_HEADER,
    crate::tenants::PEER_TOKEN_HEADER,
];
/// Answer headers passed back from a peer or an external endpoint.
const KEEP: [&str; 11] = [
    "content-type",
    "retry-after",
    super::REPLICA_HEADER,
    "x-weir-cache",
    "x-weir-coalesced",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

/// `headers` with the peer token added, so that the peer trusts the
/// tenant named in them (unchanged without a token).
pub fn with_peer_token(headers: &HeaderMap, token: Option<&str>) -> HeaderMap {
    let mut headers = headers.clone();
    if let Some(value) = token.and_then(|t| http::HeaderValue::from_str(t).ok()) {
        headers.insert(crate::tenants::PEER_TOKEN_HEADER, value);
    }
    headers
}

/// Header on a 503 from an agent taking the model out of service.
pub const DRAINING_HEADER: &str = "x-weir-draining";

/// Longest gap between two chunks of a relayed answer.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a peer may take to send its answer's head: 10 s for a stream,
/// 300 s for a whole answer.
pub fn head_timeout(stream: bool) -> Duration {
    Duration::from_secs(if stream { 10 } else { 300 })
}

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
/// when one fails before answering (unreachable, dead pooled connection, no
/// head within `head_timeout`) or refuses with 429 or 503 (draining,
/// overloaded) — the last refusal is passed on when every replica refuses. A model that exists without a ready replica
/// is 503 with `Retry-After`; one nobody knows is 404, as is a request
/// already forwarded once.
#[allow(clippy::too_many_arguments)]
pub async fn to_peer(
    client: &reqwest::Client,
    table: &PeerTable,
    model: &str,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
    prefix: u64,
    head_timeout: Duration,
) -> Result<Relayed, ApiError> {
    let replicas: Vec<Peer> = table.serving(model);
    if replicas.is_empty() || was_forwarded(headers) {
        return Err(if table.is_known(model) {
            no_replica(model, "no replica is ready now")
        } else {
            ApiError::ModelNotFound(model.to_owned())
        });
    }
    let loads: Vec<(String, usize)> = replicas
        .iter()
        .map(|p| (p.url.clone(), table.counter(&p.url).load(Ordering::Acquire)))
        .collect();
    let ordered = super::order(prefix, &loads)
        .into_iter()
        .map(|i| replicas[i].clone())
        .collect();
    to_replicas(
        client,
        table,
        model,
        path,
        headers,
        body,
        ordered,
        head_timeout,
    )
    .await
}

/// Forwards `body` to `replicas` in the order given, as [`to_peer`] does
/// after choosing them.
#[allow(clippy::too_many_arguments)]
pub async fn to_replicas(
    client: &reqwest::Client,
    table: &PeerTable,
    model: &str,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
    replicas: Vec<Peer>,
    head_timeout: Duration,
) -> Result<Relayed, ApiError> {
    let mut last_error = String::new();
    let mut refused = None;
    for replica in &replicas {
        let url = &replica.url;
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
        let answer = tokio::select! {
            answer = tokio::time::timeout(head_timeout, request.send()) => answer.map(|r| r.map_err(Failed)),
            () = went_unready(table, url) => Ok(Err(Unready)),
        };
        let failure = match answer {
            // Refused before any work (draining, overloaded, failing):
            // another replica may answer; if none does, the refusal is passed on.
            Ok(Ok(answer)) if matches!(answer.status().as_u16(), 429 | 503) => {
                let why = format!("answered {}", answer.status());
                refused = Some(answer);
                why
            }
            Ok(Ok(answer)) => return Ok(relay(answer, Some(counter))),
            Ok(Err(Unready)) => "marked not ready while answering".to_owned(),
            Ok(Err(Failed(e))) => e.to_string(),
            Err(_) => format!("no answer within {head_timeout:?}"),
        };
        counter.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(peer = %url, error = %failure, "peer failed before answering; trying the next replica");
        last_error = format!("{url}: {failure}");
    }
    if let Some(answer) = refused {
        return Ok(relay(answer, None));
    }
    Err(no_replica(
        model,
        &format!("no replica could be reached ({last_error})"),
    ))
}

/// Why a peer gave no head: its request failed, or the peer table marked
/// it not ready meanwhile.
enum HeadError {
    Failed(reqwest::Error),
    Unready,
}
use HeadError::{Failed, Unready};

/// How often a peer's readiness is looked at while its head is awaited.
const READY_CHECK: Duration = Duration::from_millis(250);

/// Resolves once the peer table no longer has `url` ready.
async fn went_unready(table: &PeerTable, url: &str) {
    while table.is_ready(url) {
        tokio::time::sleep(READY_CHECK).await;
    }
}

fn no_replica(model: &str, why: &str) -> ApiError {
    ApiError::Unavailable {
        message: format!("model `{model}` is unavailable: {why}; retry shortly"),
        retry_after: Duration::from_secs(1),
    }
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
    let headers: Vec<(String, Vec<u8>)> = answer
        .headers()
        .iter()
        .filter(|(name, _)| KEEP.contains(&name.as_str()))
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect();
    let sse = headers
        .iter()
        .any(|(n, v)| n == "content-type" && v.starts_with(b"text/event-stream"));
    let status = answer.status().as_u16();
    let state = Relay {
        body: answer.bytes_stream().boxed(),
        sse,
        at_boundary: true,
        done: false,
        _release: Release(counter),
    };
    let body = futures::stream::unfold(state, |mut r| async move {
        if r.done {
            return None;
        }
        let failure = match tokio::time::timeout(IDLE_TIMEOUT, r.body.next()).await {
            Ok(Some(Ok(chunk))) => {
                r.at_boundary = chunk.ends_with(b"\n\n") || (chunk.is_empty() && r.at_boundary);
                return Some((Ok(chunk), r));
            }
            Ok(None) => return None,
            Ok(Some(Err(e))) => e.to_string(),
            Err(_) => format!("no data for {IDLE_TIMEOUT:?}"),
        };
        r.done = true;
        tracing::warn!(error = %failure, "a relayed answer broke off");
        if r.sse {
            Some((Ok(broken_stream_end(&failure, r.at_boundary)), r))
        } else {
            Some((Err(std::io::Error::other(failure)), r))
        }
    })
    .boxed();
    Relayed {
        status,
        headers,
        body,
    }
}

/// A relayed body as it is being passed on.
struct Relay {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    sse: bool,
    /// Whether what was passed on ends between two events.
    at_boundary: bool,
    done: bool,
    _release: Release,
}

/// Drops a peer's in-flight count with the relay.
struct Release(Option<Arc<AtomicUsize>>);

impl Drop for Release {
    fn drop(&mut self) {
        if let Some(counter) = &self.0 {
            counter.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The end of an SSE stream whose source broke off: an OpenAI error event
/// and `[DONE]`, after a blank line if the source stopped inside an event.
fn broken_stream_end(why: &str, at_boundary: bool) -> Bytes {
    let error = ApiError::Unavailable {
        message: format!("the replica answering this stream failed: {why}; retry"),
        retry_after: Duration::from_secs(1),
    };
    let gap = if at_boundary { "" } else { "\n\n" };
    Bytes::from(format!("{gap}data: {}\n\ndata: [DONE]\n\n", error.body()))
}
