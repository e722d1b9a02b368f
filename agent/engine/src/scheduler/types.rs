//! The scheduler's vocabulary: requests, configuration, step plans, outcomes
//! and errors.

use std::time::{Duration, Instant};

use thiserror::Error;

use crate::kv_pool::{BlockId, KvPoolError};

/// Identifier of a request, unique among the requests queued or running.
pub type RequestId = u64;

/// Scheduling class of a request; `Critical` is served first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Served before everything else.
    Critical,
    /// Interactive traffic that matters more than the default.
    High,
    /// The default class.
    #[default]
    Normal,
    /// Traffic that can wait.
    Low,
    /// Batch work; served when nothing else waits, or once it has aged.
    Background,
}

impl Priority {
    /// Every class, most urgent first.
    pub const ALL: [Priority; 5] = [
        Priority::Critical,
        Priority::High,
        Priority::Normal,
        Priority::Low,
        Priority::Background,
    ];

    /// Rank of the class: 0 for `Critical` up to 4 for `Background`.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Limits and policies of the scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running at once (holding KV blocks).
    pub max_num_seqs: usize,
    /// Most tokens computed in one model step, over all sequences.
    pub max_num_batched_tokens: usize,
    /// Most prompt tokens of one sequence computed in one step (chunked prefill).
    pub long_prefill_chunk: usize,
    /// Longest sequence, prompt plus generated tokens.
    pub max_model_len: usize,
    /// A request's effective priority rises one class per `aging` since it arrived.
    pub aging: Duration,
    /// Reuse computed KV blocks of identical prompt prefixes.
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            long_prefill_chunk: 2048,
            max_model_len: 8192,
            aging: Duration::from_secs(10),
            prefix_caching: true,
        }
    }
}

impl SchedulerConfig {
    /// Checks that every limit allows progress.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let bad = |why| Err(SchedulerError::InvalidConfig(why));
        if self.max_num_seqs == 0 {
            return bad("max_num_seqs must be at least 1");
        }
        if self.max_num_batched_tokens == 0 {
            return bad("max_num_batched_tokens must be at least 1");
        }
        if self.long_prefill_chunk == 0 {
            return bad("long_prefill_chunk must be at least 1");
        }
        if self.max_model_len < 2 {
            return bad("max_model_len must be at least 2 (one prompt token, one generated)");
        }
        if self.aging.is_zero() {
            return bad("aging must be longer than zero");
        }
        Ok(())
    }
}

/// A generation request as the scheduler sees it: token ids and limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceRequest {
    /// Unique among queued and running requests.
    pub id: RequestId,
    /// Prompt token ids; at least one, fewer than `max_model_len`.
    pub prompt: Vec<u32>,
    /// Most tokens to generate; at least one.
    pub max_tokens: usize,
    /// Scheduling class.
    pub priority: Priority,
    /// Tokens that end generation (always honoured).
    pub stop_token_ids: Vec<u32>,
    /// End-of-sequence tokens of the model (ignored with `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    /// Keep generating past EOS tokens.
    pub ignore_eos: bool,
    /// When the request arrived; aging counts from here.
    pub arrival: Instant,
}

impl SequenceRequest {
    /// A `Normal` request with no stop or EOS tokens.
    pub fn new(id: RequestId, prompt: Vec<u32>, max_tokens: usize, arrival: Instant) -> Self {
        Self {
            id,
            prompt,
            max_tokens,
            priority: Priority::Normal,
            stop_token_ids: Vec::new(),
            eos_token_ids: Vec::new(),
            ignore_eos: false,
            arrival,
        }
    }
}

/// Where a live request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceStatus {
    /// Queued: holds no KV blocks (new, or preempted and to be recomputed).
    Waiting,
    /// Holds KV blocks and is scheduled when the token budget allows.
    Running,
}

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or EOS token was sampled (it is the last generated token).
    Stop(u32),
    /// The engine matched a stop string (through `Scheduler::finish`).
    StopString,
    /// `max_tokens` tokens were generated.
    Length,
    /// The sequence reached `max_model_len` tokens.
    ContextLength,
    /// The client went away (`Scheduler::abort`).
    Aborted,
    /// The KV pool could not hold the sequence even alone (a pool built by
    /// `Scheduler::new` always can; reported instead of looping).
    NoCapacity,
}

/// A request that ended, with everything it generated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    /// The request.
    pub id: RequestId,
    /// Why it ended.
    pub reason: FinishReason,
    /// Generated token ids, in order (including a final stop token).
    pub generated: Vec<u32>,
}

/// One sequence's share of a model step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledSeq {
    /// The request.
    pub id: RequestId,
    /// Position of the first token to compute (tokens already computed).
    pub start: usize,
    /// Token ids to compute, at positions `start..start + tokens.len()`.
    pub tokens: Vec<u32>,
    /// The sequence's whole block table; position `p` lives in
    /// `block_table[p / block_size]` at offset `p % block_size`.
    pub block_table: Vec<BlockId>,
    /// After this step every token of the sequence is computed, so the
    /// backend samples its next token from the last position.
    pub samples: bool,
}

/// The plan of one model step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    /// Sequences to run: running ones most urgent first, then newly admitted ones.
    pub scheduled: Vec<ScheduledSeq>,
    /// Sequences that lost their KV blocks this step and will be recomputed.
    pub preempted: Vec<RequestId>,
    /// Requests ended outside `update` since the previous step (`abort`,
    /// `finish`); the backend can drop any state it keeps for them.
    pub aborted: Vec<RequestId>,
    /// Requests the scheduler itself ended this step (`NoCapacity` only).
    pub finished: Vec<Finished>,
}

impl SchedulerOutput {
    /// Tokens computed in this step, over all sequences.
    pub fn num_batched_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.tokens.len()).sum()
    }

    /// Whether the step computes nothing.
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

/// Errors of the scheduler. A failed call changes nothing.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SchedulerError {
    /// A configuration limit does not allow progress.
    #[error("invalid scheduler config: {0}")]
    InvalidConfig(&'static str),
    /// The KV pool cannot hold one sequence of `max_model_len` tokens.
    #[error(
        "a KV pool of {num_blocks} blocks x {block_size} tokens cannot hold one \
         sequence of max_model_len {max_model_len} tokens"
    )]
    PoolTooSmall {
        /// Blocks in the pool.
        num_blocks: usize,
        /// Tokens per block.
        block_size: usize,
        /// Configured context length.
        max_model_len: usize,
    },
    /// The prompt has no tokens.
    #[error("request {0} has an empty prompt")]
    EmptyPrompt(RequestId),
    /// `max_tokens` is zero.
    #[error("request {0} asks for max_tokens 0")]
    ZeroMaxTokens(RequestId),
    /// The prompt leaves no room for a generated token.
    #[error(
        "request {id}: prompt of {prompt_len} tokens leaves no room in a context of {max_model_len}"
    )]
    PromptTooLong {
        /// The request.
        id: RequestId,
        /// Its prompt length.
        prompt_len: usize,
        /// Configured context length.
        max_model_len: usize,
    },
    /// A request with this id is already queued or running.
    #[error("request {0} is already queued or running")]
    DuplicateRequest(RequestId),
    /// No request with this id is queued or running.
    #[error("request {0} is not queued or running")]
    UnknownRequest(RequestId),
    /// `update` got a token for a request that was not due to sample one.
    #[error("a token was sampled for request {0}, which did not sample this step")]
    UnexpectedSample(RequestId),
    /// `update` got two tokens for one request.
    #[error("two tokens were sampled for request {0} in one step")]
    DuplicateSample(RequestId),
    /// `update` got no token for a request that sampled this step.
    #[error("request {0} sampled this step but no token was given")]
    MissingSample(RequestId),
    /// The KV pool refused an operation.
    #[error("KV pool: {0}")]
    Pool(#[from] KvPoolError),
    /// `audit` found broken bookkeeping (a bug in the scheduler).
    #[error("scheduler bookkeeping is inconsistent: {0}")]
    Inconsistent(String),
}
