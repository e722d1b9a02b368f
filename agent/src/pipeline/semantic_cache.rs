//! The semantic cache on the request path: which part of a conversation is
//! compared by meaning, the scope that must match exactly, the question's
//! vector from the policy's encoder, the verifier's verdict on the
//! candidates, and storing the answer afterwards.
//!
//! With the default scope (`LastUserMessage`), the scope digest covers the
//! model, every output-changing parameter, the route and every message but
//! the last user message (whose place is kept), so only the wording of the
//! last question may differ. With `Conversation`, the whole conversation is
//! embedded and only the parameters must match. An encoder that is missing
//! or busy never fails a request: the lookup is skipped and counted.
//!
//! Two stages: the index proposes up to [`MAX_CANDIDATES`] nearest
//! entries at or above the calibrator's floor; each at or above the
//! threshold is verified (`cache/verify`: the rules, then the verifier
//! model if the policy says so) and the first that passes is the hit.
//! Candidates between the floor and the threshold are checked by the rules
//! only, never served, and feed calibration. A client's `Cache-Control:
//! no-cache` skips the lookup (the answer is still stored) and, when the
//! same question in the same scope was lately answered by a semantic hit,
//! counts that hit as refuted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use weir_crds::cache_policy::{SemanticCacheSpec, SemanticScope, SemanticVerify};
use weir_engine::scheduler::Priority;
use weir_engine::tokenizer::ChatMessage;

use super::Context;
use super::response_cache as reuse;
use crate::api::ApiError;
use crate::api::types::SamplingFields;
use crate::cache::CacheKey;
use crate::cache::semantic::{SemanticFill, SemanticHit, SemanticIndex};
use crate::cache::verify::{self, Veto, model as ask};
use crate::generate::{self, GenEvent, Job, LogprobsWanted};
use crate::metrics::{ModelLabel, ReasonLabel};
use crate::models::ServedModel;

/// Most candidates the index proposes for one question.
pub const MAX_CANDIDATES: usize = 4;

/// The outcome of a semantic lookup.
pub enum Probe {
    /// A stored answer to a question with the same meaning.
    Hit(SemanticHit),
    /// None: store this request's answer when it is complete; with the
    /// first veto (and that candidate's similarity), if one was vetoed.
    Miss(SemanticFill, Option<(Veto, f32)>),
}

/// The text compared by meaning and the JSON of what must match exactly.
pub fn split(
    scope: SemanticScope,
    messages: &[ChatMessage],
) -> Option<(String, serde_json::Value)> {
    match scope {
        SemanticScope::LastUserMessage => {
            let last = messages.iter().rposition(|m| m.role == "user")?;
            let context: Vec<_> = messages
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let content = (i != last).then_some(m.content.as_str());
                    json!([m.role, content])
                })
                .collect();
            Some((messages[last].content.clone(), json!(context)))
        }
        SemanticScope::Conversation => {
            let text = messages
                .iter()
                .map(|m| format!("{}: {}", m.role, m.content))
                .collect::<Vec<_>>()
                .join("\n");
            Some((text, json!(null)))
        }
    }
}

/// Looks `job` up in `model`'s semantic index, when the policy enables it
/// and the job may be answered from a cache at all; with `no_cache` only
/// prepares the fill (and records a refutation).
pub async fn probe(
    ctx: &Context<'_>,
    model: &ServedModel,
    job: &Job,
    no_cache: bool,
) -> Option<Probe> {
    let metrics = ctx.metrics;
    let index = model.semantic.clone()?;
    let input = job.semantic.as_ref()?;
    if job.prompts.len() != 1 || !reuse::cacheable(model, job) {
        return None;
    }
    let policy = &model.cache_policy.semantic_cache;
    let (question, context) = split(policy.scope, &input.messages)?;
    let label = ModelLabel {
        model_name: model.name.clone(),
    };
    let unavailable = || metrics.semantic_unavailable.get_or_create(&label).inc();
    let Some(encoder) = ctx.encoder(&policy.embedding_model) else {
        tracing::debug!(model = %model.name, encoder = %policy.embedding_model, "semantic cache: encoder not served here");
        unavailable();
        return None;
    };
    let vector = match encoder.embed_text(&question).await {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!(model = %model.name, error = %e, "semantic cache: encoder failed");
            unavailable();
            return None;
        }
    };
    let scope = reuse::digest(
        model,
        job,
        json!({
            "semantic": input.route,
            "scope": format!("{:?}", policy.scope),
            "encoder": encoder.name,
            "context": context,
        }),
    );
    let asked = asked_key(&scope, &question);
    let calibrator = index.calibrator();
    if no_cache {
        if calibrator.refuted(&asked) {
            metrics.semantic_refuted.get_or_create(&label).inc();
        }
        return Some(Probe::Miss(fill(index, scope, question, vector), None));
    }
    let candidates = index.candidates(&scope, &vector, calibrator.floor(), MAX_CANDIDATES);
    let verifier = Verifier {
        ctx,
        policy,
        model_name: &model.name,
    };
    match verifier.choose(&index, &question, candidates).await {
        Ok(hit) => {
            calibrator.served(hit.similarity, asked);
            Some(Probe::Hit(hit))
        }
        Err(veto) => Some(Probe::Miss(fill(index, scope, question, vector), veto)),
    }
}

fn fill(
    index: Arc<SemanticIndex>,
    scope: CacheKey,
    question: String,
    vector: Vec<f32>,
) -> SemanticFill {
    SemanticFill::new(index, scope, Arc::from(question), vector)
}

/// The digest naming one question in one scope (for refutations).
fn asked_key(scope: &CacheKey, question: &str) -> CacheKey {
    let mut canonical = scope.0.to_vec();
    canonical.extend_from_slice(question.as_bytes());
    CacheKey::from_canonical(&canonical)
}

/// The verifier as the policy configures it, for one model.
struct Verifier<'a> {
    ctx: &'a Context<'a>,
    policy: &'a SemanticCacheSpec,
    model_name: &'a str,
}

impl Verifier<'_> {
    /// The first candidate that passes, else the first veto of one at or
    /// above the threshold (none when no candidate reached it).
    async fn choose(
        &self,
        index: &SemanticIndex,
        question: &str,
        candidates: Vec<SemanticHit>,
    ) -> Result<SemanticHit, Option<(Veto, f32)>> {
        let calibrator = index.calibrator();
        let threshold = calibrator.threshold();
        let mut first_veto = None;
        for candidate in candidates {
            let shadow = candidate.similarity < threshold;
            if shadow && self.policy.verify == SemanticVerify::Off {
                continue;
            }
            let mut verdict = self.rules(question, &candidate.question);
            if shadow {
                calibrator.candidate(candidate.similarity, verdict.is_err());
                continue;
            }
            if verdict.is_ok() && self.asks_model() {
                verdict = self.model_check(question, &candidate.question).await;
            }
            calibrator.candidate(candidate.similarity, verdict.is_err());
            match verdict {
                Ok(()) => return Ok(candidate),
                Err(veto) => {
                    let reason = ReasonLabel {
                        model_name: self.model_name.to_owned(),
                        reason: veto.label().into(),
                    };
                    self.ctx
                        .metrics
                        .semantic_vetoes
                        .get_or_create(&reason)
                        .inc();
                    first_veto.get_or_insert((veto, candidate.similarity));
                }
            }
        }
        Err(first_veto)
    }

    fn asks_model(&self) -> bool {
        matches!(
            self.policy.verify,
            SemanticVerify::Model | SemanticVerify::RulesThenModel
        )
    }

    fn rules(&self, question: &str, candidate: &str) -> Result<(), Veto> {
        if !matches!(
            self.policy.verify,
            SemanticVerify::Rules | SemanticVerify::RulesThenModel
        ) {
            return Ok(());
        }
        let started = Instant::now();
        let verdict = verify::rules(question, candidate);
        self.time("rules", started);
        verdict
    }

    fn time(&self, stage: &str, started: Instant) {
        let label = ReasonLabel {
            model_name: self.model_name.to_owned(),
            reason: stage.into(),
        };
        let seconds = started.elapsed().as_secs_f64();
        self.ctx
            .metrics
            .semantic_verify
            .get_or_create(&label)
            .observe(seconds);
    }

    /// The verifier model's yes or no, within the policy's time limit.
    async fn model_check(&self, question: &str, candidate: &str) -> Result<(), Veto> {
        let name = self.policy.verifier_model.as_deref().unwrap_or_default();
        let Ok(verifier) = self.ctx.model(name) else {
            tracing::debug!(verifier = %name, "semantic cache: verifier model not served here");
            return Err(Veto::ModelUnavailable);
        };
        let limit = Duration::from_millis(u64::from(self.policy.verifier_timeout_ms));
        let started = Instant::now();
        let answer = tokio::time::timeout(limit, yes_no(&verifier, question, candidate)).await;
        self.time("model", started);
        match answer {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(Veto::Model),
            Ok(Err(e)) => {
                tracing::debug!(verifier = %name, error = %e, "semantic cache: verifier model failed");
                Err(Veto::ModelUnavailable)
            }
            Err(_) => Err(Veto::ModelUnavailable),
        }
    }
}

/// Asks `verifier` whether the two questions are the same: the prompt
/// through its chat template, one greedy token with its alternatives.
pub async fn yes_no(
    verifier: &ServedModel,
    question: &str,
    candidate: &str,
) -> Result<bool, ApiError> {
    let messages = ask::prompt(question, candidate);
    let invalid = |e: &dyn std::fmt::Display| ApiError::invalid("messages", e.to_string());
    let text = verifier
        .tokenizer
        .apply_chat_template(&messages, true, None)
        .map_err(|e| invalid(&e))?;
    let prompt = verifier
        .tokenizer
        .encode(&text, false)
        .map_err(|e| invalid(&e))?;
    let fields = SamplingFields {
        max_tokens: Some(1),
        temperature: Some(0.0),
        ..SamplingFields::default()
    };
    let logprobs = LogprobsWanted::Yes(ask::TOP_ALTERNATIVES);
    let (template, n) = generate::build_template(
        &fields,
        Priority::High,
        logprobs,
        prompt.len(),
        verifier.max_model_len,
    )?;
    let job = Job {
        prompts: vec![prompt],
        n,
        template,
        logprobs,
        semantic: None,
        cache_scope: None,
    };
    let mut events = generate::run(&verifier.engine, verifier.tokenizer.clone(), &job)?;
    let (mut said, mut top) = (String::new(), Vec::new());
    while let Some(event) = events.next().await {
        match event {
            GenEvent::Delta { text, logprobs, .. } => {
                said.push_str(&text);
                if top.is_empty()
                    && let Some(first) = logprobs.first()
                {
                    top = first.top.clone();
                    top.push((first.token.clone(), first.logprob));
                }
            }
            GenEvent::Error { body, .. } => return Err(invalid(&body)),
            GenEvent::Done { .. } => break,
            GenEvent::ChoiceDone { .. } | GenEvent::PromptLogprobs { .. } => {}
        }
    }
    Ok(ask::read_answer(&said, &top))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }
    }

    #[test]
    fn last_user_message_is_compared_and_everything_else_is_scope() {
        let a = [msg("system", "brief"), msg("user", "capital of France?")];
        let b = [msg("system", "brief"), msg("user", "France's capital?")];
        let c = [msg("system", "verbose"), msg("user", "capital of France?")];
        let (qa, sa) = split(SemanticScope::LastUserMessage, &a).unwrap();
        let (qb, sb) = split(SemanticScope::LastUserMessage, &b).unwrap();
        let (_, sc) = split(SemanticScope::LastUserMessage, &c).unwrap();
        assert_eq!(qa, "capital of France?");
        assert_eq!(qb, "France's capital?");
        assert_eq!(sa, sb, "only the last question differs");
        assert_ne!(sa, sc, "an earlier turn differs");
        let turns = [
            msg("user", "hi"),
            msg("assistant", "hello"),
            msg("user", "q"),
        ];
        let other = [
            msg("user", "yo"),
            msg("assistant", "hello"),
            msg("user", "q"),
        ];
        assert_ne!(
            split(SemanticScope::LastUserMessage, &turns).unwrap().1,
            split(SemanticScope::LastUserMessage, &other).unwrap().1
        );
        assert!(split(SemanticScope::LastUserMessage, &[msg("system", "x")]).is_none());
    }

    #[test]
    fn conversation_scope_embeds_every_turn() {
        let turns = [
            msg("user", "hi"),
            msg("assistant", "hello"),
            msg("user", "q"),
        ];
        let (text, scope) = split(SemanticScope::Conversation, &turns).unwrap();
        assert_eq!(text, "user: hi\nassistant: hello\nuser: q");
        assert_eq!(scope, json!(null));
    }
}
