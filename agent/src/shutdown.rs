//! Stopping the agent without losing a request. On SIGTERM (what the
//! kubelet sends) or Ctrl-C the agent reports itself not ready (`/ready`
//! answers 503; in cluster mode a heartbeat at once says `Ready=False` and
//! every model `Unloading`, so peers stop routing here), drains every
//! model — new requests go to a peer that serves the model or are refused
//! as retryable, those in flight finish within the drain timeout, the rest
//! end with an OpenAI error event — and only then stops the HTTP server.
//! The chart's `terminationGracePeriodSeconds` is the drain timeout plus a
//! margin.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Notify;

use crate::http::AppState;

/// The default bound on a drain (`--drain-timeout`).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Resolves when the process is asked to stop (SIGTERM or Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: draining"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: draining"),
                }
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch SIGTERM; Ctrl-C only"),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("interrupt: draining");
}

/// Marks the agent not ready, asks for a heartbeat now (`beat_now`, in
/// cluster mode) and drains every model at once, each within `timeout`.
pub async fn drain_all(state: &AppState, beat_now: Option<&Notify>, timeout: Duration) {
    state.ready.store(false, Ordering::Release);
    // Held requests go on if a replica is ready now, else get a 503: none
    // may keep the server waiting past the drain.
    state.holds.close();
    let models: Vec<_> = state
        .models
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect();
    for model in &models {
        model.drain.begin();
    }
    if let Some(beat) = beat_now {
        beat.notify_one();
    }
    let drains = models.iter().map(|model| {
        let model = Arc::clone(model);
        async move {
            let drained = model.drain.run(timeout).await;
            tracing::info!(
                model = %model.name,
                in_flight = drained.in_flight,
                aborted = drained.aborted,
                "drained"
            );
        }
    });
    futures::future::join_all(drains).await;
}
