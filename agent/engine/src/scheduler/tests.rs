//! Unit tests that need the scheduler's internals: the pool is shrunk behind
//! its back to reach the "cannot fit even alone" path.

use std::time::{Duration, Instant};

use super::*;

fn scheduler() -> Scheduler {
    let config = SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
        long_prefill_chunk: 64,
        max_model_len: 16,
        aging: Duration::from_secs(1),
        prefix_caching: true,
    };
    Scheduler::new(config, 4, 4).expect("4 x 4 tokens hold max_model_len 16")
}

#[test]
fn waiting_request_that_cannot_fit_alone_is_given_up() {
    let mut s = scheduler();
    s.add(SequenceRequest::new(1, vec![1; 6], 8, Instant::now()))
        .expect("valid");
    let stolen = s.pool.allocate(3).expect("free");
    let out = s.schedule(Instant::now());
    assert!(out.scheduled.is_empty());
    let given_up = Finished {
        id: 1,
        reason: FinishReason::NoCapacity,
        generated: vec![],
    };
    assert_eq!(out.finished, vec![given_up]);
    assert!(!s.has_unfinished());
    assert_eq!(s.num_waiting_by_priority(), [0; 5]);
    s.pool.release(&stolen).expect("held");
    assert_eq!(s.pool.num_free(), 4);
    s.audit().expect("consistent");
}

#[test]
fn running_request_that_cannot_fit_alone_is_given_up() {
    let mut s = scheduler();
    s.add(SequenceRequest::new(1, vec![1; 4], 8, Instant::now()))
        .expect("valid");
    s.schedule(Instant::now());
    s.update(&[(1, 9)]).expect("valid");
    let stolen = s.pool.allocate(3).expect("free");
    let out = s.schedule(Instant::now()); // position 4 needs a second block
    assert!(out.scheduled.is_empty() && out.preempted.is_empty());
    let given_up = Finished {
        id: 1,
        reason: FinishReason::NoCapacity,
        generated: vec![9],
    };
    assert_eq!(out.finished, vec![given_up]);
    assert_eq!((s.num_running(), s.pool.num_referenced()), (0, 3));
    s.pool.release(&stolen).expect("held");
    s.audit().expect("consistent");
}
