//! The HTTP server's limits, over real sockets: clients that send headers
//! or bodies too slowly, connections that never send a byte and idle
//! keep-alive connections are cut; more
//! connections than allowed from one address (or in total) are refused with
//! a 503 in OpenAI's shape while others are still served; too many headers
//! are a 431 with an OpenAI body.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_agent::http::listen::Limits;
use weir_agent::http::{AppState, serve};
use weir_agent::models::ModelRegistry;

async fn start(limits: Limits) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let state = AppState::new(ModelRegistry::default());
    tokio::spawn(serve(listener, state, limits, std::future::pending()));
    addr
}

fn limits() -> Limits {
    Limits {
        total: 64,
        per_client: 8,
        header_read: Duration::from_millis(800),
        body_read: Duration::from_millis(800),
    }
}

/// Reads until the server closes the connection (or `limit` passes);
/// what it sent and whether it closed.
async fn read_to_close(socket: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

async fn health(addr: &str) -> u16 {
    reqwest::get(format!("http://{addr}/health"))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_client_sending_headers_a_byte_at_a_time_is_cut() {
    let addr = start(limits()).await;
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    let head = b"GET /health HTTP/1.1\r\nHost: weir\r\nX-Slow: ";
    let mut cut = false;
    for byte in head.iter().chain(b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter()) {
        if slow.write_all(&[*byte]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    if !cut {
        cut = read_to_close(&mut slow, Duration::from_secs(2)).await.1;
    }
    assert!(cut, "a slow header was never cut");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(health(&addr).await, 200, "others are still served");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let addr = start(limits()).await;
    let mut socket = TcpStream::connect(&addr).await.unwrap();
    socket
        .write_all(b"GET /health HTTP/1.1\r\nHost: weir\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (answer, closed) = read_to_close(&mut socket, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(closed, "the idle connection stayed open");
    assert!(started.elapsed() >= Duration::from_millis(700));
}

#[tokio::test]
async fn a_connection_that_never_sends_a_byte_is_closed() {
    let addr = start(limits()).await;
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    let (answer, closed) = read_to_close(&mut silent, Duration::from_secs(5)).await;
    assert!(closed, "a silent connection stayed open");
    assert!(answer.is_empty(), "{answer}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // Half an HTTP/2 preface, then silence, is cut the same way.
    let mut partial = TcpStream::connect(&addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert!(read_to_close(&mut partial, Duration::from_secs(5)).await.1);
    assert_eq!(health(&addr).await, 200, "others are still served");
}

#[tokio::test]
async fn a_body_that_trickles_in_is_a_408() {
    let addr = start(limits()).await;
    let mut socket = TcpStream::connect(&addr).await.unwrap();
    socket
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: weir\r\n\
              content-type: application/json\r\ncontent-length: 400\r\n\r\n{\"mo",
        )
        .await
        .unwrap();
    let (answer, _) = read_to_close(&mut socket, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
}

#[tokio::test]
async fn connections_over_the_per_client_limit_are_refused_with_503() {
    let addr = start(Limits {
        per_client: 3,
        header_read: Duration::from_secs(30),
        ..limits()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: weir\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let mut extra = TcpStream::connect(&addr).await.unwrap();
    let (answer, closed) = read_to_close(&mut extra, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("\"service_unavailable_error\""), "{answer}");
    assert!(closed);
    drop(held.pop());
    // The slot comes back once the server sees the close.
    let deadline = Instant::now() + Duration::from_secs(3);
    while health(&addr).await != 200 {
        assert!(Instant::now() < deadline, "the freed slot never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn too_many_headers_are_a_431_in_openai_shape() {
    let addr = start(limits()).await;
    let mut request = reqwest::Client::new().get(format!("http://{addr}/v1/models"));
    for i in 0..150 {
        request = request.header(format!("x-filler-{i}"), "1");
    }
    let answer = request.send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 431);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_header_fields_too_large");
}
