//! Accepting connections with limits: at most [`Limits::total`]
//! connections at once (by default under the process's descriptor limit)
//! and [`Limits::per_client`] from one address, the rest refused with a
//! 503 in OpenAI's shape; request headers must arrive within
//! [`Limits::header_read`], which also bounds how long an idle keep-alive
//! connection stays open (hyper starts that timer as soon as a connection
//! waits for its next request). Bodies have their own bound in
//! [`super::extract`]. Written on hyper-util's connection builder because
//! `axum::serve` sets no timer, so none of hyper's timeouts apply there.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::api::ApiError;

/// Most headers a request may carry before hyper refuses it itself (our
/// own, OpenAI-shaped limit in [`super::MAX_HEADERS`] is lower).
const HYPER_MAX_HEADERS: usize = 256;

/// Connection limits of the HTTP server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once.
    pub total: usize,
    /// Connections open at once from one client address.
    pub per_client: usize,
    /// Time to receive a request's headers, and the longest idle
    /// keep-alive.
    pub header_read: Duration,
    /// Time to receive a request's body, from when its headers arrived.
    pub body_read: Duration,
}

/// When a request's body must have arrived (set per request by
/// [`serve`], read by the body extractors).
#[derive(Clone, Copy, Debug)]
pub struct BodyDeadline(pub tokio::time::Instant);

impl Default for Limits {
    fn default() -> Self {
        Self {
            total: default_total(),
            per_client: 1024,
            header_read: Duration::from_secs(30),
            body_read: Duration::from_secs(30),
        }
    }
}

/// Three quarters of the soft descriptor limit (the rest is for models,
/// peers and Redis), at most 16,384; 768 when the limit cannot be read.
fn default_total() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse::<usize>().ok())
        })
        .unwrap_or(1024);
    (soft / 4 * 3).clamp(64, 16_384)
}

/// Open connections, in total and by client address.
#[derive(Default)]
struct Counts {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// A connection's place in [`Counts`], given back when it closes.
struct Slot {
    counts: Arc<Mutex<Counts>>,
    client: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total -= 1;
        if let Some(n) = counts.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                counts.by_client.remove(&self.client);
            }
        }
    }
}

/// A place for a connection from `client`, or why there is none.
fn take_slot(counts: &Arc<Mutex<Counts>>, limits: &Limits, client: IpAddr) -> Result<Slot, String> {
    let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
    if c.total >= limits.total {
        return Err(format!(
            "the agent has {} connections open, its limit; retry shortly",
            c.total
        ));
    }
    let mine = c.by_client.entry(client).or_default();
    if *mine >= limits.per_client {
        return Err(format!(
            "{client} has {} connections open, the limit per client; close some",
            *mine
        ));
    }
    *mine += 1;
    c.total += 1;
    Ok(Slot {
        counts: counts.clone(),
        client,
    })
}

/// Serves `router` on `listener` within `limits` until `stop` resolves,
/// then stops accepting and waits for open connections to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .max_headers(HYPER_MAX_HEADERS);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let body_read = limits.body_read;
    let router = router.layer(axum::middleware::from_fn(
        move |mut request: axum::extract::Request, next: axum::middleware::Next| async move {
            let deadline = tokio::time::Instant::now() + body_read;
            request.extensions_mut().insert(BodyDeadline(deadline));
            next.run(request).await
        },
    ));
    let graceful = GracefulShutdown::new();
    let counts = Arc::new(Mutex::new(Counts::default()));
    tokio::pin!(stop);
    loop {
        let (socket, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let slot = match take_slot(&counts, &limits, addr.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                tokio::spawn(refuse(socket, why));
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let (builder, router, watcher) = (builder.clone(), router.clone(), graceful.watcher());
        let header_read = limits.header_read;
        tokio::spawn(async move {
            let _slot = slot;
            if !first_bytes(&socket, header_read).await {
                tracing::debug!(client = %addr, "connection sent no request in time");
                return;
            }
            let service = TowerToHyperService::new(router);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(socket), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(client = %addr, error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Waits until a new connection has sent enough to tell its protocol
/// (a first byte that is not the HTTP/2 preface's, or the whole preface);
/// `false` if it closed or sent nothing within `limit`. hyper's header
/// timeout starts only once a request begins, and its protocol detection
/// reads without a deadline, so a client that connects and stays silent
/// would otherwise hold its connection forever.
async fn first_bytes(socket: &TcpStream, limit: Duration) -> bool {
    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let wait = async {
        let mut buf = [0u8; 24];
        loop {
            let n = socket.peek(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            if buf[..n] != PREFACE[..n] || n == PREFACE.len() {
                return Ok(true);
            }
            // Part of the preface so far: peek returns at once, so pause.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    matches!(tokio::time::timeout(limit, wait).await, Ok(Ok(true)))
}

/// Answers a connection over the limits with a 503 and closes it.
async fn refuse(mut socket: TcpStream, why: String) {
    tracing::warn!(reason = %why, "refusing a connection");
    let error = ApiError::Unavailable {
        message: why,
        retry_after: Duration::from_secs(1),
    };
    let body = error.body().to_string();
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        socket.write_all(reply.as_bytes()).await?;
        socket.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), write).await;
}
