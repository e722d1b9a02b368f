//! The operator's HTTP endpoints: `/health` (the process is alive),
//! `/ready` (the Weir API is installed) and `/metrics` (Prometheus text).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State as Extract;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// State shared by the endpoints.
#[derive(Clone)]
pub struct State {
    ready: Arc<AtomicBool>,
    ready_gauge: Gauge,
    leader: Arc<std::sync::RwLock<Option<Arc<AtomicBool>>>>,
    registry: Arc<Registry>,
    /// Control-loop metrics.
    pub metrics: crate::metrics::OperatorMetrics,
}

/// Reports leadership at scrape time.
#[derive(Debug)]
struct LeaderCollector(Arc<std::sync::RwLock<Option<Arc<AtomicBool>>>>);

impl prometheus_client::collector::Collector for LeaderCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let leader = self
            .0
            .read()
            .ok()
            .and_then(|l| l.clone())
            .is_some_and(|l| l.load(Ordering::Acquire));
        let metric = prometheus_client::metrics::gauge::ConstGauge::new(i64::from(leader));
        // The registry adds the `weir_operator` prefix.
        let family = encoder.encode_descriptor(
            "leader",
            "1 on the replica that holds the leader Lease",
            None,
            metric.metric_type(),
        )?;
        metric.encode(family)
    }
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    /// A not-yet-ready state with its metrics registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weir_operator");
        let ready_gauge = Gauge::default();
        registry.register(
            "ready",
            "1 when the Weir API is installed and the operator can act",
            ready_gauge.clone(),
        );
        let leader = Arc::new(std::sync::RwLock::new(None));
        registry.register_collector(Box::new(LeaderCollector(leader.clone())));
        let metrics = crate::metrics::OperatorMetrics::register(&mut registry);
        Self {
            ready: Arc::new(AtomicBool::new(false)),
            ready_gauge,
            leader,
            registry: Arc::new(registry),
            metrics,
        }
    }

    /// Reports leadership from `leader` on `/metrics`.
    pub fn watch_leadership(&self, leader: Arc<AtomicBool>) {
        if let Ok(mut slot) = self.leader.write() {
            *slot = Some(leader);
        }
    }

    /// Marks the operator ready or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        self.ready_gauge.set(i64::from(ready));
    }
}

/// The endpoint router.
pub fn router(state: State) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves the endpoints on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: State) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

async fn ready(Extract(state): Extract<State>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "waiting for the Weir CRDs")
    }
}

async fn metrics(Extract(state): Extract<State>) -> impl IntoResponse {
    let mut body = String::new();
    match encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(state: &State, path: &str) -> (StatusCode, String) {
        let response = router(state.clone())
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn ready_follows_the_api_check_and_metrics_report_it() {
        let state = State::new();
        assert_eq!(get(&state, "/health").await.0, StatusCode::OK);
        assert_eq!(
            get(&state, "/ready").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(
            get(&state, "/metrics")
                .await
                .1
                .contains("weir_operator_ready 0")
        );
        state.set_ready(true);
        assert_eq!(get(&state, "/ready").await.0, StatusCode::OK);
        assert!(
            get(&state, "/metrics")
                .await
                .1
                .contains("weir_operator_ready 1")
        );
        let leader = Arc::new(AtomicBool::new(false));
        state.watch_leadership(leader.clone());
        assert!(
            get(&state, "/metrics")
                .await
                .1
                .lines()
                .any(|l| l == "weir_operator_leader 0")
        );
        leader.store(true, Ordering::Release);
        assert!(
            get(&state, "/metrics")
                .await
                .1
                .lines()
                .any(|l| l == "weir_operator_leader 1")
        );
        state.metrics.reconciled("Model", 0.01, true);
        state.metrics.record::<(), ()>("Model", &Err(()));
        let text = get(&state, "/metrics").await.1;
        assert!(
            text.contains("weir_operator_reconciles_total{kind=\"Model\"} 1")
                && text.contains("weir_operator_reconcile_errors_total{kind=\"Model\"} 1")
                && text
                    .contains("weir_operator_reconcile_duration_seconds_count{kind=\"Model\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("weir_operator_errors_total{kind=\"Model\"} 1"),
            "{text}"
        );
    }
}
