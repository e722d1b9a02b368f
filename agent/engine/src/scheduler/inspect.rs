//! Read-only views of the scheduler: status, counters and the audit.

use super::types::{RequestId, SchedulerConfig};
use super::{Scheduler, SchedulerError, SequenceStatus};
use crate::kv_pool::{BlockId, KvBlockPool};

impl Scheduler {
    /// Where a request stands, or `None` if it is not queued or running.
    pub fn status(&self, id: RequestId) -> Option<SequenceStatus> {
        self.seqs.get(&id).map(|s| s.status)
    }

    /// Tokens of a live request whose KV is computed.
    pub fn num_computed_tokens(&self, id: RequestId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.num_computed)
    }

    /// Whether any request is queued or running.
    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Sequences holding KV blocks.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Queued requests.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Queued requests per class, indexed by [`Priority::index`](super::Priority::index).
    pub fn num_waiting_by_priority(&self) -> [usize; 5] {
        self.waiting_by_class
    }

    /// Prompt tokens of live requests not computed yet (queued prefill
    /// work; a decoding sequence counts nothing).
    pub fn num_prefill_tokens_queued(&self) -> usize {
        self.seqs
            .values()
            .map(|s| s.tokens.len().saturating_sub(s.num_computed + 1))
            .sum()
    }

    /// Starts recording the pool's cache additions and evictions for
    /// [`take_kv_events`](Self::take_kv_events).
    pub fn record_kv_events(&mut self) {
        self.pool.record_events();
    }

    /// The pool's cache additions and evictions since the last call.
    pub fn take_kv_events(&mut self) -> Vec<crate::kv_pool::KvEvent> {
        self.pool.take_events()
    }

    /// Tokens per KV block.
    pub fn block_size(&self) -> usize {
        self.pool.block_size()
    }

    /// Share of KV blocks in use, in `[0, 1]`.
    pub fn kv_usage(&self) -> f64 {
        self.pool.usage()
    }

    /// Prompt tokens found in the prefix cache so far.
    pub fn prefix_cache_hits(&self) -> u64 {
        self.pool.prefix_cache_hits()
    }

    /// Prompt tokens looked up in the prefix cache so far.
    pub fn prefix_cache_queries(&self) -> u64 {
        self.pool.prefix_cache_queries()
    }

    /// Preemptions so far.
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Changes the batch limits between steps (adaptive batching). Lowering
    /// `max_num_seqs` below the running count preempts nothing: no new
    /// sequence is admitted until the batch has shrunk below the new limit.
    /// On error nothing changes.
    pub fn set_limits(
        &mut self,
        max_num_seqs: usize,
        max_num_batched_tokens: usize,
    ) -> Result<(), SchedulerError> {
        let next = SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens,
            ..self.config.clone()
        };
        next.validate()?;
        self.config = next;
        Ok(())
    }

    /// The KV block pool (read only).
    pub fn pool(&self) -> &KvBlockPool {
        &self.pool
    }

    /// Checks the bookkeeping of the scheduler and its pool (O(live tokens +
    /// blocks)); for tests and debugging.
    pub fn audit(&self) -> Result<(), SchedulerError> {
        self.pool.audit()?;
        let bad = |msg: String| Err(SchedulerError::Inconsistent(msg));
        if self.running.len() > self.config.max_num_seqs {
            return bad(format!(
                "{} running, limit {}",
                self.running.len(),
                self.config.max_num_seqs
            ));
        }
        if self.running.len() + self.waiting.len() != self.seqs.len() {
            return bad("running and waiting do not list every live request once".into());
        }
        let mut by_class = [0; 5];
        let mut listed = std::collections::HashSet::new();
        for (ids, status) in [
            (&self.running, SequenceStatus::Running),
            (&self.waiting, SequenceStatus::Waiting),
        ] {
            for id in ids {
                if !listed.insert(*id) {
                    return bad(format!("request {id} is listed twice"));
                }
                match self.seqs.get(id) {
                    Some(s) if s.status == status => {
                        by_class[s.priority.index()] +=
                            usize::from(status == SequenceStatus::Waiting)
                    }
                    _ => return bad(format!("request {id} is listed as {status:?} but is not")),
                }
            }
        }
        if by_class != self.waiting_by_class {
            return bad(format!(
                "waiting counts {:?}, expected {by_class:?}",
                self.waiting_by_class
            ));
        }
        let mut refs = vec![0u32; self.pool.num_blocks()];
        let bs = self.pool.block_size();
        for (id, s) in &self.seqs {
            let covered = s.blocks.len() * bs >= s.num_computed
                && s.blocks.len() <= s.tokens.len().div_ceil(bs);
            let waiting_empty =
                s.status == SequenceStatus::Running || (s.blocks.is_empty() && s.num_computed == 0);
            if !covered
                || !waiting_empty
                || s.num_computed >= s.tokens.len()
                || s.tokens.len() >= self.config.max_model_len
            {
                return bad(format!(
                    "request {id}: {} blocks for {}/{} tokens",
                    s.blocks.len(),
                    s.num_computed,
                    s.tokens.len()
                ));
            }
            for &b in &s.blocks {
                match refs.get_mut(b as usize) {
                    Some(n) => *n += 1,
                    None => return bad(format!("request {id} holds unknown block {b}")),
                }
            }
        }
        for (b, &n) in refs.iter().enumerate() {
            if self.pool.ref_count(b as BlockId) != Some(n) {
                return bad(format!(
                    "block {b} is held {n} times but has {:?} refs",
                    self.pool.ref_count(b as BlockId)
                ));
            }
        }
        Ok(())
    }
}
