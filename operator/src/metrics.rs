//! The operator's own metrics: control-loop rounds, their duration, writes
//! by kind and errors by kind (exported on `/metrics` as
//! `weir_operator_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The kind of object a write or error concerns.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `Model`, `NodeAgent`, `ModelEnsemble`, `CachePolicy`, `BatchPolicy`.
    pub kind: String,
}

/// Counters and histograms of the control loop.
#[derive(Clone)]
pub struct OperatorMetrics {
    /// Rounds run.
    pub rounds: Counter,
    /// Round duration.
    pub round_seconds: Histogram,
    /// Objects written, by kind.
    pub writes: Family<KindLabel, Counter>,
    /// Failed writes, by kind.
    pub errors: Family<KindLabel, Counter>,
}

impl OperatorMetrics {
    /// Registers the metrics in `registry` (prefix `weir_operator`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            rounds: Counter::default(),
            round_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            writes: Family::default(),
            errors: Family::default(),
        };
        registry.register(
            "reconcile_rounds",
            "Control-loop rounds run",
            m.rounds.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of a control-loop round",
            m.round_seconds.clone(),
        );
        registry.register("writes", "Objects written by kind", m.writes.clone());
        registry.register("errors", "Failed writes by kind", m.errors.clone());
        m
    }

    /// Counts a write or its failure.
    pub fn record<T, E>(&self, kind: &str, result: &Result<T, E>) {
        let label = KindLabel {
            kind: kind.to_owned(),
        };
        match result {
            Ok(_) => self.writes.get_or_create(&label).inc(),
            Err(_) => self.errors.get_or_create(&label).inc(),
        };
    }
}
