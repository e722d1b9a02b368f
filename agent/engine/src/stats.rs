//! Live engine counters, written by the engine thread after every step and
//! read lock-free by the server for `/metrics` and status reports.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::kv_pool::KvSummary;
use crate::scheduler::Scheduler;

/// Counters and gauges of one engine (names follow vLLM's metrics).
#[derive(Debug, Default)]
pub struct EngineStats {
    running: AtomicU64,
    waiting: AtomicU64,
    waiting_by_priority: [AtomicU64; 5],
    kv_usage_bits: AtomicU64,
    prefix_hits: AtomicU64,
    prefix_queries: AtomicU64,
    preemptions: AtomicU64,
    steps: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    max_num_seqs: AtomicU64,
    max_num_batched_tokens: AtomicU64,
    last_batch_size: AtomicU64,
    prefill_queued: AtomicU64,
    kv: KvSummary,
}

/// A consistent-enough copy of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StatsSnapshot {
    /// Requests in the running batch (`vllm:num_requests_running`).
    pub running: u64,
    /// Requests waiting (`vllm:num_requests_waiting`).
    pub waiting: u64,
    /// Waiting requests per priority class, Critical first.
    pub waiting_by_priority: [u64; 5],
    /// Share of KV blocks in use, 0..1 (`vllm:kv_cache_usage_perc`).
    pub kv_usage: f64,
    /// Prompt tokens found in the prefix cache (`vllm:prefix_cache_hits`).
    pub prefix_hits: u64,
    /// Prompt tokens looked up (`vllm:prefix_cache_queries`).
    pub prefix_queries: u64,
    /// Requests preempted so far (`vllm:num_preemptions`).
    pub preemptions: u64,
    /// Model steps run.
    pub steps: u64,
    /// Prompt tokens computed (`vllm:prompt_tokens`).
    pub prompt_tokens: u64,
    /// Tokens generated (`vllm:generation_tokens`).
    pub generation_tokens: u64,
    /// Current sequence limit of a step.
    pub max_num_seqs: u64,
    /// Current token limit of a step.
    pub max_num_batched_tokens: u64,
    /// Sequences in the latest step.
    pub last_batch_size: u64,
    /// Prompt tokens of live requests not computed yet.
    pub prefill_queued: u64,
}

impl EngineStats {
    /// Copies the scheduler's gauges and counters, and folds its pool's
    /// cache events into [`kv_summary`](Self::kv_summary).
    pub(crate) fn update_from(&self, scheduler: &mut Scheduler) {
        self.kv.set_block_size(scheduler.block_size());
        self.kv.apply(scheduler.take_kv_events());
        let set = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        set(&self.running, scheduler.num_running() as u64);
        set(&self.waiting, scheduler.num_waiting() as u64);
        for (a, v) in self
            .waiting_by_priority
            .iter()
            .zip(scheduler.num_waiting_by_priority())
        {
            set(a, v as u64);
        }
        set(&self.kv_usage_bits, scheduler.kv_usage().to_bits());
        set(&self.prefix_hits, scheduler.prefix_cache_hits());
        set(&self.prefix_queries, scheduler.prefix_cache_queries());
        set(&self.preemptions, scheduler.num_preemptions());
        set(
            &self.prefill_queued,
            scheduler.num_prefill_tokens_queued() as u64,
        );
        set(&self.max_num_seqs, scheduler.config().max_num_seqs as u64);
        set(
            &self.max_num_batched_tokens,
            scheduler.config().max_num_batched_tokens as u64,
        );
    }

    /// Counts one model step and the tokens it computed.
    pub(crate) fn record_step(&self, batch_size: usize, prompt_tokens: usize, generated: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.last_batch_size
            .store(batch_size as u64, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.generation_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            running: get(&self.running),
            waiting: get(&self.waiting),
            waiting_by_priority: std::array::from_fn(|i| get(&self.waiting_by_priority[i])),
            kv_usage: f64::from_bits(get(&self.kv_usage_bits)),
            prefix_hits: get(&self.prefix_hits),
            prefix_queries: get(&self.prefix_queries),
            preemptions: get(&self.preemptions),
            steps: get(&self.steps),
            prompt_tokens: get(&self.prompt_tokens),
            generation_tokens: get(&self.generation_tokens),
            max_num_seqs: get(&self.max_num_seqs),
            max_num_batched_tokens: get(&self.max_num_batched_tokens),
            last_batch_size: get(&self.last_batch_size),
            prefill_queued: get(&self.prefill_queued),
        }
    }

    /// The block hashes the engine's prefix cache holds (bounded), for
    /// routers.
    pub fn kv_summary(&self) -> &KvSummary {
        &self.kv
    }
}
