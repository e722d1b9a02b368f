//! Prometheus metrics on `/metrics`. Where the meaning is the same as
//! vLLM's, the name is vLLM's (`vllm:num_requests_running`,
//! `vllm:kv_cache_usage_perc`, the latency histograms, ...), so dashboards,
//! KEDA triggers and inference-gateway endpoint pickers work unchanged;
//! Weir's own figures are `weir_*`.

mod caches;
pub mod tenants;

use std::sync::{Arc, RwLock};

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use weir_engine::stats::StatsSnapshot;

use crate::gpu::{GpuMonitor, GpuReading};
use crate::models::ModelRegistry;

/// `model_name` label, as vLLM labels its metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    /// Served model name.
    pub model_name: String,
}

/// Model and cache tier.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    /// Served model name.
    pub model_name: String,
    /// `l1`, `l2` or `semantic`.
    pub tier: String,
}

/// Model and outcome of a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// Served model name.
    pub model_name: String,
    /// `success` or the OpenAI error type.
    pub outcome: String,
}

/// Model and a semantic-cache veto reason or verification stage.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Served model name.
    pub model_name: String,
    /// `numbers`, `roles`, `model`, … for vetoes; `rules` or `model` for
    /// verification time.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PriorityLabel {
    model_name: String,
    priority: String,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0,
    ]
    .into_iter()
}

/// Every metric the agent updates as requests flow.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Time to first token.
    pub ttft: Family<ModelLabel, Histogram>,
    /// Time between tokens.
    pub inter_token: Family<ModelLabel, Histogram>,
    /// Request latency, end to end.
    pub e2e: Family<ModelLabel, Histogram>,
    /// Time from arrival to the first engine step.
    pub queue_time: Family<ModelLabel, Histogram>,
    /// Finished requests by outcome.
    pub requests: Family<OutcomeLabel, Counter>,
    /// Response cache hits by tier.
    pub cache_hits: Family<TierLabel, Counter>,
    /// Response cache misses.
    pub cache_misses: Family<ModelLabel, Counter>,
    /// Requests served by joining an identical one in flight.
    pub coalesced: Family<ModelLabel, Counter>,
    /// Requests refused by admission control (429).
    pub rejected: Family<ModelLabel, Counter>,
    /// Prompt tokens saved by the prompt optimization.
    pub prompt_tokens_saved: Family<ModelLabel, Counter>,
    /// Tokens read by `/v1/embeddings`.
    pub embedding_tokens: Family<ModelLabel, Counter>,
    /// Semantic cache lookups skipped because the encoder was missing or
    /// failed.
    pub semantic_unavailable: Family<ModelLabel, Counter>,
    /// Semantic candidates at or above the threshold that the verifier
    /// vetoed, by reason.
    pub semantic_vetoes: Family<ReasonLabel, Counter>,
    /// Semantic hits whose question came back with `Cache-Control:
    /// no-cache` (a calibration signal).
    pub semantic_refuted: Family<ModelLabel, Counter>,
    /// Time the verifier took per candidate, by stage (`rules`, `model`).
    pub semantic_verify: Family<ReasonLabel, Histogram>,
    /// Ensemble requests by member and outcome.
    pub ensemble_requests: Family<MemberOutcome, Counter>,
    /// Ensemble member latency (to the answer's headers when streaming).
    pub ensemble_latency: Family<MemberKey, Histogram>,
    /// Placements of requests on replicas, by policy, basis and where.
    pub route_decisions: Family<RouteLabel, Counter>,
    /// Fresh KV summaries of peers (per peer and model).
    pub kv_summaries: prometheus_client::metrics::gauge::Gauge,
    /// Tokenizers held for models only peers serve.
    pub routing_tokenizers: prometheus_client::metrics::gauge::Gauge,
    /// Requests held for a model without a ready replica
    /// ([`crate::route::hold`]).
    pub held: Family<ModelLabel, Gauge>,
    /// Per-tenant figures.
    pub tenants: tenants::TenantMetrics,
    /// Smoothed latency per (ensemble, member), for `BestOf`.
    member_ewma: Arc<std::sync::Mutex<std::collections::HashMap<(String, String), f64>>>,
}

/// Model, routing policy, basis (`policy` or `hash-fallback`) and where
/// the request went (`here` or `peer`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// Served model name.
    pub model_name: String,
    /// `prefix`, `hash`, `least-load` or `round-robin`.
    pub policy: String,
    /// `policy` or `hash-fallback`.
    pub basis: String,
    /// `here` or `peer`.
    pub replica: String,
}

/// Ensemble and member.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberKey {
    /// Ensemble name.
    pub ensemble: String,
    /// Member name.
    pub member: String,
}

/// Ensemble, member and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberOutcome {
    /// Ensemble name.
    pub ensemble: String,
    /// Member name.
    pub member: String,
    /// `success` or `error`.
    pub outcome: String,
}

fn histogram_family() -> Family<ModelLabel, Histogram> {
    Family::new_with_constructor(|| Histogram::new(latency_buckets()))
}

impl Metrics {
    /// Registers every metric, and a collector that reads the engines' live
    /// counters at scrape time.
    pub fn new(models: Arc<RwLock<ModelRegistry>>, gpu: Arc<GpuMonitor>) -> Self {
        let mut registry = Registry::default();
        let m = Self {
            registry: Arc::new(Registry::default()),
            ttft: histogram_family(),
            inter_token: histogram_family(),
            e2e: histogram_family(),
            queue_time: histogram_family(),
            requests: Family::default(),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            coalesced: Family::default(),
            rejected: Family::default(),
            prompt_tokens_saved: Family::default(),
            embedding_tokens: Family::default(),
            semantic_unavailable: Family::default(),
            semantic_vetoes: Family::default(),
            semantic_refuted: Family::default(),
            semantic_verify: Family::new_with_constructor(|| {
                Histogram::new([
                    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01,
                    0.05, 0.25, 1.0,
                ])
            }),
            ensemble_requests: Family::default(),
            ensemble_latency: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            route_decisions: Family::default(),
            kv_summaries: Default::default(),
            routing_tokenizers: Default::default(),
            held: Family::default(),
            member_ewma: Arc::default(),
            tenants: tenants::TenantMetrics::default(),
        };
        registry.register(
            "weir_route_decisions",
            "Requests placed on a replica, by routing policy, basis and where",
            m.route_decisions.clone(),
        );
        registry.register(
            "weir_kv_summaries_fresh",
            "Peer KV summaries (per peer and model) fresh enough to route by",
            m.kv_summaries.clone(),
        );
        registry.register(
            "weir_routing_tokenizers",
            "Tokenizers held (without weights) for models only peers serve",
            m.routing_tokenizers.clone(),
        );
        registry.register(
            "vllm:time_to_first_token_seconds",
            "Time to first token",
            m.ttft.clone(),
        );
        registry.register(
            "vllm:inter_token_latency_seconds",
            "Time between output tokens",
            m.inter_token.clone(),
        );
        registry.register(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency",
            m.e2e.clone(),
        );
        registry.register(
            "vllm:request_queue_time_seconds",
            "Time waiting before the first step",
            m.queue_time.clone(),
        );
        registry.register(
            "weir_requests",
            "Finished requests by outcome",
            m.requests.clone(),
        );
        registry.register(
            "weir_cache_hits",
            "Response cache hits by tier",
            m.cache_hits.clone(),
        );
        registry.register(
            "weir_cache_misses",
            "Response cache misses",
            m.cache_misses.clone(),
        );
        registry.register(
            "weir_coalesced_requests",
            "Requests that joined an identical one in flight",
            m.coalesced.clone(),
        );
        registry.register(
            "weir_rejected_requests",
            "Requests refused by admission control",
            m.rejected.clone(),
        );
        registry.register(
            "weir_prompt_tokens_saved",
            "Prompt tokens removed by the prompt optimization",
            m.prompt_tokens_saved.clone(),
        );
        registry.register(
            "weir_embedding_tokens",
            "Tokens read by the embeddings API",
            m.embedding_tokens.clone(),
        );
        registry.register(
            "weir_semantic_cache_unavailable",
            "Semantic cache lookups skipped: encoder missing or failing",
            m.semantic_unavailable.clone(),
        );
        registry.register(
            "weir_semantic_cache_vetoes",
            "Semantic candidates the verifier refused, by reason",
            m.semantic_vetoes.clone(),
        );
        registry.register(
            "weir_semantic_cache_refuted",
            "Semantic hits re-asked with Cache-Control: no-cache",
            m.semantic_refuted.clone(),
        );
        registry.register(
            "weir_semantic_cache_verify_seconds",
            "Time the semantic verifier took per candidate, by stage",
            m.semantic_verify.clone(),
        );
        registry.register(
            "weir_ensemble_requests",
            "Ensemble requests by member and outcome",
            m.ensemble_requests.clone(),
        );
        registry.register(
            "weir_ensemble_member_latency_seconds",
            "Ensemble member latency",
            m.ensemble_latency.clone(),
        );
        registry.register(
            "weir_requests_held",
            "Requests held until a replica of their model is ready",
            m.held.clone(),
        );
        m.tenants.register(&mut registry);
        registry.register_collector(Box::new(EngineCollector { models, gpu }));
        Self {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// Records one attempt at an ensemble member.
    pub fn record_member(
        &self,
        ensemble: &str,
        member: &str,
        ok: bool,
        elapsed: std::time::Duration,
    ) {
        let outcome = if ok { "success" } else { "error" };
        let key = MemberKey {
            ensemble: ensemble.to_owned(),
            member: member.to_owned(),
        };
        self.ensemble_requests
            .get_or_create(&MemberOutcome {
                ensemble: key.ensemble.clone(),
                member: key.member.clone(),
                outcome: outcome.into(),
            })
            .inc();
        self.ensemble_latency
            .get_or_create(&key)
            .observe(elapsed.as_secs_f64());
        if ok {
            let mut ewma = self.member_ewma.lock().unwrap_or_else(|p| p.into_inner());
            let entry = ewma
                .entry((key.ensemble, key.member))
                .or_insert(elapsed.as_secs_f64());
            *entry = 0.8 * *entry + 0.2 * elapsed.as_secs_f64();
        }
    }

    /// Smoothed recent latency of a member in seconds, if it has answered.
    pub fn member_latency(&self, ensemble: &str, member: &str) -> Option<f64> {
        let ewma = self.member_ewma.lock().unwrap_or_else(|p| p.into_inner());
        ewma.get(&(ensemble.to_owned(), member.to_owned())).copied()
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Reads each engine's counters when scraped, so nothing is copied on the
/// request path.
#[derive(Debug)]
struct EngineCollector {
    models: Arc<RwLock<ModelRegistry>>,
    gpu: Arc<GpuMonitor>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabel {
    gpu: String,
    name: String,
}

impl EngineCollector {
    fn encode_gpus(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let readings = self.gpu.readings();
        let figures: [Figure<GpuReading, f64>; 3] = [
            (
                "weir_gpu_memory_used_bytes",
                "GPU memory in use (NVML)",
                |r| r.memory_used_bytes as f64,
            ),
            ("weir_gpu_memory_total_bytes", "GPU memory (NVML)", |r| {
                r.memory_total_bytes as f64
            }),
            (
                "weir_gpu_utilization_ratio",
                "GPU utilization, 0-1 (NVML)",
                |r| r.utilization,
            ),
        ];
        for (name, help, get) in figures {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for r in &readings {
                let label = GpuLabel {
                    gpu: r.index.to_string(),
                    name: r.name.clone(),
                };
                ConstGauge::new(get(r)).encode(family.encode_family(&label)?)?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for ModelRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|m| &m.name))
            .finish()
    }
}

/// Name, help text and reader of one figure.
type Figure<S, T> = (&'static str, &'static str, fn(&S) -> T);

const PRIORITIES: [&str; 5] = ["critical", "high", "normal", "low", "background"];

impl prometheus_client::collector::Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        let snaps: Vec<_> = models
            .iter()
            .map(|m| {
                (
                    ModelLabel {
                        model_name: m.name.clone(),
                    },
                    m.engine.stats().snapshot(),
                    m,
                )
            })
            .collect();
        let gauges: [Figure<StatsSnapshot, f64>; 6] = [
            (
                "weir_batch_size",
                "Sequences in the latest engine step",
                |s| s.last_batch_size as f64,
            ),
            (
                "weir_max_num_seqs",
                "Current sequence limit of a step (adaptive)",
                |s| s.max_num_seqs as f64,
            ),
            (
                "weir_max_num_batched_tokens",
                "Current token limit of a step (adaptive)",
                |s| s.max_num_batched_tokens as f64,
            ),
            (
                "vllm:num_requests_running",
                "Requests in the running batch",
                |s| s.running as f64,
            ),
            (
                "vllm:num_requests_waiting",
                "Requests waiting to be scheduled",
                |s| s.waiting as f64,
            ),
            (
                "vllm:kv_cache_usage_perc",
                "Share of KV cache blocks in use (0-1)",
                |s| s.kv_usage,
            ),
        ];
        for (name, help, get) in gauges {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (label, snap, _) in &snaps {
                ConstGauge::new(get(snap)).encode(family.encode_family(label)?)?;
            }
        }
        let counters: [Figure<StatsSnapshot, u64>; 5] = [
            ("vllm:prompt_tokens", "Prompt tokens computed", |s| {
                s.prompt_tokens
            }),
            ("vllm:generation_tokens", "Tokens generated", |s| {
                s.generation_tokens
            }),
            (
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache",
                |s| s.prefix_queries,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prompt tokens found in the prefix cache",
                |s| s.prefix_hits,
            ),
            ("vllm:num_preemptions", "Requests preempted", |s| {
                s.preemptions
            }),
        ];
        for (name, help, get) in counters {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (label, snap, _) in &snaps {
                ConstCounter::new(get(snap)).encode(family.encode_family(label)?)?;
            }
        }
        let mut queue = encoder.encode_descriptor(
            "weir_queue_depth",
            "Waiting requests by priority class",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (label, snap, _) in &snaps {
            for (i, p) in PRIORITIES.iter().enumerate() {
                let l = PriorityLabel {
                    model_name: label.model_name.clone(),
                    priority: (*p).to_owned(),
                };
                ConstGauge::new(snap.waiting_by_priority[i] as i64)
                    .encode(queue.encode_family(&l)?)?;
            }
        }
        let breakers = snaps
            .iter()
            .map(|(label, _, m)| (label, ConstGauge::new(m.breaker.state() as i64)));
        caches::family(
            &mut encoder,
            (
                "weir_breaker_state",
                "Engine circuit breaker: 0 closed, 1 open, 2 half-open",
            ),
            MetricType::Gauge,
            breakers,
        )?;
        let modes = snaps
            .iter()
            .filter_map(|(label, _, m)| Some((label, ConstGauge::new(m.tuner.current()?.level()))));
        caches::family(
            &mut encoder,
            (
                "weir_tuning_mode",
                "Load-based tuning mode: 0 quality, 1 balanced, 2 performance",
            ),
            MetricType::Gauge,
            modes,
        )?;
        let caches: Vec<_> = snaps
            .iter()
            .filter_map(|(label, _, m)| Some((label, m.cache.as_ref()?)))
            .collect();
        caches::encode_caches(&mut encoder, &caches)?;
        caches::encode_semantic(&mut encoder, &snaps)?;
        self.encode_gpus(&mut encoder)
    }
}
