//! The engine loop and its handle.
//!
//! One thread owns all mutable engine state: the model and its KV cache,
//! the scheduler (and through it the KV block pool), and each request's
//! sampling state. Callers talk to it through a bounded command channel, so
//! overload turns into an immediate [`SubmitError::Overloaded`] rather than
//! an unbounded queue, and each request receives its outputs on its own
//! channel. Dropping a [`ResponseStream`] aborts the request and frees its
//! KV blocks at the next step.
//!
//! Guarantees:
//! * every accepted request ends with exactly one [`Event::Finished`] or
//!   [`Event::Failed`], unless its stream was dropped first;
//! * text deltas never split a UTF-8 character, and never contain a stop
//!   string or anything after it.

mod scoring;

pub use scoring::{MAX_PASS_FLOATS, PromptLogprob};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::Instant;

use tokio::sync::mpsc as out;

mod masks;

use crate::backend::{Backend, BatchLayout};
use crate::error::EngineError;
use crate::grammar::{Grammar, GrammarCompiler, GrammarError, GrammarSpec, TokenMask};
use crate::model::LlamaModel;
use crate::sampler::{Sampler, SamplingParams, SequenceRng, TokenHistory};
use crate::scheduler::{FinishReason, Priority, Scheduler, SchedulerConfig, SequenceRequest};
use crate::stats::EngineStats;
use crate::tokenizer::{IncrementalDecoder, StopStrings, TextTokenizer};

/// Settings of an engine instance.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Scheduler limits (batch size, token budget, context, aging, ...).
    pub scheduler: SchedulerConfig,
    /// KV cache blocks.
    pub num_blocks: usize,
    /// Tokens per KV cache block.
    pub block_size: usize,
    /// Requests that may wait in the command channel.
    pub queue_capacity: usize,
}

/// One generation request, already tokenized.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Most tokens to generate; 0 only scores the prompt (with
    /// `prompt_logprobs`).
    pub max_tokens: usize,
    /// Log probabilities of the prompt's tokens, with this many alternatives
    /// each ([`Event::PromptLogprobs`], before the first token); such a
    /// request computes its whole prompt (no prefix-cache reuse).
    pub prompt_logprobs: Option<usize>,
    /// Stop strings (not included in the output).
    pub stop: Vec<String>,
    /// Stop token ids (in addition to the model's EOS unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Keep going past EOS.
    pub ignore_eos: bool,
    /// Priority class.
    pub priority: Priority,
    /// A compiled grammar the output must follow (see [`crate::grammar`]).
    pub grammar: Option<Grammar>,
}

/// Why a generation ended, in OpenAI's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// EOS, a stop token or a stop string (`finish_reason: "stop"`).
    Stop,
    /// `max_tokens` or the context length (`finish_reason: "length"`).
    Length,
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache on admission.
    pub cached_tokens: usize,
}

/// One generated token.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    /// Token id.
    pub token: u32,
    /// Text this token completes (may be empty while a UTF-8 character or a
    /// possible stop string is incomplete).
    pub text: String,
    /// Log probability of the token, when the sampler reports it.
    pub logprob: Option<f32>,
    /// Most likely alternatives, if asked for.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// What a request's stream receives.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The prompt's log probabilities, when asked for: one per prompt token,
    /// before any generated token.
    PromptLogprobs(Vec<PromptLogprob>),
    /// A generated token.
    Token(TokenEvent),
    /// The end: final text held back by stop-string matching, the reason,
    /// and token counts.
    Finished {
        /// Text released at the end (possibly empty).
        text: String,
        /// Why generation ended.
        reason: Completion,
        /// Token counts.
        usage: Usage,
    },
    /// The request failed.
    Failed(String),
}

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The command queue is full: retry later (HTTP 429).
    #[error("the engine queue is full")]
    Overloaded,
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
    /// The request cannot be served (HTTP 400).
    #[error(transparent)]
    Invalid(#[from] EngineError),
}

enum Command {
    Add {
        id: u64,
        request: Box<GenerateRequest>,
        events: out::Sender<Event>,
    },
    Abort(u64),
    SetLimits {
        max_num_seqs: usize,
        max_num_batched_tokens: usize,
    },
}

/// The outputs of one request. Dropping it aborts the request.
pub struct ResponseStream {
    id: u64,
    events: out::Receiver<Event>,
    commands: SyncSender<Command>,
}

impl ResponseStream {
    /// The request's id inside the engine.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event, or `None` after the last one.
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next event, blocking the thread (not for async contexts).
    pub fn blocking_recv(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        // If the queue is full the engine still notices: sending to this
        // stream's closed channel aborts the request.
        let _ = self.commands.try_send(Command::Abort(self.id));
    }
}

/// A cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    commands: SyncSender<Command>,
    next_id: Arc<AtomicU64>,
    stats: Arc<EngineStats>,
    max_model_len: usize,
    grammars: Arc<GrammarCompiler>,
}

impl EngineHandle {
    /// Starts the engine thread for `model`.
    pub fn start<B>(
        model: LlamaModel<B>,
        tokenizer: Arc<TextTokenizer>,
        options: EngineOptions,
    ) -> Result<Self, EngineError>
    where
        B: Backend + 'static,
        B::KvCache: Send,
        B::Weight: Send,
        B::Rope: Send,
    {
        let mut scheduler = Scheduler::new(
            options.scheduler.clone(),
            options.num_blocks,
            options.block_size,
        )
        .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        scheduler.record_kv_events();
        let cache = model.alloc_kv_cache(options.num_blocks, options.block_size)?;
        // The vocabulary must be one the sampler can index.
        Sampler::new(model.config().vocab_size)
            .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(options.queue_capacity.max(1));
        let stats = Arc::new(EngineStats::default());
        stats.update_from(&mut scheduler);
        let eos = model.config().eos_token_ids.clone();
        let grammars = Arc::new(GrammarCompiler::new(
            tokenizer.clone(),
            model.config().vocab_size,
            eos.clone(),
        ));
        let max_model_len = options.scheduler.max_model_len;
        let worker = Worker {
            model,
            cache,
            scheduler,
            tokenizer,
            eos,
            live: HashMap::new(),
            stats: stats.clone(),
        };
        // The step loop runs on a worker of the engine's own thread pool, so
        // the kernels' parallel loops fork and join among its workers instead
        // of waking a sleeping caller through a futex for every one (which
        // halved decode speed at batch 1). The pool is the engine's alone: a
        // worker waiting in a join steals only this engine's jobs, never
        // another engine's endless loop. The thread that owns the pool only
        // waits; a device backend's context stays bound to the one worker
        // that runs the loop.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("weir-engine-{i}"))
            .build()
            .map_err(|e| EngineError::Backend(format!("starting the engine's threads: {e}")))?;
        std::thread::Builder::new()
            .name("weir-engine".into())
            .spawn(move || pool.install(move || worker.run(rx)))
            .map_err(|e| EngineError::Backend(format!("spawning the engine thread: {e}")))?;
        Ok(Self {
            commands: tx,
            next_id: Arc::new(AtomicU64::new(1)),
            stats,
            max_model_len,
            grammars,
        })
    }

    /// Compiles a grammar for this model's vocabulary, for
    /// [`GenerateRequest::grammar`]. Compiling takes milliseconds: call it
    /// off the async executor's hot path, once per request.
    pub fn compile_grammar(&self, spec: &GrammarSpec) -> Result<Grammar, GrammarError> {
        self.grammars.compile(spec)
    }

    /// Live counters (running, waiting, KV usage, prefix hits, ...).
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Changes the batch limits from the next step on (adaptive batching).
    /// Invalid limits are ignored and logged by the engine thread.
    pub fn set_limits(
        &self,
        max_num_seqs: usize,
        max_num_batched_tokens: usize,
    ) -> Result<(), SubmitError> {
        match self.commands.try_send(Command::SetLimits {
            max_num_seqs,
            max_num_batched_tokens,
        }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(SubmitError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }

    /// Submits a request; its outputs arrive on the returned stream.
    pub fn submit(&self, request: GenerateRequest) -> Result<ResponseStream, SubmitError> {
        validate(&request, self.max_model_len)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Each request emits at most max_tokens + 2 events (prompt log
        // probabilities, tokens, the end), so this channel never fills and
        // the engine never waits on a slow reader.
        let (events_tx, events) = out::channel(request.max_tokens.saturating_add(3));
        let command = Command::Add {
            id,
            request: Box::new(request),
            events: events_tx,
        };
        match self.commands.try_send(command) {
            Ok(()) => Ok(ResponseStream {
                id,
                events,
                commands: self.commands.clone(),
            }),
            Err(TrySendError::Full(_)) => Err(SubmitError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }
}

fn validate(request: &GenerateRequest, max_model_len: usize) -> Result<(), EngineError> {
    if request.prompt.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt is empty".into()));
    }
    if request.max_tokens == 0 && request.prompt_logprobs.is_none() {
        return Err(EngineError::InvalidRequest(
            "max_tokens must be at least 1 (0 only scores the prompt, with prompt_logprobs)".into(),
        ));
    }
    if request.prompt_logprobs.unwrap_or(0) > crate::sampler::MAX_LOGPROBS {
        return Err(EngineError::InvalidRequest(format!(
            "prompt_logprobs must be at most {}",
            crate::sampler::MAX_LOGPROBS
        )));
    }
    if request.prompt.len() >= max_model_len {
        return Err(EngineError::InvalidRequest(format!(
            "the prompt has {} tokens; this model's context is {max_model_len} tokens",
            request.prompt.len()
        )));
    }
    request
        .sampling
        .validate()
        .map_err(|e| EngineError::InvalidRequest(e.to_string()))
}

/// Sampling and output state of one live request.
struct Live {
    events: out::Sender<Event>,
    sampling: SamplingParams,
    history: TokenHistory,
    rng: SequenceRng,
    decoder: IncrementalDecoder,
    stops: StopStrings,
    prompt_tokens: usize,
    generated: usize,
    /// Prompt tokens found in the prefix cache when first scheduled.
    cached_tokens: Option<usize>,
    /// The prompt's log probabilities being computed, when asked for.
    scoring: Option<scoring::PromptScores>,
    /// Only the prompt is scored: the request ends at its first token,
    /// which is not emitted.
    score_only: bool,
    /// The grammar the output follows, if any.
    grammar: Option<Grammar>,
    /// This step's mask from `grammar`, computed during the forward pass.
    mask: Option<Result<TokenMask, GrammarError>>,
}

struct Worker<B: Backend> {
    model: LlamaModel<B>,
    cache: B::KvCache,
    scheduler: Scheduler,
    tokenizer: Arc<TextTokenizer>,
    eos: Vec<u32>,
    live: HashMap<u64, Live>,
    stats: Arc<EngineStats>,
}

impl<B: Backend> Worker<B> {
    fn run(mut self, commands: Receiver<Command>) {
        loop {
            // Block only when idle; otherwise take what has arrived and step.
            if self.live.is_empty() {
                match commands.recv() {
                    Ok(command) => self.apply(command),
                    Err(_) => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(command) => self.apply(command),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.live.is_empty() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            if !self.live.is_empty() {
                self.step();
            }
            self.stats.update_from(&mut self.scheduler);
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Add {
                id,
                request,
                events,
            } => self.add(id, *request, events),
            Command::Abort(id) => {
                if self.live.remove(&id).is_some() {
                    let _ = self.scheduler.abort(id);
                }
            }
            Command::SetLimits {
                max_num_seqs,
                max_num_batched_tokens,
            } => {
                // Limits come from a validated policy; a refusal keeps the old ones.
                let _ = self
                    .scheduler
                    .set_limits(max_num_seqs, max_num_batched_tokens);
                self.stats.update_from(&mut self.scheduler);
            }
        }
    }

    fn add(&mut self, id: u64, request: GenerateRequest, events: out::Sender<Event>) {
        let rng = match SequenceRng::new(request.sampling.seed) {
            Ok(rng) => rng,
            Err(e) => {
                let _ = events.try_send(Event::Failed(e.to_string()));
                return;
            }
        };
        let seq = SequenceRequest {
            id,
            prompt: request.prompt.clone(),
            max_tokens: request.max_tokens.max(1),
            priority: request.priority,
            stop_token_ids: request.stop_token_ids.clone(),
            eos_token_ids: self.eos.clone(),
            ignore_eos: request.ignore_eos,
            arrival: Instant::now(),
        };
        let added = match request.prompt_logprobs {
            None => self.scheduler.add(seq),
            // Cached prefix blocks would skip the positions to be scored.
            Some(_) => self.scheduler.add_computing_all(seq),
        };
        if let Err(e) = added {
            let _ = events.try_send(Event::Failed(e.to_string()));
            return;
        }
        self.live.insert(
            id,
            Live {
                events,
                history: TokenHistory::new(&request.prompt),
                decoder: IncrementalDecoder::new(&request.prompt),
                stops: StopStrings::new(&request.stop),
                sampling: request.sampling,
                rng,
                prompt_tokens: request.prompt.len(),
                generated: 0,
                cached_tokens: None,
                scoring: request
                    .prompt_logprobs
                    .map(|top| scoring::PromptScores::new(&request.prompt, top)),
                score_only: request.max_tokens == 0,
                grammar: request.grammar,
                mask: None,
            },
        );
    }

    fn step(&mut self) {
        let output = self.scheduler.schedule(Instant::now());
        for ended in &output.finished {
            if let Some(live) = self.live.remove(&ended.id) {
                let message = format!("request ended: {:?}", ended.reason);
                let _ = live.events.try_send(Event::Failed(message));
            }
        }
        if output.scheduled.is_empty() {
            return;
        }
        let block_size = self.scheduler.pool().block_size();
        let mut layout = BatchLayout::default();
        let mut sampled_ids = Vec::new();
        let mut prompt_rows = 0;
        // Rows a prompt-scoring pass computed already (keys and values
        // written): the step computes the rest.
        let scored = self.score_prompts(&output.scheduled, block_size);
        for seq in &output.scheduled {
            let done = scored
                .iter()
                .find(|(id, _)| *id == seq.id)
                .map_or(0, |(_, rows)| *rows);
            if done < seq.tokens.len() {
                layout.push_seq(
                    &seq.tokens[done..],
                    seq.start + done,
                    &seq.block_table,
                    block_size,
                    seq.samples,
                );
            }
            if seq.samples {
                sampled_ids.push(seq.id);
            }
            if let Some(live) = self.live.get_mut(&seq.id) {
                live.cached_tokens.get_or_insert(seq.start);
                let prompt_end = live.prompt_tokens.max(seq.start);
                prompt_rows += (seq.start + seq.tokens.len()).min(prompt_end) - seq.start;
            }
        }
        // Grammar masks for this step depend only on each sequence's state
        // after the previous step, so they are computed on the rayon pool
        // while this thread runs the forward pass (which must stay on this
        // thread: a device backend's context is bound to it).
        let mut constrained: Vec<&mut Live> = self
            .live
            .iter_mut()
            .filter(|(id, l)| l.grammar.is_some() && sampled_ids.contains(id))
            .map(|(_, l)| l)
            .collect();
        let forward = rayon::in_place_scope(|scope| {
            if !constrained.is_empty() {
                scope.spawn(|_| masks::compute(&mut constrained));
            }
            match layout.num_rows() {
                0 => Ok(None),
                _ => self.model.forward_logits(&layout, &mut self.cache),
            }
        });
        drop(constrained);
        let logits = match forward {
            Ok(logits) => logits,
            Err(e) => return self.fail_all(&e.to_string()),
        };
        let sampled = match logits {
            Some(logits) => match self.sample_all(logits, &sampled_ids) {
                Ok(sampled) => sampled,
                Err(e) => return self.fail_all(&e.to_string()),
            },
            None => Vec::new(),
        };
        self.stats
            .record_step(output.scheduled.len(), prompt_rows, sampled.len());
        let finished = match self.scheduler.update(&sampled) {
            Ok(finished) => finished,
            Err(e) => return self.fail_all(&format!("scheduler: {e}")),
        };
        for done in finished {
            let reason = match done.reason {
                FinishReason::Length | FinishReason::ContextLength => Completion::Length,
                _ => Completion::Stop,
            };
            self.finish(done.id, reason);
        }
    }

    fn finish(&mut self, id: u64, reason: Completion) {
        if let Some(mut live) = self.live.remove(&id) {
            let usage = Usage {
                prompt_tokens: live.prompt_tokens,
                completion_tokens: live.generated,
                cached_tokens: live.cached_tokens.unwrap_or(0),
            };
            // Text held back as a possible stop string is released when
            // generation ends another way (empty after a stop string).
            let text = live.stops.flush();
            let _ = live.events.try_send(Event::Finished {
                text,
                reason,
                usage,
            });
        }
    }

    fn drop_request(&mut self, id: u64) {
        self.live.remove(&id);
        let _ = self.scheduler.abort(id);
    }

    fn fail_all(&mut self, message: &str) {
        for (id, live) in self.live.drain() {
            let _ = live.events.try_send(Event::Failed(message.to_owned()));
            let _ = self.scheduler.abort(id);
        }
    }
}
