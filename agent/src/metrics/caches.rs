//! Encoding the caches' figures (response cache warming and Redis, the
//! semantic cache's calibration), and the one helper that writes a metric
//! family from (label, value) rows.

use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use weir_engine::stats::StatsSnapshot;

use super::{Figure, ModelLabel};

/// Writes the family `(name, help)` of `kind` with one sample per row.
pub(super) fn family<'a, L, M>(
    encoder: &mut DescriptorEncoder,
    (name, help): (&str, &str),
    kind: MetricType,
    rows: impl IntoIterator<Item = (&'a L, M)>,
) -> Result<(), std::fmt::Error>
where
    L: EncodeLabelSet + 'a,
    M: EncodeMetric,
{
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (label, metric) in rows {
        metric.encode(family.encode_family(label)?)?;
    }
    Ok(())
}

/// The semantic caches' calibrated threshold and its estimated precision.
pub(super) fn encode_semantic(
    encoder: &mut DescriptorEncoder,
    snaps: &[(ModelLabel, StatsSnapshot, &Arc<crate::models::ServedModel>)],
) -> Result<(), std::fmt::Error> {
    let figures: [Figure<crate::cache::calibrate::Calibrator, f64>; 2] = [
        (
            "weir_semantic_cache_threshold",
            "Similarity a semantic candidate needs now (calibrated)",
            |c| f64::from(c.threshold()),
        ),
        (
            "weir_semantic_cache_estimated_precision",
            "Estimated precision of semantic hits at that threshold (NaN: no evidence yet)",
            |c| f64::from(c.estimated_precision()),
        ),
    ];
    for (name, help, get) in figures {
        let rows = snaps.iter().filter_map(|(label, _, model)| {
            let index = model.semantic.as_ref()?;
            Some((label, ConstGauge::new(get(index.calibrator()))))
        });
        family(encoder, (name, help), MetricType::Gauge, rows)?;
    }
    Ok(())
}

/// The response caches' figures: warming for every cache; errors,
/// timeouts, writes, write-behind drops and the breaker for those with an
/// L2.
pub(super) fn encode_caches(
    encoder: &mut DescriptorEncoder,
    caches: &[(&ModelLabel, &Arc<crate::cache::ResponseCache>)],
) -> Result<(), std::fmt::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    let warming: [Figure<crate::cache::CacheStats, u64>; 2] = [
        (
            "weir_cache_warmed_entries",
            "Entries put into L1 from Redis at start (warming)",
            |s| s.warmed.load(Relaxed),
        ),
        ("weir_cache_warmed_hits", "L1 hits on warmed entries", |s| {
            s.warmed_hits.load(Relaxed)
        }),
    ];
    for (name, help, get) in warming {
        let rows = caches
            .iter()
            .map(|(label, cache)| (*label, ConstCounter::new(get(cache.stats()))));
        family(encoder, (name, help), MetricType::Counter, rows)?;
    }
    let with_l2: Vec<_> = caches
        .iter()
        .filter_map(|(label, cache)| Some((*label, cache.stats(), cache.l2_breaker()?)))
        .collect();
    let counters: [Figure<crate::cache::CacheStats, u64>; 4] = [
        (
            "weir_cache_l2_errors",
            "Redis calls that failed (connection, command)",
            |s| s.l2_errors.load(Relaxed),
        ),
        (
            "weir_cache_l2_timeouts",
            "Redis calls that ran past the policy's timeout",
            |s| s.l2_timeouts.load(Relaxed),
        ),
        ("weir_cache_l2_writes", "Answers written to Redis", |s| {
            s.l2_writes.load(Relaxed)
        }),
        (
            "weir_cache_l2_write_behind_dropped",
            "Redis writes dropped because the write-behind queue was full",
            |s| s.write_behind_dropped.load(Relaxed),
        ),
    ];
    for (name, help, get) in counters {
        let rows = with_l2
            .iter()
            .map(|(label, stats, _)| (*label, ConstCounter::new(get(stats))));
        family(encoder, (name, help), MetricType::Counter, rows)?;
    }
    let breakers = with_l2
        .iter()
        .map(|(label, _, state)| (*label, ConstGauge::new(i64::from(*state))));
    family(
        encoder,
        (
            "weir_cache_l2_breaker_state",
            "Redis (L2) circuit breaker: 0 closed, 1 open, 2 half-open",
        ),
        MetricType::Gauge,
        breakers,
    )
}
