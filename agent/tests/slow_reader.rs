//! A client that reads its stream slowly gets the same text in fewer SSE
//! chunks: deltas waiting behind its socket are merged, never reordered or
//! changed. Over a real socket whose receive buffer is small, so that the
//! server's writes really wait on the client.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_agent::http::{AppState, router};
use weir_agent::models::{ModelRegistry, ModelSpec, ServedModel, ensure_builtin};

async fn start() -> std::net::SocketAddr {
    let root = std::env::temp_dir().join(format!("weir-agent-slow-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let spec = ModelSpec {
        name: "tiny".into(),
        dir: ensure_builtin(&root).unwrap(),
        ..ModelSpec::default()
    };
    let mut registry = ModelRegistry::default();
    registry.insert(ServedModel::load(&spec).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = AppState::new(registry);
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    addr
}

fn body() -> String {
    json!({"model": "tiny", "messages": [{"role": "user", "content": "tell a long story"}],
           "max_tokens": 1500, "ignore_eos": true, "temperature": 0, "stream": true,
           "stream_options": {"include_usage": false}})
    .to_string()
}

/// The text of every content delta, one entry per SSE event.
fn deltas(sse: &str) -> Vec<String> {
    sse.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .filter(|t| !t.is_empty())
        .collect()
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = body.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        let start = end + 2;
        out.extend_from_slice(&body[start..start + size]);
        body = &body[start + size + 2..];
    }
}

/// The stream read at once by an ordinary client.
async fn fast(addr: std::net::SocketAddr) -> String {
    reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The stream read by a client with a 4 KiB receive buffer that reads
/// nothing for a while, then everything.
async fn slow(addr: std::net::SocketAddr) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let body = body();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: weir\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    String::from_utf8(dechunk(&raw[split + 4..])).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_the_same_text_in_fewer_chunks() {
    let addr = start().await;
    let quick = deltas(&fast(addr).await);
    let lagging = deltas(&slow(addr).await);
    assert_eq!(lagging.concat(), quick.concat(), "the same text");
    assert!(quick.len() > 100, "{} deltas", quick.len());
    assert!(
        lagging.len() * 2 < quick.len(),
        "a reader that lags gets merged chunks: {} against {}",
        lagging.len(),
        quick.len()
    );
    assert!(
        lagging
            .iter()
            .all(|t| t.len() <= weir_agent::http::render::MERGE_MAX_BYTES)
    );
}
