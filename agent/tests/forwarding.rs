//! Forwarding to peers that misbehave, over real loopback sockets: a peer
//! that accepts and never answers, one that closes the connection at once,
//! and one that dies in the middle of a stream. The forwarder tries the
//! next replica while nothing has been passed on, and ends a broken stream
//! with an OpenAI error event and `[DONE]`. A change of the peer table
//! releases the requests held for the models it makes ready.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use weir_agent::api::ApiError;
use weir_agent::route::forward::{Relayed, to_peer};
use weir_agent::route::peers::{Peer, PeerTable};

/// A peer that does `behaviour` with each connection; its URL.
async fn peer<F, Fut>(behaviour: F) -> String
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(behaviour(socket));
        }
    });
    url
}

/// Reads the request head and body (enough for these small requests).
async fn read_request(socket: &mut tokio::net::TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(Duration::from_millis(500), socket.read(&mut buf)).await;
}

async fn answers_ok(mut socket: tokio::net::TcpStream) {
    read_request(&mut socket).await;
    let body = r#"{"ok":true}"#;
    let reply = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = socket.write_all(reply.as_bytes()).await;
}

async fn never_answers(mut socket: tokio::net::TcpStream) {
    read_request(&mut socket).await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    drop(socket);
}

async fn closes_at_once(socket: tokio::net::TcpStream) {
    drop(socket);
}

async fn dies_mid_stream(mut socket: tokio::net::TcpStream) {
    read_request(&mut socket).await;
    let event = "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n";
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    let chunk = format!("{:x}\r\n{event}\r\n", event.len());
    let _ = socket.write_all(head.as_bytes()).await;
    let _ = socket.write_all(chunk.as_bytes()).await;
    let _ = socket.flush().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Gone without the last chunk: the body is truncated.
    drop(socket);
}

fn table(urls: &[&str]) -> PeerTable {
    let table = PeerTable::default();
    for url in urls {
        table.upsert(Peer {
            url: (*url).to_owned(),
            models: vec!["m".into()],
            ready: true,
        });
    }
    table
}

async fn forward(
    table: &PeerTable,
    prefix: u64,
    head_timeout: Duration,
) -> Result<Relayed, ApiError> {
    to_peer(
        &reqwest::Client::new(),
        table,
        "m",
        "/v1/chat/completions",
        &HeaderMap::new(),
        Bytes::from_static(br#"{"model":"m"}"#),
        prefix,
        head_timeout,
    )
    .await
}

async fn body_of(relayed: Relayed) -> String {
    let chunks: Vec<_> = relayed.body.collect().await;
    chunks
        .into_iter()
        .map(|c| String::from_utf8_lossy(&c.expect("no error chunk")).into_owned())
        .collect()
}

/// A prefix whose first choice among `table`'s replicas is `url`.
async fn prefix_preferring(table: &PeerTable, url: &str) -> u64 {
    let loads: Vec<(String, usize)> = table
        .serving("m")
        .iter()
        .map(|p| (p.url.clone(), 0))
        .collect();
    (0..10_000u64)
        .find(|k| loads[weir_agent::route::order(*k, &loads)[0]].0 == url)
        .expect("some prefix prefers each replica")
}

#[tokio::test]
async fn a_peer_that_never_answers_is_given_up_for_the_next() {
    let hung = peer(never_answers).await;
    let good = peer(answers_ok).await;
    let table = table(&[&hung, &good]);
    let prefix = prefix_preferring(&table, &hung).await;
    let started = Instant::now();
    let relayed = forward(&table, prefix, Duration::from_millis(300))
        .await
        .expect("the other replica answers");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(relayed.status, 200);
    assert_eq!(body_of(relayed).await, r#"{"ok":true}"#);
}

#[tokio::test]
async fn a_connection_closed_before_any_byte_goes_to_the_next_replica() {
    let closing = peer(closes_at_once).await;
    let good = peer(answers_ok).await;
    let table = table(&[&closing, &good]);
    let prefix = prefix_preferring(&table, &closing).await;
    let relayed = forward(&table, prefix, Duration::from_secs(5))
        .await
        .expect("the other replica answers");
    assert_eq!(relayed.status, 200);
}

#[tokio::test]
async fn a_stream_whose_peer_dies_ends_with_an_error_event_and_done() {
    let dying = peer(dies_mid_stream).await;
    let table = table(&[&dying]);
    let relayed = forward(&table, 0, Duration::from_secs(5)).await.unwrap();
    assert_eq!(relayed.status, 200);
    let body = body_of(relayed).await;
    assert!(body.starts_with("data: {\"choices\""), "{body}");
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3, "{body}");
    let error: serde_json::Value =
        serde_json::from_str(events[1].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(
        error["error"]["type"], "service_unavailable_error",
        "{error}"
    );
    assert_eq!(events[2], "data: [DONE]");
}

#[tokio::test]
async fn a_known_model_without_a_ready_replica_is_503_and_an_unknown_one_404() {
    let table = PeerTable::default();
    let unknown = forward(&table, 0, Duration::from_secs(1)).await;
    assert!(matches!(unknown, Err(ApiError::ModelNotFound(_))));
    table.declare(["m".to_owned()].into());
    match forward(&table, 0, Duration::from_secs(1)).await {
        Err(e @ ApiError::Unavailable { .. }) => {
            assert_eq!(e.status().as_u16(), 503);
            assert!(e.retry_after().is_some());
        }
        Err(e) => panic!("expected 503, got {e:?}"),
        Ok(_) => panic!("expected 503, got an answer"),
    }
    // A replica seen ready once and gone since is known too.
    let seen = PeerTable::default();
    seen.upsert(Peer {
        url: "http://127.0.0.1:9".into(),
        models: vec!["m".into()],
        ready: true,
    });
    seen.upsert(Peer {
        url: "http://127.0.0.1:9".into(),
        models: vec![],
        ready: false,
    });
    let gone = forward(&seen, 0, Duration::from_secs(1)).await;
    assert!(matches!(gone, Err(ApiError::Unavailable { .. })));
}

async fn refuses_draining(mut socket: tokio::net::TcpStream) {
    read_request(&mut socket).await;
    let body = r#"{"error":{"message":"draining","type":"service_unavailable_error"}}"#;
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         x-weir-draining: 1\r\nretry-after: 1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = socket.write_all(reply.as_bytes()).await;
}

#[tokio::test]
async fn a_replica_that_refuses_is_passed_over_and_the_last_refusal_passed_on() {
    let draining = peer(refuses_draining).await;
    let good = peer(answers_ok).await;
    let both = table(&[&draining, &good]);
    let prefix = prefix_preferring(&both, &draining).await;
    let relayed = forward(&both, prefix, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(relayed.status, 200, "the other replica answers");
    let only = table(&[&draining]);
    let relayed = forward(&only, 0, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        relayed.status, 503,
        "with no other replica the refusal is passed on"
    );
    assert!(relayed.headers.iter().any(|(n, _)| n == "retry-after"));
}

#[tokio::test(start_paused = true)]
async fn a_peer_table_change_releases_the_requests_held_for_its_models() {
    let state = weir_agent::http::AppState::new(weir_agent::models::ModelRegistry::default());
    state.peers.declare(["m".to_owned(), "n".to_owned()].into());
    let mut m = state.holds.hold("m").unwrap();
    let mut n = state.holds.hold("n").unwrap();
    // A rebuild (cluster mode) with a ready replica of `m` only.
    state.peers.replace(vec![Peer {
        url: "http://10.0.0.1:8080".into(),
        models: vec!["m".into()],
        ready: true,
    }]);
    let started = tokio::time::Instant::now();
    m.released().await.unwrap();
    assert_eq!(started.elapsed(), Duration::ZERO, "released at once");
    assert_eq!(state.holds.held("n"), 1, "`n` still has no replica");
    // A polled peer (standalone) that turns ready for `n`.
    state.peers.upsert(Peer {
        url: "http://10.0.0.2:8080".into(),
        models: vec!["n".into()],
        ready: true,
    });
    n.released().await.unwrap();
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert!(
        state
            .metrics
            .encode()
            .unwrap()
            .contains("weir_requests_held{model_name=\"n\"} 0")
    );
}
