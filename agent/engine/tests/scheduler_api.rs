//! Scheduler API contracts driven by hand: input validation, stop
//! conditions, `update` validation, ordering and preemption choice.

use std::time::{Duration, Instant};

use weir_engine::kv_pool::KvPoolError;
use weir_engine::scheduler::{
    FinishReason, Finished, Priority, RequestId, Scheduler, SchedulerConfig, SchedulerError,
    SequenceRequest, SequenceStatus,
};

fn cfg(max_model_len: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 256,
        long_prefill_chunk: 256,
        max_model_len,
        aging: Duration::from_secs(1),
        prefix_caching: true,
    }
}

fn sched(max_model_len: usize) -> Scheduler {
    Scheduler::new(cfg(max_model_len), 64, 4).expect("valid")
}

fn req(id: RequestId, len: usize, max_tokens: usize, t: Instant) -> SequenceRequest {
    SequenceRequest::new(id, (1..=len as u32).collect(), max_tokens, t)
}

/// Steps until `id` ends, sampling `tokens` in turn (then 1s) for every
/// sequence that samples.
fn drive(s: &mut Scheduler, id: RequestId, tokens: &[u32]) -> Finished {
    let mut next = tokens.iter().copied().chain(std::iter::repeat(1));
    for _ in 0..100 {
        let out = s.schedule(Instant::now());
        let due = out.scheduled.iter().filter(|q| q.samples);
        let sampled: Vec<_> = due.map(|q| (q.id, next.next().unwrap_or(1))).collect();
        if let Some(done) = s
            .update(&sampled)
            .expect("valid")
            .into_iter()
            .find(|f| f.id == id)
        {
            return done;
        }
    }
    panic!("request {id} did not finish");
}

#[test]
fn config_and_pool_are_validated() {
    let base = cfg(64);
    let cases = [
        SchedulerConfig {
            max_num_seqs: 0,
            ..base.clone()
        },
        SchedulerConfig {
            max_num_batched_tokens: 0,
            ..base.clone()
        },
        SchedulerConfig {
            long_prefill_chunk: 0,
            ..base.clone()
        },
        SchedulerConfig {
            max_model_len: 1,
            ..base.clone()
        },
        SchedulerConfig {
            aging: Duration::ZERO,
            ..base.clone()
        },
    ];
    for c in cases {
        assert!(
            matches!(c.validate(), Err(SchedulerError::InvalidConfig(_))),
            "{c:?}"
        );
        assert!(matches!(
            Scheduler::new(c, 64, 4),
            Err(SchedulerError::InvalidConfig(_))
        ));
    }
    assert_eq!(base.validate(), Ok(()));
    assert!(SchedulerConfig::default().validate().is_ok());
    let err = Scheduler::new(base.clone(), 15, 4).expect_err("15 x 4 < 64");
    assert_eq!(
        err,
        SchedulerError::PoolTooSmall {
            num_blocks: 15,
            block_size: 4,
            max_model_len: 64
        }
    );
    assert!(err.to_string().contains("15 blocks x 4 tokens"));
    assert!(Scheduler::new(base.clone(), 16, 4).is_ok());
    assert!(matches!(
        Scheduler::new(base, 16, 0),
        Err(SchedulerError::Pool(KvPoolError::InvalidConfig(_)))
    ));
}

#[test]
fn bad_requests_are_rejected() {
    let t = Instant::now();
    let mut s = sched(8);
    assert_eq!(s.add(req(1, 0, 4, t)), Err(SchedulerError::EmptyPrompt(1)));
    assert_eq!(
        s.add(req(1, 3, 0, t)),
        Err(SchedulerError::ZeroMaxTokens(1))
    );
    let err = s.add(req(1, 8, 4, t)).expect_err("too long");
    assert_eq!(
        err.to_string(),
        "request 1: prompt of 8 tokens leaves no room in a context of 8"
    );
    s.add(req(1, 7, 4, t)).expect("fits");
    assert_eq!(
        s.add(req(1, 2, 4, t)),
        Err(SchedulerError::DuplicateRequest(1))
    );
    assert_eq!((s.num_waiting(), s.num_running()), (1, 0));
    // Once it has ended, the id can be used again.
    assert_eq!(drive(&mut s, 1, &[]).reason, FinishReason::ContextLength);
    s.add(req(1, 2, 4, t)).expect("id free again");
}

#[test]
fn stop_conditions() {
    let t = Instant::now();
    let mut s = sched(64);
    let mut eos = req(1, 5, 10, t);
    eos.eos_token_ids = vec![7];
    s.add(eos.clone()).expect("valid");
    let done = drive(&mut s, 1, &[5, 7, 9]);
    assert_eq!(
        (done.reason, done.generated),
        (FinishReason::Stop(7), vec![5, 7])
    );

    eos.ignore_eos = true;
    eos.max_tokens = 3;
    s.add(eos.clone()).expect("valid");
    let done = drive(&mut s, 1, &[7, 7, 7, 7]);
    assert_eq!(
        (done.reason, done.generated),
        (FinishReason::Length, vec![7, 7, 7])
    );

    eos.stop_token_ids = vec![9];
    eos.max_tokens = 10;
    s.add(eos).expect("valid");
    let done = drive(&mut s, 1, &[7, 9, 7]);
    assert_eq!(
        (done.reason, done.generated),
        (FinishReason::Stop(9), vec![7, 9]),
        "stop ids ignore ignore_eos"
    );

    let mut s = sched(8);
    s.add(req(2, 5, 100, t)).expect("valid");
    let done = drive(&mut s, 2, &[3, 3, 3, 3]);
    assert_eq!(
        (done.reason, done.generated.len()),
        (FinishReason::ContextLength, 3)
    );
    assert_eq!(
        s.pool().num_free(),
        s.pool().num_blocks(),
        "blocks freed on finish"
    );
}

#[test]
fn finish_from_outside_frees_and_reports() {
    let mut s = sched(64);
    s.add(req(1, 9, 10, Instant::now())).expect("valid");
    let out = s.schedule(Instant::now());
    s.update(&[(1, 4)]).expect("valid");
    assert!(s.pool().num_referenced() > 0 && out.scheduled[0].samples);
    let done = s.finish(1, FinishReason::StopString).expect("live");
    assert_eq!(
        (done.reason, done.generated),
        (FinishReason::StopString, vec![4])
    );
    assert_eq!(s.pool().num_referenced(), 0);
    assert_eq!(
        s.finish(1, FinishReason::StopString),
        Err(SchedulerError::UnknownRequest(1))
    );
    assert_eq!(s.abort(1), Err(SchedulerError::UnknownRequest(1)));
    assert_eq!(s.schedule(Instant::now()).aborted, vec![1]);
}

#[test]
fn update_rejects_wrong_samples_and_changes_nothing() {
    let t = Instant::now();
    let mut cfg = cfg(64);
    cfg.long_prefill_chunk = 4;
    let mut s = Scheduler::new(cfg, 64, 4).expect("valid");
    s.add(req(1, 3, 5, t)).expect("valid");
    s.add(req(2, 10, 5, t)).expect("valid"); // 10 > chunk: no sample this step
    let out = s.schedule(t);
    assert_eq!(
        out.scheduled.iter().map(|q| q.samples).collect::<Vec<_>>(),
        vec![true, false]
    );
    assert_eq!(s.update(&[]), Err(SchedulerError::MissingSample(1)));
    assert_eq!(
        s.update(&[(1, 3), (2, 3)]),
        Err(SchedulerError::UnexpectedSample(2))
    );
    assert_eq!(
        s.update(&[(1, 3), (1, 4)]),
        Err(SchedulerError::DuplicateSample(1))
    );
    assert_eq!(
        s.update(&[(1, 3), (9, 4)]),
        Err(SchedulerError::UnexpectedSample(9))
    );
    assert_eq!(
        s.num_computed_tokens(1),
        Some(0),
        "failed updates applied nothing"
    );
    assert_eq!(s.update(&[(1, 3)]), Ok(vec![]));
    assert_eq!(
        (s.num_computed_tokens(1), s.num_computed_tokens(2)),
        (Some(3), Some(4))
    );
    assert_eq!(
        s.update(&[(1, 3)]),
        Err(SchedulerError::UnexpectedSample(1)),
        "step already applied"
    );
}

#[test]
fn abort_between_schedule_and_update_is_tolerated() {
    let mut s = sched(64);
    s.add(req(1, 3, 5, Instant::now())).expect("valid");
    s.add(req(2, 3, 5, Instant::now())).expect("valid");
    let out = s.schedule(Instant::now());
    assert_eq!(out.scheduled.len(), 2);
    s.abort(1).expect("live");
    assert_eq!(s.update(&[(1, 8), (2, 8)]), Ok(vec![]));
    assert_eq!(s.status(1), None);
    assert_eq!(s.num_computed_tokens(2), Some(3));
    s.audit().expect("consistent");
}

#[test]
fn schedule_without_update_replans_the_same_tokens() {
    let mut s = sched(64);
    s.add(req(1, 6, 5, Instant::now())).expect("valid");
    let first = s.schedule(Instant::now());
    let again = s.schedule(Instant::now());
    assert_eq!(first.scheduled, again.scheduled);
    assert_eq!(s.update(&[(1, 2)]), Ok(vec![]));
    assert_eq!(s.num_computed_tokens(1), Some(6));
}

fn first_admitted(reqs: &[(RequestId, Priority, u64)], now_ms: u64) -> RequestId {
    let t0 = Instant::now();
    let mut cfg = cfg(64);
    cfg.max_num_seqs = 1;
    let mut s = Scheduler::new(cfg, 64, 4).expect("valid");
    for &(id, p, at) in reqs {
        let mut r = req(id, 3, 5, t0 + Duration::from_millis(at));
        r.priority = p;
        s.add(r).expect("valid");
    }
    let out = s.schedule(t0 + Duration::from_millis(now_ms));
    assert_eq!(out.scheduled.len(), 1);
    out.scheduled[0].id
}

#[test]
fn waiting_requests_go_by_effective_priority_then_arrival() {
    use Priority::*;
    assert_eq!(
        first_admitted(&[(1, Low, 0), (2, Critical, 1), (3, Normal, 2)], 5),
        2
    );
    assert_eq!(first_admitted(&[(1, Normal, 0), (2, Normal, 1)], 5), 1);
    // Aging, one class per second: Low waited 2 s and now counts as High.
    assert_eq!(first_admitted(&[(1, Low, 0), (2, Normal, 100)], 200), 2);
    assert_eq!(first_admitted(&[(1, Low, 0), (2, Normal, 100)], 2000), 1);
    assert_eq!(
        first_admitted(&[(1, Background, 0), (2, Critical, 3000)], 4000),
        1
    );
}

#[test]
fn waiting_counts_by_priority() {
    let mut s = sched(64);
    for (id, p) in [
        (1, Priority::Low),
        (2, Priority::Low),
        (3, Priority::Critical),
    ] {
        let mut r = req(id, 3, 5, Instant::now());
        r.priority = p;
        s.add(r).expect("valid");
    }
    assert_eq!(s.num_waiting_by_priority(), [1, 0, 0, 2, 0]);
    s.abort(2).expect("live");
    assert_eq!(s.num_waiting_by_priority(), [1, 0, 0, 1, 0]);
    s.schedule(Instant::now());
    assert_eq!(s.num_waiting_by_priority(), [0; 5]);
    assert_eq!(s.num_running(), 2);
}

#[test]
fn preemption_picks_the_least_urgent_running_sequence() {
    let t0 = Instant::now();
    let mut cfg = cfg(16);
    cfg.prefix_caching = false;
    let mut s = Scheduler::new(cfg, 8, 2).expect("valid");
    // The Background request arrives and runs first; then a Critical one.
    let mut b = SequenceRequest::new(1, (0..7).collect(), 8, t0);
    b.priority = Priority::Background;
    s.add(b).expect("valid");
    s.schedule(t0); // prefill: 4 blocks
    s.update(&[(1, 0)]).expect("valid");
    let mut a = SequenceRequest::new(2, (10..17).collect(), 8, t0 + Duration::from_millis(1));
    a.priority = Priority::Critical;
    s.add(a).expect("valid");
    let now = t0 + Duration::from_millis(2);
    let out = s.schedule(now); // b decodes in its 4th block, a takes the other 4
    assert_eq!(
        out.scheduled.iter().map(|q| q.id).collect::<Vec<_>>(),
        vec![1, 2]
    );
    s.update(&[(1, 0), (2, 0)]).expect("valid");
    assert_eq!(s.kv_usage(), 1.0);
    // Both need a fifth block now: the Background one goes, though it came first.
    let out = s.schedule(now);
    assert_eq!(out.preempted, vec![1]);
    assert_eq!(
        out.scheduled.iter().map(|q| q.id).collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(
        (s.status(1), s.num_preemptions()),
        (Some(SequenceStatus::Waiting), 1)
    );
    assert_eq!(s.num_computed_tokens(1), Some(0));
    s.update(&[(2, 0)]).expect("valid");
    s.audit().expect("consistent");
}

#[test]
fn the_most_urgent_running_sequence_gets_the_budget_first() {
    let t0 = Instant::now();
    let mut cfg = cfg(64);
    cfg.max_num_batched_tokens = 4;
    let mut s = Scheduler::new(cfg, 64, 4).expect("valid");
    let mut low = SequenceRequest::new(1, vec![1; 4], 8, t0);
    low.priority = Priority::Low;
    s.add(low).expect("valid");
    s.schedule(t0);
    s.update(&[(1, 0)]).expect("valid");
    let mut high = SequenceRequest::new(2, vec![2; 10], 8, t0);
    high.priority = Priority::High;
    s.add(high).expect("valid");
    s.schedule(t0); // low decodes (1 token), high gets a 3-token chunk
    s.update(&[(1, 0)]).expect("valid");
    let out = s.schedule(t0); // high's next chunk comes first and takes it all
    assert_eq!(
        out.scheduled
            .iter()
            .map(|q| (q.id, q.tokens.len()))
            .collect::<Vec<_>>(),
        vec![(2, 4)]
    );
}
