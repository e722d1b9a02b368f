//! Property test of the scheduler over random workloads, driven by the fake
//! backend in `common` (which checks every step's windows, budgets, block
//! tables and KV read-back, and audits the scheduler and its pool).

mod common;

use std::time::Duration;

use common::Sim;
use proptest::prelude::*;
use weir_engine::scheduler::{Priority, RequestId, SchedulerConfig, SequenceRequest};

#[derive(Clone, Debug)]
struct Req {
    arrives: usize,
    base: usize,
    base_len: usize,
    suffix: Vec<u32>,
    max_tokens: usize,
    priority: usize,
    eos: Option<u32>,
    abort_at: Option<usize>,
}

fn req() -> impl Strategy<Value = Req> {
    (
        (
            0..30usize,
            0..2usize,
            0..40usize,
            prop::collection::vec(0..50u32, 0..10),
        ),
        (
            1..30usize,
            0..5usize,
            prop::option::weighted(0.3, 0..1000u32),
        ),
        prop::option::weighted(0.2, 0..60usize),
    )
        .prop_map(
            |((arrives, base, base_len, suffix), (max_tokens, priority, eos), abort_at)| Req {
                arrives,
                base,
                base_len,
                suffix,
                max_tokens,
                priority,
                eos,
                abort_at,
            },
        )
}

fn cfg() -> impl Strategy<Value = (SchedulerConfig, usize, usize)> {
    (
        (1..7usize, 1..64usize, 1..64usize, 16..96usize),
        (
            1..500u64,
            any::<bool>(),
            prop::sample::select(vec![1usize, 2, 4, 8]),
            0..20usize,
        ),
    )
        .prop_map(
            |((seqs, budget, chunk, mml), (aging_ms, caching, bs, extra))| {
                let config = SchedulerConfig {
                    max_num_seqs: seqs,
                    max_num_batched_tokens: budget,
                    long_prefill_chunk: chunk,
                    max_model_len: mml,
                    aging: Duration::from_millis(aging_ms),
                    prefix_caching: caching,
                };
                (config, mml.div_ceil(bs) + extra, bs)
            },
        )
}

fn prompt_of(r: &Req, max_model_len: usize) -> Vec<u32> {
    let mut p: Vec<u32> = (0..r.base_len as u32)
        .map(|i| (i * 13 + r.base as u32 * 500) % 997)
        .collect();
    p.extend(&r.suffix);
    if p.is_empty() {
        p.push(1);
    }
    p.truncate(max_model_len - 1);
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn random_workloads_finish_within_limits(
        (config, num_blocks, block_size) in cfg(),
        reqs in prop::collection::vec(req(), 1..12),
    ) {
        let max_model_len = config.max_model_len;
        let mut sim = Sim::new(config, num_blocks, block_size);
        let mut step = 0;
        while step <= 30 || sim.sched.has_unfinished() {
            prop_assert!(step < 20_000, "workload did not finish");
            for (i, r) in reqs.iter().enumerate() {
                let id = i as RequestId;
                if r.arrives == step {
                    let mut q = SequenceRequest::new(id, prompt_of(r, max_model_len), r.max_tokens, sim.now);
                    q.priority = Priority::ALL[r.priority];
                    q.eos_token_ids = r.eos.into_iter().collect();
                    sim.add_request(q);
                }
                if r.abort_at == Some(step) && sim.sched.status(id).is_some() {
                    sim.abort(id);
                }
            }
            sim.step();
            step += 1;
        }
        prop_assert_eq!(sim.finished.len(), reqs.len());
        prop_assert_eq!(sim.sched.pool().num_free(), num_blocks);
        for (i, r) in reqs.iter().enumerate() {
            let done = &sim.finished[&(i as RequestId)];
            prop_assert!(done.generated.len() <= r.max_tokens);
        }
    }
}
