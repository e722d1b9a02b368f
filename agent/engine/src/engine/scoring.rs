//! Prompt log probabilities (completions' `echo` with `logprobs`): the log
//! probability of every prompt token given the tokens before it, with the
//! most likely alternatives at each position.
//!
//! A step's forward pass keeps only the logits of a sequence's last row.
//! A request that asks for its prompt's log probabilities gets, in each
//! step that computes part of its prompt and before that step's forward
//! pass, a scoring pass over that chunk that keeps every row's logits (in
//! passes of at most [`MAX_PASS_FLOATS`] logits, so a long prompt never
//! brings `prompt × vocab` floats to the host at once). The scoring pass
//! writes the rows' keys and values, so the step's own pass computes only
//! what is left of the chunk: the prompt's last row (whose logits pick the
//! first token) and what follows it, or nothing in a middle chunk.
//!
//! Guarantees and assumptions:
//! * positions are scored only where the scoring pass computes them, so
//!   such a request never starts from cached prefix blocks
//!   ([`crate::scheduler::Scheduler::add_computing_all`]): cached blocks
//!   would skip those positions, and recomputing them would rewrite blocks
//!   other requests share;
//! * a chunk computed again after preemption is scored again from its
//!   start; the scores are sent once, when the whole prompt is scored,
//!   before the request's first token;
//! * log probabilities are raw (before any sampling processing), as vLLM
//!   and OpenAI report prompt log probabilities.

use super::{Event, Worker};
use crate::backend::{Backend, BatchLayout};
use crate::error::EngineError;
use crate::model::LlamaModel;
use crate::sampler::{log_sum_exp, top_n};
use crate::scheduler::ScheduledSeq;

/// The log probability of one prompt token given the tokens before it.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLogprob {
    /// Token id.
    pub token: u32,
    /// Its log probability; `None` for the first token (nothing precedes it).
    pub logprob: Option<f32>,
    /// The most likely tokens at this position, most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Most logits (floats) one scoring pass brings to the host: 64 MiB.
pub const MAX_PASS_FLOATS: usize = 16 * 1024 * 1024;

/// One request's prompt scoring in progress.
pub(super) struct PromptScores {
    prompt: Vec<u32>,
    top: usize,
    /// `scores[k]` is for prompt token `k`.
    scores: Vec<PromptLogprob>,
    sent: bool,
}

impl PromptScores {
    /// Scoring for `prompt` with `top` alternatives per position.
    pub(super) fn new(prompt: &[u32], top: usize) -> Self {
        let first = PromptLogprob {
            token: prompt.first().copied().unwrap_or(0),
            logprob: None,
            top_logprobs: Vec::new(),
        };
        Self {
            prompt: prompt.to_vec(),
            top,
            scores: vec![first],
            sent: false,
        }
    }

    /// Scores the prompt positions of the chunk `start..end` that this step
    /// computes (blocks `block_table`), before the step's forward pass;
    /// returns how many of the chunk's rows it computed (from `start`), and
    /// every score once the prompt is complete.
    pub(super) fn score_chunk<B: Backend>(
        &mut self,
        model: &LlamaModel<B>,
        cache: &mut B::KvCache,
        (start, end): (usize, usize),
        block_table: &[u32],
        block_size: usize,
    ) -> Result<(usize, Option<Vec<PromptLogprob>>), EngineError> {
        let len = self.prompt.len();
        if self.sent || start >= len {
            return Ok((0, None));
        }
        if start + 1 > self.scores.len() {
            return Err(EngineError::InvalidRequest(format!(
                "prompt scoring: positions {}..{start} were never computed",
                self.scores.len() - 1
            )));
        }
        // Recomputed after preemption: score the chunk again.
        self.scores.truncate(start + 1);
        let vocab = model.config().vocab_size;
        let per_pass = (MAX_PASS_FLOATS / vocab.max(1)).max(1);
        // Row `q` predicts token `q + 1`; the last prompt row predicts the
        // first generated token and is the step's own business.
        let last = end.min(len - 1).max(start);
        let mut q = start;
        while q < last {
            let to = (q + per_pass).min(last);
            let mut layout = BatchLayout::default();
            layout.push_seq(&self.prompt[q..to], q, block_table, block_size, false);
            layout.logits_rows = (0..(to - q) as u32).collect();
            let logits = model.forward(&layout, cache)?;
            for (r, row) in logits.chunks_exact(vocab).enumerate() {
                let token = self.prompt[q + r + 1];
                self.scores.push(score_row(row, token, self.top));
            }
            q = to;
        }
        let rows = last - start;
        if end < len {
            return Ok((rows, None));
        }
        self.sent = true;
        Ok((rows, Some(std::mem::take(&mut self.scores))))
    }
}

impl<B: Backend> Worker<B> {
    /// Scores the prompt chunks of this step's requests that asked for
    /// prompt log probabilities (this module), sending each request's scores
    /// once its prompt is complete; a request whose scoring fails ends.
    /// Returns, per request scored, the rows of its chunk computed.
    pub(super) fn score_prompts(
        &mut self,
        scheduled: &[ScheduledSeq],
        block_size: usize,
    ) -> Vec<(u64, usize)> {
        let mut computed = Vec::new();
        for seq in scheduled {
            let Some(live) = self.live.get_mut(&seq.id) else {
                continue;
            };
            let Some(scores) = live.scoring.as_mut() else {
                continue;
            };
            let chunk = (seq.start, seq.start + seq.tokens.len());
            let scored = scores.score_chunk(
                &self.model,
                &mut self.cache,
                chunk,
                &seq.block_table,
                block_size,
            );
            let sent = match scored {
                Ok((rows, None)) => {
                    computed.push((seq.id, rows));
                    continue;
                }
                Ok((rows, Some(scores))) => {
                    computed.push((seq.id, rows));
                    live.events.try_send(Event::PromptLogprobs(scores))
                }
                Err(e) => {
                    let _ = live.events.try_send(Event::Failed(e.to_string()));
                    self.drop_request(seq.id);
                    continue;
                }
            };
            if sent.is_err() {
                self.drop_request(seq.id);
            }
        }
        computed
    }
}

/// Log-softmax of `row` at `token`, and the `top` most likely tokens.
fn score_row(row: &[f32], token: u32, top: usize) -> PromptLogprob {
    let norm = log_sum_exp(row);
    let ranked = row.iter().copied().enumerate().map(|(i, v)| (i as u32, v));
    PromptLogprob {
        token,
        logprob: Some(row[token as usize] - norm),
        top_logprobs: top_n(ranked, top)
            .into_iter()
            .map(|(t, v)| (t, v - norm))
            .collect(),
    }
}
