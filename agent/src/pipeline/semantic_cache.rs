//! The semantic cache on the request path: which part of a conversation is
//! compared by meaning, the scope that must match exactly, the question's
//! vector from the policy's encoder, and storing the answer afterwards.
//!
//! With the default scope (`LastUserMessage`), the scope digest covers the
//! model, every output-changing parameter, the route and every message but
//! the last user message (whose place is kept), so only the wording of the
//! last question may differ. With `Conversation`, the whole conversation is
//! embedded and only the parameters must match. An encoder that is missing
//! or busy never fails a request: the lookup is skipped and counted.

use std::sync::Arc;

use serde_json::json;
use weir_crds::cache_policy::SemanticScope;
use weir_engine::tokenizer::ChatMessage;

use super::response_cache as reuse;
use crate::cache::semantic::{SemanticFill, SemanticHit};
use crate::generate::Job;
use crate::metrics::{Metrics, ModelLabel};
use crate::models::{ServedEncoder, ServedModel};

/// The outcome of a semantic lookup.
pub enum Probe {
    /// A stored answer to a question with the same meaning.
    Hit(SemanticHit),
    /// None: store this request's answer when it is complete.
    Miss(SemanticFill),
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
/// and the job may be answered from a cache at all.
pub async fn probe(
    metrics: &Metrics,
    encoder_named: &impl Fn(&str) -> Option<Arc<ServedEncoder>>,
    model: &ServedModel,
    job: &Job,
) -> Option<Probe> {
    let index = model.semantic.clone()?;
    let input = job.semantic.as_ref()?;
    if job.prompts.len() != 1 || !reuse::cacheable(model, job) {
        return None;
    }
    let policy = &model.cache_policy.semantic_cache;
    let (question, context) = split(policy.scope, &input.messages)?;
    let unavailable = || {
        let label = ModelLabel {
            model_name: model.name.clone(),
        };
        metrics.semantic_unavailable.get_or_create(&label).inc();
    };
    let Some(encoder) = encoder_named(&policy.embedding_model) else {
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
    Some(match index.lookup(&scope, &vector) {
        Some(hit) => Probe::Hit(hit),
        None => Probe::Miss(SemanticFill::new(index, scope, vector)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
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
