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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::Instant;

use tokio::sync::mpsc as out;

use crate::backend::{Backend, BatchLayout};
use crate::error::EngineError;
use crate::model::LlamaModel;
use crate::sampler::{
    BatchRow, SampleOutput, Sampler, SamplerError, SamplingParams, SequenceRng, TokenHistory,
};
use crate::scheduler::{FinishReason, Priority, Scheduler, SchedulerConfig, SequenceRequest};
use crate::stats::EngineStats;
use crate::tokenizer::{IncrementalDecoder, StopCheck, StopStrings, TextTokenizer};

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
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop strings (not included in the output).
    pub stop: Vec<String>,
    /// Stop token ids (in addition to the model's EOS unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Keep going past EOS.
    pub ignore_eos: bool,
    /// Priority class.
    pub priority: Priority,
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
        std::thread::Builder::new()
            .name("weir-engine".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| EngineError::Backend(format!("spawning the engine thread: {e}")))?;
        Ok(Self {
            commands: tx,
            next_id: Arc::new(AtomicU64::new(1)),
            stats,
            max_model_len,
        })
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
        // Each request emits at most max_tokens + 1 events, so this channel
        // never fills and the engine never waits on a slow reader.
        let (events_tx, events) = out::channel(request.max_tokens.saturating_add(2));
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
    if request.max_tokens == 0 {
        return Err(EngineError::InvalidRequest(
            "max_tokens must be at least 1".into(),
        ));
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
            max_tokens: request.max_tokens,
            priority: request.priority,
            stop_token_ids: request.stop_token_ids.clone(),
            eos_token_ids: self.eos.clone(),
            ignore_eos: request.ignore_eos,
            arrival: Instant::now(),
        };
        if let Err(e) = self.scheduler.add(seq) {
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
        for seq in &output.scheduled {
            layout.push_seq(
                &seq.tokens,
                seq.start,
                &seq.block_table,
                block_size,
                seq.samples,
            );
            if seq.samples {
                sampled_ids.push(seq.id);
            }
            if let Some(live) = self.live.get_mut(&seq.id) {
                live.cached_tokens.get_or_insert(seq.start);
                let prompt_end = live.prompt_tokens.max(seq.start);
                prompt_rows += (seq.start + seq.tokens.len()).min(prompt_end) - seq.start;
            }
        }
        let logits = match self.model.forward_logits(&layout, &mut self.cache) {
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

    /// Samples every row of `logits` (row `i` belongs to `ids[i]`) on the
    /// backend and emits the tokens; returns the requests that go on, with
    /// their tokens.
    fn sample_all(
        &mut self,
        logits: B::Tensor,
        ids: &[u64],
    ) -> Result<Vec<(u64, u32)>, EngineError> {
        // Each row borrows its request's state; the states leave the map for
        // the call. A scheduled request always has its state (both go
        // together), so the stand-in is only there to keep rows aligned.
        let mut taken: Vec<(u64, Option<Live>)> =
            ids.iter().map(|&id| (id, self.live.remove(&id))).collect();
        let greedy = SamplingParams::greedy();
        let empty = TokenHistory::new(&[]);
        let missing = taken.iter().filter(|(_, live)| live.is_none()).count();
        let mut spare: Vec<SequenceRng> = (0..missing).map(|_| SequenceRng::from_seed(0)).collect();
        let mut spare = spare.iter_mut();
        let mut rows: Vec<BatchRow<'_>> = Vec::with_capacity(taken.len());
        for (_, live) in taken.iter_mut() {
            rows.push(match live {
                Some(l) => BatchRow {
                    params: &l.sampling,
                    history: &l.history,
                    rng: &mut l.rng,
                },
                None => BatchRow {
                    params: &greedy,
                    history: &empty,
                    rng: spare
                        .next()
                        .expect("one spare generator per missing request"),
                },
            });
        }
        let outcomes = self.model.backend().sample(logits, &mut rows);
        drop(rows);
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(e) => {
                for (id, live) in taken {
                    if let Some(live) = live {
                        self.live.insert(id, live);
                    }
                }
                return Err(e);
            }
        };
        let mut sampled = Vec::with_capacity(ids.len());
        for ((id, live), outcome) in taken.into_iter().zip(outcomes) {
            let Some(live) = live else { continue };
            self.live.insert(id, live);
            if let Some(token) = self.emit(id, outcome) {
                sampled.push((id, token));
            }
        }
        Ok(sampled)
    }

    /// Emits one sampled token; returns it, or `None` when the request
    /// ended here (stop string, closed stream, sampling error).
    fn emit(&mut self, id: u64, outcome: Result<SampleOutput, SamplerError>) -> Option<u32> {
        let live = self.live.get_mut(&id)?;
        let out = match outcome {
            Ok(out) => out,
            Err(e) => {
                let _ = live.events.try_send(Event::Failed(e.to_string()));
                self.drop_request(id);
                return None;
            }
        };
        live.history.push(out.token);
        live.generated += 1;
        let text = live
            .decoder
            .push(&self.tokenizer, out.token)
            .unwrap_or_default();
        let (text, stopped) = match live.stops.push(&text) {
            StopCheck::Continue(text) => (text, false),
            StopCheck::Stopped(text) => (text, true),
        };
        let event = Event::Token(TokenEvent {
            token: out.token,
            text,
            logprob: out.logprob,
            top_logprobs: out.top_logprobs,
        });
        if live.events.try_send(event).is_err() {
            self.drop_request(id);
            return None;
        }
        if stopped {
            self.finish(id, Completion::Stop);
            let _ = self.scheduler.finish(id, FinishReason::StopString);
            return None;
        }
        Some(out.token)
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
