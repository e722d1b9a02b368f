//! The operator's own metrics: reconciles, their duration and failures by
//! controller kind, and writes and failed writes by object kind (exported on
//! `/metrics` as `weir_operator_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The kind of object a reconcile, write or error concerns.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `Model`, `NodeAgent`, `ModelEnsemble`, `CachePolicy`, `BatchPolicy`.
    pub kind: String,
}

fn label(kind: &str) -> KindLabel {
    KindLabel {
        kind: kind.to_owned(),
    }
}

/// Counters and histograms of the controllers.
#[derive(Clone)]
pub struct OperatorMetrics {
    /// Reconciles run, by controller kind.
    pub reconciles: Family<KindLabel, Counter>,
    /// Reconciles that failed (and were retried with backoff), by kind.
    pub reconcile_errors: Family<KindLabel, Counter>,
    /// Reconcile duration, by kind.
    pub reconcile_seconds: Family<KindLabel, Histogram>,
    /// Objects written, by kind.
    pub writes: Family<KindLabel, Counter>,
    /// Failed writes, by kind.
    pub errors: Family<KindLabel, Counter>,
}

impl OperatorMetrics {
    /// Registers the metrics in `registry` (prefix `weir_operator`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            }),
            writes: Family::default(),
            errors: Family::default(),
        };
        registry.register("reconciles", "Reconciles run", m.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and were requeued with backoff",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            m.reconcile_seconds.clone(),
        );
        registry.register("writes", "Objects written by kind", m.writes.clone());
        registry.register("errors", "Failed writes by kind", m.errors.clone());
        m
    }

    /// Counts one reconcile of `kind`, its duration and whether it failed.
    pub fn reconciled(&self, kind: &str, seconds: f64, failed: bool) {
        let l = label(kind);
        self.reconciles.get_or_create(&l).inc();
        self.reconcile_seconds.get_or_create(&l).observe(seconds);
        if failed {
            self.reconcile_errors.get_or_create(&l).inc();
        }
    }

    /// Counts a write or its failure.
    pub fn record<T, E>(&self, kind: &str, result: &Result<T, E>) {
        let l = label(kind);
        match result {
            Ok(_) => self.writes.get_or_create(&l).inc(),
            Err(_) => self.errors.get_or_create(&l).inc(),
        };
    }
}
