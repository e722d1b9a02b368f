//! Hostile connections: clients that send headers or a body one byte at a
//! time, and idle connections beyond the per-client limit, while a
//! well-behaved client keeps asking. Each hostile client comes from its own
//! loopback address (127.0.0.2, .3, .4), as distinct hosts would.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::{Row, chat, post};
use crate::process::Agent;

/// Seconds the agent gives a client for its headers, and for its body.
const HEADER_TIMEOUT: u64 = 2;
/// Connections one client address may hold.
const PER_CLIENT: usize = 32;

/// How a hostile connection ended.
enum End {
    /// Refused at once with this status.
    Refused(u16),
    /// Cut (closed, or answered 408) after this long.
    Cut(Duration),
    /// Still open when the client gave up.
    Open,
}

async fn connect_from(host: u8, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
        0,
    ))?;
    socket.connect(addr).await
}

/// Opens a connection from `127.0.0.<host>`, sends `head` and then
/// `trickle` one byte every 300 ms, and reports how the agent ended it.
async fn hostile(host: u8, addr: SocketAddr, head: Vec<u8>, trickle: bool) -> End {
    let started = Instant::now();
    let Ok(mut stream) = connect_from(host, addr).await else {
        return End::Refused(0);
    };
    let _ = stream.write_all(&head).await;
    let give_up = started + Duration::from_secs(HEADER_TIMEOUT + 4);
    let mut buf = [0u8; 64];
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => {
                let elapsed = started.elapsed();
                return match read {
                    Ok(n) if n >= 12 && buf.starts_with(b"HTTP/1.1 ") => {
                        let status = std::str::from_utf8(&buf[9..12]).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
                        if status == 408 { End::Cut(elapsed) } else { End::Refused(status) }
                    }
                    _ => End::Cut(elapsed),
                };
            }
            _ = tick.tick(), if trickle => { let _ = stream.write_all(b"x").await; }
            () = tokio::time::sleep_until(give_up.into()) => return End::Open,
        }
    }
}

/// Runs the three kinds of hostile clients against one agent while a
/// normal client sends requests; every normal request must succeed.
pub async fn run(_dir: &std::path::Path) -> Row {
    let mut row = Row::new("slow headers, slow bodies, idle conns");
    let agent = Agent::start(&[
        "--header-timeout",
        &HEADER_TIMEOUT.to_string(),
        "--body-timeout",
        &HEADER_TIMEOUT.to_string(),
        "--max-connections-per-client",
        &PER_CLIENT.to_string(),
    ]);
    let addr: SocketAddr = agent
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("an address");
    let slow_header = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n".to_vec();
    let slow_body = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".to_vec();
    let mut attacks = Vec::new();
    for _ in 0..24 {
        attacks.push((
            false,
            tokio::spawn(hostile(2, addr, slow_header.clone(), true)),
        ));
        attacks.push((
            false,
            tokio::spawn(hostile(3, addr, slow_body.clone(), true)),
        ));
    }
    for _ in 0..PER_CLIENT + 8 {
        attacks.push((true, tokio::spawn(hostile(4, addr, Vec::new(), false))));
    }
    let normal = tokio::spawn(normal_traffic(
        agent.url.clone(),
        Duration::from_secs(HEADER_TIMEOUT + 3),
    ));
    let limit = Duration::from_secs(HEADER_TIMEOUT) + Duration::from_millis(1500);
    let mut refused_idle = 0;
    for (idle, attack) in attacks {
        row.sent += 1;
        match attack.await.unwrap_or(End::Open) {
            End::Refused(503) if idle => {
                refused_idle += 1;
                row.refused += 1;
            }
            End::Refused(status) => row.fail(format!("a hostile client was answered {status}")),
            End::Cut(after) if after <= limit => {
                row.refused += 1;
                row.took(after);
            }
            End::Cut(after) => row.fail(format!("a hostile client was cut only after {after:?}")),
            End::Open => row.fail("a hostile client was never cut"),
        }
    }
    if refused_idle != 8 {
        row.problems.push(format!("{refused_idle} idle connections refused beyond the per-client limit of {PER_CLIENT}, expected 8"));
    }
    let (sent, ok, problems) =
        normal
            .await
            .unwrap_or((0, 0, vec!["the normal client panicked".into()]));
    row.sent += sent;
    row.served += ok;
    for p in problems {
        row.fail(p);
    }
    row
}

/// A well-behaved client asking every 100 ms for `span`.
async fn normal_traffic(url: String, span: Duration) -> (usize, usize, Vec<String>) {
    let client = reqwest::Client::new();
    let end = Instant::now() + span;
    let (mut sent, mut ok, mut problems) = (0, 0, Vec::new());
    while Instant::now() < end {
        sent += 1;
        let a = post(
            &client,
            &url,
            &chat("weir-tiny", &format!("hello {sent}"), 4, false),
            Duration::from_secs(10),
        )
        .await;
        if a.status == 200 {
            ok += 1;
        } else {
            problems.push(format!("a normal request got {} {:?}", a.status, a.error));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (sent, ok, problems)
}
