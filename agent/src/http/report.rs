//! `GET /v1/weir/report`: for each model served here, the figures of its
//! requests over the last minutes and, when it had any, its grade, alert
//! and advice ([`weir_crds::performance`]).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use weir_crds::performance::{Load, PerformanceReport};

use super::AppState;

/// The handler.
pub(super) async fn report(State(state): State<AppState>) -> Json<Value> {
    let now = std::time::Instant::now();
    let models: Vec<Value> = state
        .models
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|m| {
            let figures = m.recent.figures(now);
            let snap = m.engine.stats().snapshot();
            let load = Load {
                waiting: snap.waiting as f64,
                kv_usage: snap.kv_usage,
            };
            let report = PerformanceReport::of(figures.clone(), load);
            json!({"model": m.name, "figures": figures, "report": report})
        })
        .collect();
    Json(json!({"object": "weir.report", "models": models}))
}
