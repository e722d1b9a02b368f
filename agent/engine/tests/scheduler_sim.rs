//! Scheduler behaviour driven by the fake backend in `common`: every step's
//! token windows, positions, block tables and budgets are checked there, and
//! the fake model samples from what it reads back through the block tables.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Sim, config, prompt};
use weir_engine::scheduler::{FinishReason, Priority, RequestId, SchedulerConfig, SequenceStatus};

/// 16 requests of mixed prompt lengths and output lengths.
fn workload() -> Vec<(RequestId, Vec<u32>, usize)> {
    let lens = [
        1, 3, 17, 40, 64, 65, 100, 150, 200, 5, 33, 250, 8, 120, 90, 16,
    ];
    lens.iter()
        .enumerate()
        .map(|(i, &len)| (i as RequestId, prompt(i as u32, len), 5 + (i * 7) % 36))
        .collect()
}

fn alone_outputs(work: &[(RequestId, Vec<u32>, usize)]) -> HashMap<RequestId, Vec<u32>> {
    let mut outputs = HashMap::new();
    for (id, p, max_tokens) in work {
        let mut sim = Sim::new(config(8, 4096, 4096, 512), 64, 16);
        sim.add(*id, p.clone(), *max_tokens, Priority::Normal);
        sim.run(1000);
        assert_eq!(sim.finished[id].reason, FinishReason::Length);
        outputs.insert(*id, sim.output(*id).to_vec());
    }
    outputs
}

#[test]
fn batched_outputs_equal_outputs_alone() {
    let work = workload();
    let alone = alone_outputs(&work);
    for caching in [true, false] {
        let mut cfg = config(6, 48, 20, 512);
        cfg.prefix_caching = caching;
        let mut sim = Sim::new(cfg, 160, 4);
        for (id, p, max_tokens) in &work {
            sim.add(*id, p.clone(), *max_tokens, Priority::ALL[*id as usize % 5]);
        }
        sim.run(5000);
        for (id, _, max_tokens) in &work {
            assert_eq!(
                sim.output(*id),
                alone[id],
                "request {id}, caching {caching}"
            );
            assert_eq!(sim.output(*id).len(), *max_tokens);
        }
        assert!(
            sim.steps.iter().any(|s| s.num_scheduled == 6),
            "the batch never filled up"
        );
    }
}

#[test]
fn shared_prefix_is_computed_once() {
    let base = prompt(1, 1000);
    let a = [base.clone(), prompt(2, 10)].concat();
    let b = [base.clone(), prompt(3, 20)].concat();
    let mut sim = Sim::new(config(8, 4096, 4096, 2048), 256, 16);
    sim.add(1, a, 5, Priority::Normal);
    sim.run(100);
    assert_eq!(
        sim.scheduled_tokens[&1],
        1010 + 4,
        "first request computes everything"
    );
    let hits_before = sim.sched.prefix_cache_hits();
    sim.add(2, b.clone(), 5, Priority::Normal);
    sim.run(100);
    // 62 full blocks (992 tokens) of the shared 1000 are reused.
    assert_eq!(sim.sched.prefix_cache_hits() - hits_before, 992);
    assert_eq!(
        sim.scheduled_tokens[&2],
        (1020 - 992) + 4,
        "only new tokens computed"
    );
    // Same output as without any cache.
    let mut cold = config(8, 4096, 4096, 2048);
    cold.prefix_caching = false;
    let mut reference = Sim::new(cold, 256, 16);
    reference.add(2, b, 5, Priority::Normal);
    reference.run(100);
    assert_eq!(sim.output(2), reference.output(2));
    assert_eq!(reference.scheduled_tokens[&2], 1020 + 4);
    // The second request's own blocks were cached after its hit: a third
    // request extending its prompt reuses all 63 of its full blocks.
    let c = [b_prompt(), prompt(4, 7)].concat();
    let hits_before = sim.sched.prefix_cache_hits();
    sim.add(3, c, 5, Priority::Normal);
    sim.run(100);
    assert_eq!(sim.sched.prefix_cache_hits() - hits_before, 63 * 16);
    assert_eq!(sim.scheduled_tokens[&3], (1027 - 1008) + 4);
}

fn b_prompt() -> Vec<u32> {
    [prompt(1, 1000), prompt(3, 20)].concat()
}

#[test]
fn running_sequences_share_prefix_blocks() {
    let base = prompt(5, 64);
    let mut sim = Sim::new(config(8, 4096, 4096, 256), 64, 16);
    sim.add(
        1,
        [base.clone(), vec![1, 2, 3]].concat(),
        20,
        Priority::Normal,
    );
    let first = sim.step();
    sim.add(2, [base.clone(), vec![4, 5]].concat(), 20, Priority::Normal);
    let out = sim.step();
    let table = |id| {
        &out.scheduled
            .iter()
            .find(|s| s.id == id)
            .expect("scheduled")
            .block_table
    };
    assert_eq!(
        table(2)[..4],
        first.scheduled[0].block_table[..4],
        "prefix blocks reused"
    );
    assert_eq!(
        out.scheduled.iter().find(|s| s.id == 2).map(|s| s.start),
        Some(64)
    );
    for &block in &table(2)[..4] {
        assert_eq!(sim.sched.pool().ref_count(block), Some(2));
    }
    assert_ne!(table(2)[4], table(1)[4], "tails are private");
    sim.run(100);
}

fn preemption_run(num_blocks: usize) -> (HashMap<RequestId, Vec<u32>>, u64) {
    let mut sim = Sim::new(config(8, 256, 64, 256), num_blocks, 4);
    for id in 0..8 {
        sim.add(
            id,
            prompt(id as u32 + 40, 30 + 10 * id as usize),
            60,
            Priority::ALL[id as usize % 5],
        );
    }
    sim.run(5000);
    let outputs = (0..8).map(|id| (id, sim.output(id).to_vec())).collect();
    (outputs, sim.sched.num_preemptions())
}

#[test]
fn preemption_recomputes_to_the_same_outputs() {
    let (roomy, roomy_preemptions) = preemption_run(1024);
    let (tight, tight_preemptions) = preemption_run(64);
    assert_eq!(roomy_preemptions, 0);
    assert!(
        tight_preemptions > 0,
        "the small pool should force preemptions"
    );
    assert_eq!(tight, roomy);
}

#[test]
fn chunked_prefill_stays_within_budget() {
    let mut sim = Sim::new(config(4, 64, 24, 1024), 256, 8);
    sim.add(1, prompt(1, 300), 3, Priority::Normal);
    sim.add(2, prompt(2, 200), 3, Priority::Normal);
    sim.add(3, prompt(3, 50), 3, Priority::Normal);
    sim.add(4, prompt(4, 10), 3, Priority::Normal);
    let mut first_sample = None;
    for step in 0..200 {
        let out = sim.step();
        if first_sample.is_none() && out.scheduled.iter().any(|s| s.id == 1 && s.samples) {
            first_sample = Some(step);
        }
        if !sim.sched.has_unfinished() {
            break;
        }
    }
    assert!(!sim.sched.has_unfinished());
    assert!(first_sample.expect("request 1 sampled") >= 300usize.div_ceil(24) - 1);
    assert!(sim.steps.iter().all(|s| s.batched_tokens <= 64));
    assert!(
        sim.steps.iter().any(|s| s.batched_tokens == 64),
        "budget never used fully"
    );
}

#[test]
fn max_num_seqs_caps_the_batch() {
    let mut sim = Sim::new(config(3, 1024, 1024, 256), 128, 4);
    for id in 0..20 {
        sim.add(id, prompt(id as u32, 5 + id as usize), 6, Priority::Normal);
    }
    sim.run(500);
    assert_eq!(sim.steps.iter().map(|s| s.num_scheduled).max(), Some(3));
    assert!(sim.steps.iter().all(|s| s.num_running <= 3));
    assert_eq!(sim.finished.len(), 20);
}

/// Steps under a steady overload of Critical requests; returns the step at
/// which the Background request finished, if it did.
fn background_under_critical_load(aging: Duration, steps: usize) -> Option<usize> {
    let cfg = SchedulerConfig {
        aging,
        ..config(2, 1024, 1024, 128)
    };
    let mut sim = Sim::new(cfg, 64, 4);
    for id in 2000..2004 {
        sim.add(id, prompt(id as u32, 8), 4, Priority::Critical);
    }
    sim.add(1000, prompt(9, 8), 4, Priority::Background);
    for step in 0..steps {
        sim.add(
            step as RequestId,
            prompt(step as u32, 8),
            4,
            Priority::Critical,
        );
        sim.step();
        if sim.finished.contains_key(&1000) {
            return Some(step);
        }
    }
    assert_eq!(sim.sched.status(1000), Some(SequenceStatus::Waiting));
    assert!(
        sim.sched.num_waiting_by_priority()[Priority::Critical.index()] > 10,
        "not overloaded"
    );
    None
}

#[test]
fn aging_lets_background_finish_under_critical_load() {
    // 10 ms steps, one class per 100 ms: Critical-equivalent after 40 steps.
    let finished = background_under_critical_load(Duration::from_millis(100), 300);
    assert!(finished.expect("background finished") <= 50);
    // Without effective aging it starves for the whole run.
    assert_eq!(
        background_under_critical_load(Duration::from_secs(3600), 300),
        None
    );
}

#[test]
fn abort_frees_blocks_at_once() {
    let mut sim = Sim::new(config(1, 1024, 1024, 256), 64, 4);
    sim.add(1, prompt(1, 50), 100, Priority::Normal);
    sim.add(2, prompt(2, 50), 100, Priority::Normal);
    sim.step();
    sim.step();
    assert_eq!(sim.sched.status(1), Some(SequenceStatus::Running));
    assert_eq!(sim.sched.pool().num_referenced(), 13);
    sim.abort(1);
    assert_eq!(sim.sched.pool().num_referenced(), 0);
    assert_eq!(sim.finished[&1].reason, FinishReason::Aborted);
    assert_eq!(sim.finished[&1].generated.len(), 2);
    sim.abort(2); // waiting
    assert_eq!(sim.sched.num_waiting(), 0);
    let out = sim.step();
    assert_eq!(out.aborted, vec![1, 2]);
    assert!(out.is_empty() && !sim.sched.has_unfinished());
    assert_eq!(sim.sched.pool().num_free(), 64);
}

#[test]
fn a_thousand_live_sequences() {
    let mut sim = Sim::new(config(1000, 4096, 512, 64), 4096, 16);
    for id in 0..1000 {
        sim.add(
            id,
            prompt(id as u32, 1 + id as usize % 20),
            8,
            Priority::ALL[id as usize % 5],
        );
    }
    sim.run(100);
    assert_eq!(sim.finished.len(), 1000);
    assert!(sim.steps.iter().any(|s| s.num_scheduled == 1000));
    assert_eq!(sim.sched.num_preemptions(), 0);
}
