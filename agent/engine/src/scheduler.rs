//! Iteration-level continuous batching: which sequences take part in each
//! model step, which of their tokens are computed, and which KV blocks hold
//! them. Owns the [`KvBlockPool`].
//!
//! The interface is two calls per step: [`Scheduler::schedule`] plans a step,
//! the backend runs it, and [`Scheduler::update`] takes the sampled tokens.
//! A sequence only tracks how many of its tokens are computed, so prefill,
//! chunked prefill, decode and recomputation after preemption are one thing:
//! compute the next tokens that are not computed yet.

mod inspect;
mod types;

use std::collections::HashMap;
use std::time::Instant;

pub use types::{
    FinishReason, Finished, Priority, RequestId, ScheduledSeq, SchedulerConfig, SchedulerError,
    SchedulerOutput, SequenceRequest, SequenceStatus,
};

use crate::kv_pool::{BlockId, KvBlockPool};

/// A live request and its progress.
#[derive(Debug)]
struct Sequence {
    priority: Priority,
    arrival: Instant,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    stop_token_ids: Vec<u32>,
    eos_token_ids: Vec<u32>,
    ignore_eos: bool,
    status: SequenceStatus,
    /// Leading tokens whose KV is in `blocks`.
    num_computed: usize,
    /// One reference to each block; position `p` is in `blocks[p / block_size]`.
    blocks: Vec<BlockId>,
    /// Leading blocks registered with the prefix cache (or found in it).
    num_registered: usize,
    /// Whether it may start from cached prefix blocks.
    reuse_prefix: bool,
}

impl Sequence {
    /// Ordering key: effective class (aged), then arrival, then id. Smaller
    /// is more urgent.
    fn key(
        &self,
        id: RequestId,
        now: Instant,
        cfg: &SchedulerConfig,
    ) -> (usize, Instant, RequestId) {
        let waited = now.saturating_duration_since(self.arrival).as_nanos();
        let classes_gained = waited / cfg.aging.as_nanos().max(1);
        let gained = usize::try_from(classes_gained).unwrap_or(usize::MAX);
        (
            self.priority.index().saturating_sub(gained),
            self.arrival,
            id,
        )
    }

    /// Why the sequence ends after sampling `token`, if it does.
    fn stop_reason(&self, token: u32, max_model_len: usize) -> Option<FinishReason> {
        let eos = !self.ignore_eos && self.eos_token_ids.contains(&token);
        if eos || self.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop(token))
        } else if self.tokens.len() - self.prompt_len >= self.max_tokens {
            Some(FinishReason::Length)
        } else if self.tokens.len() >= max_model_len {
            Some(FinishReason::ContextLength)
        } else {
            None
        }
    }
}

/// Work planned in the last `schedule` and not yet applied by `update`.
#[derive(Clone, Copy, Debug)]
struct Planned {
    id: RequestId,
    num_tokens: usize,
    samples: bool,
}

/// Continuous-batching scheduler over a paged KV block pool.
///
/// Each [`schedule`](Self::schedule) first serves running sequences, most
/// urgent first (a decode token each, or the next prefill chunk), then admits
/// waiting ones in order of effective priority, within `max_num_seqs` and the
/// step's token budget. A new sequence starts from the longest cached prefix
/// of its tokens, so a shared prompt prefix is computed once. When a running
/// sequence needs a block and none is free, the least urgent running
/// sequence (lowest effective class, latest arrival) is preempted: its blocks
/// are freed and it goes back to waiting, to be recomputed later.
///
/// # Guarantees
///
/// - Every added request ends, through `update` (stop, length, context
///   length), `abort` or `finish`, provided `schedule` and `update` keep being
///   called: the most urgent running sequence is served first and is never
///   preempted for another, and aging makes every request the most urgent
///   one eventually, so a `Background` request also finishes under a steady
///   stream of `Critical` ones.
/// - A step never computes more than `max_num_batched_tokens` tokens nor more
///   than `long_prefill_chunk` of one sequence, and never more than
///   `max_num_seqs` sequences run.
/// - Each scheduled sequence gets exactly its next uncomputed tokens and a
///   block table covering them; it never writes into a block it shares.
/// - The blocks of an ended or aborted request are free when the call that
///   ended it returns; when nothing is live, every block is free.
/// - No livelock: `new` refuses a pool that cannot hold one sequence of
///   `max_model_len` tokens, and a sequence that still cannot fit alone ends
///   with [`FinishReason::NoCapacity`] instead of being retried forever.
///
/// # Assumptions
///
/// - Calls alternate: `schedule`, run the step, `update` with one token for
///   each sequence that `samples`. Calling `schedule` again without `update`
///   drops the previous plan (its tokens count as not computed).
/// - `now` passed to `schedule` does not go backwards and arrivals are on the
///   same clock; only differences matter, so tests may use a fake clock.
/// - Stop strings are matched by the engine, which calls `finish`.
///
/// # Caveats
///
/// - Preemption recomputes: the preempted sequence's KV is dropped (its full
///   blocks may still be found in the prefix cache when it comes back).
/// - A waiting request never preempts running ones, whatever its priority; it
///   waits for seats and blocks to free up, and admission stops at the first
///   request that does not fit, so small requests do not overtake it.
/// - No waiting request is admitted in a step that preempted, to avoid
///   admitting work that would be preempted again at once.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    pool: KvBlockPool,
    seqs: HashMap<RequestId, Sequence>,
    running: Vec<RequestId>,
    waiting: Vec<RequestId>,
    waiting_by_class: [usize; 5],
    pending: Vec<Planned>,
    /// Requests ended outside `update` since the last `schedule`.
    aborted: Vec<RequestId>,
    num_preemptions: u64,
}

impl Scheduler {
    /// A scheduler with a pool of `num_blocks` blocks of `block_size` tokens.
    ///
    /// Fails on an invalid config or a pool that cannot hold one sequence of
    /// `max_model_len` tokens.
    pub fn new(
        config: SchedulerConfig,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, SchedulerError> {
        config.validate()?;
        let pool = KvBlockPool::new(num_blocks, block_size, config.prefix_caching)?;
        if num_blocks.saturating_mul(block_size) < config.max_model_len {
            return Err(SchedulerError::PoolTooSmall {
                num_blocks,
                block_size,
                max_model_len: config.max_model_len,
            });
        }
        Ok(Self {
            config,
            pool,
            seqs: HashMap::new(),
            running: Vec::new(),
            waiting: Vec::new(),
            waiting_by_class: [0; 5],
            pending: Vec::new(),
            aborted: Vec::new(),
            num_preemptions: 0,
        })
    }

    /// Queues a request.
    ///
    /// Fails on an empty prompt, `max_tokens` 0, a prompt of `max_model_len`
    /// tokens or more, or an id already queued or running.
    pub fn add(&mut self, req: SequenceRequest) -> Result<(), SchedulerError> {
        self.insert(req, true)
    }

    /// As [`add`](Self::add), but the sequence never starts from cached
    /// prefix blocks: every one of its positions is computed in its own
    /// steps (what prompt log probabilities need). Its full blocks are
    /// still registered for others to reuse.
    pub fn add_computing_all(&mut self, req: SequenceRequest) -> Result<(), SchedulerError> {
        self.insert(req, false)
    }

    fn insert(&mut self, req: SequenceRequest, reuse_prefix: bool) -> Result<(), SchedulerError> {
        let id = req.id;
        if req.prompt.is_empty() {
            return Err(SchedulerError::EmptyPrompt(id));
        }
        if req.max_tokens == 0 {
            return Err(SchedulerError::ZeroMaxTokens(id));
        }
        let max_model_len = self.config.max_model_len;
        if req.prompt.len() >= max_model_len {
            let prompt_len = req.prompt.len();
            return Err(SchedulerError::PromptTooLong {
                id,
                prompt_len,
                max_model_len,
            });
        }
        if self.seqs.contains_key(&id) {
            return Err(SchedulerError::DuplicateRequest(id));
        }
        let seq = Sequence {
            priority: req.priority,
            arrival: req.arrival,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            max_tokens: req.max_tokens,
            stop_token_ids: req.stop_token_ids,
            eos_token_ids: req.eos_token_ids,
            ignore_eos: req.ignore_eos,
            status: SequenceStatus::Waiting,
            num_computed: 0,
            blocks: Vec::new(),
            num_registered: 0,
            reuse_prefix,
        };
        self.waiting_by_class[seq.priority.index()] += 1;
        self.seqs.insert(id, seq);
        self.waiting.push(id);
        Ok(())
    }

    /// Plans the next model step at time `now`.
    pub fn schedule(&mut self, now: Instant) -> SchedulerOutput {
        self.pending.clear();
        let mut out = SchedulerOutput {
            aborted: std::mem::take(&mut self.aborted),
            ..SchedulerOutput::default()
        };
        let mut budget = self.config.max_num_batched_tokens;
        self.sort_by_urgency(now, true);
        self.schedule_running(&mut budget, &mut out);
        if out.preempted.is_empty() {
            self.schedule_waiting(now, &mut budget, &mut out);
        }
        out
    }

    /// Sorts the running (or waiting) ids, most urgent first.
    fn sort_by_urgency(&mut self, now: Instant, running: bool) {
        let (seqs, cfg) = (&self.seqs, &self.config);
        let ids = if running {
            &mut self.running
        } else {
            &mut self.waiting
        };
        ids.sort_by_cached_key(|id| seqs.get(id).map(|s| s.key(*id, now, cfg)));
    }

    fn seq(&self, id: RequestId) -> &Sequence {
        self.seqs
            .get(&id)
            .expect("running and waiting ids always have a sequence")
    }

    fn seq_mut(&mut self, id: RequestId) -> &mut Sequence {
        self.seqs
            .get_mut(&id)
            .expect("running and waiting ids always have a sequence")
    }

    /// Tokens `id` would compute this step, starting after `skip` tokens.
    fn step_tokens(&self, id: RequestId, skip: usize, budget: usize) -> usize {
        let left = self.seq(id).tokens.len() - skip;
        left.min(self.config.long_prefill_chunk).min(budget)
    }

    /// Blocks a sequence holding `held` blocks needs to cover `tokens` tokens.
    fn blocks_needed(&self, tokens: usize, held: usize) -> usize {
        tokens.div_ceil(self.pool.block_size()).saturating_sub(held)
    }

    fn schedule_running(&mut self, budget: &mut usize, out: &mut SchedulerOutput) {
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let id = self.running[i];
            let seq = self.seq(id);
            let n = self.step_tokens(id, seq.num_computed, *budget);
            let need = self.blocks_needed(seq.num_computed + n, seq.blocks.len());
            // Out of blocks: preempt from the least urgent end until it fits.
            while need > self.pool.num_free() {
                let Some(victim) = self.running.pop() else {
                    return;
                };
                if victim != id {
                    self.preempt(victim, out);
                } else if self.running.is_empty() {
                    self.give_up(id, out);
                    return;
                } else {
                    self.preempt(id, out);
                    return;
                }
            }
            match self.pool.allocate(need) {
                Ok(blocks) => self.seq_mut(id).blocks.extend(blocks),
                Err(_) => return, // unreachable: `need` blocks are free
            }
            self.plan(id, n, budget, out);
            i += 1;
        }
    }

    fn schedule_waiting(&mut self, now: Instant, budget: &mut usize, out: &mut SchedulerOutput) {
        if self.waiting.is_empty() || self.running.len() >= self.config.max_num_seqs {
            return;
        }
        self.sort_by_urgency(now, false);
        let mut taken = 0;
        while taken < self.waiting.len()
            && *budget > 0
            && self.running.len() < self.config.max_num_seqs
        {
            let id = self.waiting[taken];
            let class = self.seq(id).priority.index();
            if let Some(n) = self.admit(id, *budget) {
                self.running.push(id);
                self.plan(id, n, budget, out);
            } else if self.running.is_empty() {
                self.give_up(id, out);
            } else {
                break; // strict order: nothing overtakes a request that does not fit
            }
            self.waiting_by_class[class] -= 1;
            taken += 1;
        }
        self.waiting.drain(..taken);
    }

    /// Gives a waiting sequence its cached prefix and the blocks for its first
    /// chunk and returns the chunk's length, if they fit; otherwise changes
    /// nothing.
    fn admit(&mut self, id: RequestId, budget: usize) -> Option<usize> {
        let bs = self.pool.block_size();
        let reuse = self.seq(id).reuse_prefix;
        let probe = if reuse {
            self.pool.probe_cached_prefix(&self.seq(id).tokens)
        } else {
            Default::default()
        };
        let cached = probe.num_blocks * bs;
        let n = self.step_tokens(id, cached, budget);
        let need = self.blocks_needed(cached + n, probe.num_blocks);
        if need > self.pool.num_free().saturating_sub(probe.num_free) {
            return None;
        }
        let seq = self
            .seqs
            .get_mut(&id)
            .expect("waiting ids always have a sequence");
        let mut blocks = if reuse {
            self.pool.acquire_cached_prefix(&seq.tokens).blocks
        } else {
            Vec::new()
        };
        let num_cached = blocks.len();
        match self.pool.allocate(need) {
            Ok(more) if num_cached == probe.num_blocks => blocks.extend(more),
            result => {
                // unreachable (probe and acquire agree; `need` blocks are free):
                // undo and stay queued
                let more = result.unwrap_or_default();
                self.pool
                    .release(&more)
                    .expect("these blocks were just allocated");
                self.pool
                    .release(&blocks)
                    .expect("the prefix blocks were just acquired");
                return None;
            }
        }
        seq.num_registered = num_cached;
        seq.num_computed = num_cached * bs;
        seq.blocks = blocks;
        seq.status = SequenceStatus::Running;
        Some(n)
    }

    /// Adds `n` tokens of `id` to the step.
    fn plan(&mut self, id: RequestId, n: usize, budget: &mut usize, out: &mut SchedulerOutput) {
        let seq = self.seq(id);
        let (start, end) = (seq.num_computed, seq.num_computed + n);
        let samples = end == seq.tokens.len();
        out.scheduled.push(ScheduledSeq {
            id,
            start,
            tokens: seq.tokens[start..end].to_vec(),
            block_table: seq.blocks.clone(),
            samples,
        });
        self.pending.push(Planned {
            id,
            num_tokens: n,
            samples,
        });
        *budget -= n;
    }

    /// Frees a running sequence's blocks and queues it for recomputation.
    /// The caller has already taken `id` off `running`.
    fn preempt(&mut self, id: RequestId, out: &mut SchedulerOutput) {
        let seq = self
            .seqs
            .get_mut(&id)
            .expect("running ids always have a sequence");
        let blocks = std::mem::take(&mut seq.blocks);
        self.pool
            .release(&blocks)
            .expect("a sequence holds one reference per table entry");
        seq.num_computed = 0;
        seq.num_registered = 0;
        seq.status = SequenceStatus::Waiting;
        self.waiting_by_class[seq.priority.index()] += 1;
        self.waiting.push(id);
        self.num_preemptions += 1;
        out.preempted.push(id);
    }

    /// Ends a sequence that cannot fit in the pool even alone. The caller
    /// takes `id` off `running` or `waiting`.
    fn give_up(&mut self, id: RequestId, out: &mut SchedulerOutput) {
        out.finished
            .extend(self.remove(id, FinishReason::NoCapacity));
    }

    /// Drops a sequence, frees its blocks and reports what it generated. The
    /// caller keeps `running` and `waiting` in step.
    fn remove(&mut self, id: RequestId, reason: FinishReason) -> Option<Finished> {
        let mut seq = self.seqs.remove(&id)?;
        self.pool
            .release(&seq.blocks)
            .expect("a sequence holds one reference per table entry");
        let generated = seq.tokens.split_off(seq.prompt_len);
        Some(Finished {
            id,
            reason,
            generated,
        })
    }

    /// Applies the last planned step: advances computed tokens, registers
    /// newly full blocks with the prefix cache, appends the sampled tokens and
    /// ends sequences that stop. Returns the ended requests; their blocks are
    /// already free.
    ///
    /// `sampled` holds one token for each scheduled sequence that `samples`;
    /// tokens for requests ended since the plan are ignored. On error nothing
    /// is applied.
    pub fn update(
        &mut self,
        sampled: &[(RequestId, u32)],
    ) -> Result<Vec<Finished>, SchedulerError> {
        let tokens = self.check_samples(sampled)?;
        let max_model_len = self.config.max_model_len;
        let mut finished = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            let Some(seq) = self.seqs.get_mut(&p.id) else {
                continue;
            };
            seq.num_computed += p.num_tokens;
            self.register_full_blocks(p.id);
            let Some(&token) = tokens.get(&p.id) else {
                continue;
            };
            let seq = self.seq_mut(p.id);
            seq.tokens.push(token);
            if let Some(reason) = seq.stop_reason(token, max_model_len) {
                finished.extend(self.remove(p.id, reason));
            }
        }
        if !finished.is_empty() {
            let seqs = &self.seqs;
            self.running.retain(|id| seqs.contains_key(id));
        }
        Ok(finished)
    }

    /// Validates `sampled` against the plan; returns the token per request.
    fn check_samples(
        &self,
        sampled: &[(RequestId, u32)],
    ) -> Result<HashMap<RequestId, u32>, SchedulerError> {
        let due: HashMap<RequestId, bool> =
            self.pending.iter().map(|p| (p.id, p.samples)).collect();
        let mut tokens = HashMap::with_capacity(sampled.len());
        for &(id, token) in sampled {
            match due.get(&id) {
                Some(true) => {
                    if tokens.insert(id, token).is_some() {
                        return Err(SchedulerError::DuplicateSample(id));
                    }
                }
                None if self.aborted.contains(&id) => {}
                _ => return Err(SchedulerError::UnexpectedSample(id)),
            }
        }
        match self
            .pending
            .iter()
            .find(|p| p.samples && !tokens.contains_key(&p.id))
        {
            Some(p) => Err(SchedulerError::MissingSample(p.id)),
            None => Ok(tokens),
        }
    }

    /// Registers the sequence's blocks that became full with the prefix cache.
    fn register_full_blocks(&mut self, id: RequestId) {
        if !self.pool.prefix_caching() {
            return;
        }
        let bs = self.pool.block_size();
        let seq = self.seqs.get_mut(&id).expect("planned ids have a sequence");
        while seq.num_registered < seq.num_computed / bs {
            let k = seq.num_registered;
            let parent = k.checked_sub(1).map(|p| seq.blocks[p]);
            let tokens = &seq.tokens[k * bs..(k + 1) * bs];
            if self
                .pool
                .register_full_block(seq.blocks[k], parent, tokens)
                .is_err()
            {
                break; // a bookkeeping bug would only cost cache hits
            }
            seq.num_registered += 1;
        }
    }

    /// Ends a request at once (the client went away); frees its blocks.
    pub fn abort(&mut self, id: RequestId) -> Result<Finished, SchedulerError> {
        self.finish(id, FinishReason::Aborted)
    }

    /// Ends a request for a reason decided outside, such as a stop string;
    /// frees its blocks. It is listed in the next step's `aborted`.
    pub fn finish(
        &mut self,
        id: RequestId,
        reason: FinishReason,
    ) -> Result<Finished, SchedulerError> {
        let status = self
            .seqs
            .get(&id)
            .ok_or(SchedulerError::UnknownRequest(id))?
            .status;
        match status {
            SequenceStatus::Waiting => {
                self.waiting.retain(|&w| w != id);
                self.waiting_by_class[self.seq(id).priority.index()] -= 1;
            }
            SequenceStatus::Running => self.running.retain(|&r| r != id),
        }
        self.pending.retain(|p| p.id != id);
        self.aborted.push(id);
        self.remove(id, reason)
            .ok_or(SchedulerError::UnknownRequest(id))
    }
}

#[cfg(test)]
mod tests;
