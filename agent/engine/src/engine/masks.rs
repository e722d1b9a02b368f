//! The grammar side of an engine step: each constrained sequence's mask,
//! computed in parallel during the forward pass, applied when sampling, and
//! the grammar advanced on the sampled token.

use rayon::prelude::*;

use super::{Event, Live, TokenEvent, Worker};
use crate::backend::Backend;
use crate::engine::Completion;
use crate::error::EngineError;
use crate::sampler::{
    BatchRow, SampleOutput, SamplerError, SamplingParams, SequenceRng, TokenHistory,
};
use crate::scheduler::FinishReason;
use crate::tokenizer::StopCheck;

/// Computes the next mask of every sequence in `live` (each has a
/// grammar), in parallel over the rayon pool: never one after another on
/// the engine thread.
pub(super) fn compute(live: &mut [&mut Live]) {
    live.par_iter_mut().for_each(|l| {
        l.mask = l.grammar.as_mut().map(|g| g.compute_mask());
    });
}

impl<B: Backend> Worker<B> {
    /// Samples every row of `logits` (row `i` belongs to `ids[i]`) on the
    /// backend and emits the tokens; returns the requests that go on, with
    /// their tokens.
    pub(super) fn sample_all(
        &mut self,
        logits: B::Tensor,
        ids: &[u64],
    ) -> Result<Vec<(u64, u32)>, EngineError> {
        // Each row borrows its request's state; the states leave the map for
        // the call. A scheduled request always has its state (both go
        // together), so the stand-in is only there to keep rows aligned.
        let mut taken: Vec<(u64, Option<Live>)> =
            ids.iter().map(|&id| (id, self.live.remove(&id))).collect();
        // A grammar that failed to give a mask ends its request here.
        for (id, slot) in taken.iter_mut() {
            if let Some(Some(Err(e))) = slot.as_ref().map(|l| &l.mask) {
                let _ = slot
                    .as_ref()
                    .map(|l| l.events.try_send(Event::Failed(e.to_string())));
                *slot = None;
                let _ = self.scheduler.abort(*id);
            }
        }
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
                    mask: match &l.mask {
                        Some(Ok(mask)) => Some(mask.as_slice()),
                        _ => None,
                    },
                },
                None => BatchRow {
                    params: &greedy,
                    history: &empty,
                    rng: spare
                        .next()
                        .expect("one spare generator per missing request"),
                    mask: None,
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
    /// ended here (stop string, closed stream, sampling error, a request
    /// that only scores its prompt).
    fn emit(&mut self, id: u64, outcome: Result<SampleOutput, SamplerError>) -> Option<u32> {
        let live = self.live.get_mut(&id)?;
        if live.score_only {
            self.finish(id, Completion::Length);
            let _ = self.scheduler.finish(id, FinishReason::Length);
            return None;
        }
        let out = match outcome {
            Ok(out) => out,
            Err(e) => {
                let _ = live.events.try_send(Event::Failed(e.to_string()));
                self.drop_request(id);
                return None;
            }
        };
        live.mask = None;
        live.history.push(out.token);
        live.generated += 1;
        let mut grammar_done = false;
        if let Some(grammar) = live.grammar.as_mut()
            && !grammar.is_eos(out.token)
        {
            if let Err(e) = grammar.accept(out.token) {
                let _ = live.events.try_send(Event::Failed(e.to_string()));
                self.drop_request(id);
                return None;
            }
            grammar_done = grammar.is_finished();
        }
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
        if stopped || grammar_done {
            // A finished grammar ends the sequence as a stop string does.
            self.finish(id, Completion::Stop);
            let _ = self.scheduler.finish(id, FinishReason::StopString);
            return None;
        }
        Some(out.token)
    }
}
