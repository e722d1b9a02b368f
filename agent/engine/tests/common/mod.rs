//! A fake backend for scheduler tests: a KV "memory" of token slots addressed
//! through the block tables the scheduler hands out, and a deterministic fake
//! model that samples from what it reads back. Every step is checked: the
//! token window, positions, block coverage, budgets, and that every position
//! of the context reads back the token written there for this sequence.

#![allow(dead_code)] // each test binary uses part of the harness

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use weir_engine::scheduler::{
    Finished, Priority, RequestId, Scheduler, SchedulerConfig, SchedulerOutput, SequenceRequest,
};

/// Token ids the fake model produces are below this.
pub const VOCAB: u64 = 1000;

/// Next token from the whole context (FNV-1a over the token ids).
pub fn fake_model(context: &[u32]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &t in context {
        h = (h ^ u64::from(t)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % VOCAB) as u32
}

/// Per-step numbers, for assertions after a run.
#[derive(Clone, Debug)]
pub struct StepStats {
    pub batched_tokens: usize,
    pub num_scheduled: usize,
    pub num_running: usize,
    pub preempted: usize,
}

pub struct Sim {
    pub sched: Scheduler,
    pub now: Instant,
    pub step_time: Duration,
    block_size: usize,
    /// (token, position) written in each slot of each block.
    kv: Vec<Option<(u32, usize)>>,
    /// What each live request's tokens must be: prompt, then sampled tokens.
    mirror: HashMap<RequestId, Vec<u32>>,
    prompt_len: HashMap<RequestId, usize>,
    /// Computed tokens per live request as the harness knows them; `None`
    /// while waiting (the scheduler may then start from a cached prefix).
    computed: HashMap<RequestId, Option<usize>>,
    pub finished: HashMap<RequestId, Finished>,
    /// Tokens scheduled per request over its life.
    pub scheduled_tokens: HashMap<RequestId, usize>,
    pub steps: Vec<StepStats>,
}

pub fn request(
    id: RequestId,
    prompt: Vec<u32>,
    max_tokens: usize,
    arrival: Instant,
) -> SequenceRequest {
    SequenceRequest::new(id, prompt, max_tokens, arrival)
}

pub fn with_priority(mut req: SequenceRequest, priority: Priority) -> SequenceRequest {
    req.priority = priority;
    req
}

/// A prompt of `len` tokens seeded by `seed`.
pub fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed.wrapping_mul(7919) + i * 31) % 997)
        .collect()
}

impl Sim {
    pub fn new(config: SchedulerConfig, num_blocks: usize, block_size: usize) -> Sim {
        let sched = Scheduler::new(config, num_blocks, block_size).expect("valid scheduler");
        Sim {
            sched,
            now: Instant::now(),
            step_time: Duration::from_millis(10),
            block_size,
            kv: vec![None; num_blocks * block_size],
            mirror: HashMap::new(),
            prompt_len: HashMap::new(),
            computed: HashMap::new(),
            finished: HashMap::new(),
            scheduled_tokens: HashMap::new(),
            steps: Vec::new(),
        }
    }

    /// Queues a request arriving now.
    pub fn add(&mut self, id: RequestId, prompt: Vec<u32>, max_tokens: usize, priority: Priority) {
        let req = with_priority(request(id, prompt, max_tokens, self.now), priority);
        self.add_request(req);
    }

    pub fn add_request(&mut self, req: SequenceRequest) {
        self.mirror.insert(req.id, req.prompt.clone());
        self.prompt_len.insert(req.id, req.prompt.len());
        self.computed.insert(req.id, None);
        self.sched.add(req).expect("valid request");
    }

    /// Aborts a live request and checks the ending.
    pub fn abort(&mut self, id: RequestId) {
        let done = self.sched.abort(id).expect("live request");
        self.forget(id, &done);
        self.finished.insert(id, done);
    }

    fn forget(&mut self, id: RequestId, done: &Finished) {
        let mirror = self.mirror.remove(&id).expect("live request");
        assert_eq!(
            done.generated,
            mirror[self.prompt_len[&id]..],
            "generated tokens of {id}"
        );
        self.computed.remove(&id);
    }

    fn slot(&self, table: &[u32], pos: usize) -> usize {
        let block = table[pos / self.block_size] as usize;
        block * self.block_size + pos % self.block_size
    }

    /// Checks one scheduled sequence and writes its tokens into the KV slots.
    fn check_and_write(&mut self, s: &weir_engine::scheduler::ScheduledSeq) {
        let cfg = self.sched.config().clone();
        let m = &self.mirror[&s.id];
        let (start, end) = (s.start, s.start + s.tokens.len());
        assert!(
            !s.tokens.is_empty() && s.tokens.len() <= cfg.long_prefill_chunk,
            "chunk of {}",
            s.id
        );
        match self.computed[&s.id] {
            Some(c) => assert_eq!(start, c, "request {} resumes at the wrong position", s.id),
            None => assert_eq!(
                start % self.block_size,
                0,
                "a cached prefix is whole blocks"
            ),
        }
        assert_eq!(
            s.tokens,
            m[start..end],
            "request {} got the wrong token window",
            s.id
        );
        assert_eq!(s.samples, end == m.len(), "request {} samples flag", s.id);
        assert!(
            s.block_table.len() * self.block_size >= end,
            "block table too short"
        );
        for (pos, &token) in (start..end).zip(&s.tokens) {
            let block = s.block_table[pos / self.block_size];
            let refs = self.sched.pool().ref_count(block);
            assert_eq!(refs, Some(1), "write into shared block {block}");
            let slot = self.slot(&s.block_table, pos);
            self.kv[slot] = Some((token, pos));
        }
    }

    /// Reads the whole context back through the block table and samples.
    fn read_and_sample(&self, s: &weir_engine::scheduler::ScheduledSeq) -> u32 {
        let m = &self.mirror[&s.id];
        let mut context = Vec::with_capacity(m.len());
        for (pos, &want) in m.iter().enumerate() {
            let got = self.kv[self.slot(&s.block_table, pos)];
            assert_eq!(
                got,
                Some((want, pos)),
                "request {} reads a corrupt KV slot",
                s.id
            );
            context.push(got.map_or(0, |(t, _)| t));
        }
        fake_model(&context)
    }

    /// Runs one schedule/execute/update step with every check; returns the plan.
    pub fn step(&mut self) -> SchedulerOutput {
        let out = self.sched.schedule(self.now);
        let cfg = self.sched.config().clone();
        assert!(
            out.num_batched_tokens() <= cfg.max_num_batched_tokens,
            "token budget exceeded"
        );
        assert!(
            out.scheduled.len() <= cfg.max_num_seqs,
            "too many sequences scheduled"
        );
        assert!(
            self.sched.num_running() <= cfg.max_num_seqs,
            "too many sequences running"
        );
        let ids: HashSet<_> = out.scheduled.iter().map(|s| s.id).collect();
        assert_eq!(ids.len(), out.scheduled.len(), "a sequence scheduled twice");
        for id in &out.preempted {
            assert!(!ids.contains(id), "preempted request {id} is scheduled");
            self.computed.insert(*id, None);
        }
        for done in &out.finished {
            self.forget(done.id, done);
            self.finished.insert(done.id, done.clone());
        }
        for s in &out.scheduled {
            self.check_and_write(s);
        }
        let mut sampled = Vec::new();
        for s in &out.scheduled {
            *self.scheduled_tokens.entry(s.id).or_default() += s.tokens.len();
            self.computed.insert(s.id, Some(s.start + s.tokens.len()));
            if s.samples {
                sampled.push((s.id, self.read_and_sample(s)));
            }
        }
        self.sched
            .audit()
            .expect("scheduler bookkeeping after schedule");
        for &(id, token) in &sampled {
            self.mirror.get_mut(&id).expect("live").push(token);
        }
        for done in self.sched.update(&sampled).expect("valid samples") {
            self.forget(done.id, &done);
            self.finished.insert(done.id, done);
        }
        self.sched
            .audit()
            .expect("scheduler bookkeeping after update");
        self.steps.push(StepStats {
            batched_tokens: out.num_batched_tokens(),
            num_scheduled: out.scheduled.len(),
            num_running: self.sched.num_running(),
            preempted: out.preempted.len(),
        });
        self.now += self.step_time;
        out
    }

    /// Steps until nothing is live; fails past `max_steps`.
    pub fn run(&mut self, max_steps: usize) {
        let mut n = 0;
        while self.sched.has_unfinished() {
            assert!(n < max_steps, "not finished after {max_steps} steps");
            self.step();
            n += 1;
        }
        assert_eq!(
            self.sched.pool().num_free(),
            self.sched.pool().num_blocks(),
            "blocks leaked"
        );
    }

    /// Generated tokens of a finished request.
    pub fn output(&self, id: RequestId) -> &[u32] {
        &self.finished[&id].generated
    }
}

/// A config with small limits for tests.
pub fn config(
    max_num_seqs: usize,
    budget: usize,
    chunk: usize,
    max_model_len: usize,
) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs,
        max_num_batched_tokens: budget,
        long_prefill_chunk: chunk,
        max_model_len,
        aging: Duration::from_secs(1),
        prefix_caching: true,
    }
}
