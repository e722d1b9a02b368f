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
use std::time::Duration;

use serde_json::json;
use weir_crds::cache_policy::{SemanticCacheSpec, SemanticScope};
use weir_engine::tokenizer::ChatMessage;

use crate::cache::semantic::{SemanticHit, SemanticIndex};
use crate::cache::{CacheError, CacheKey, parse_bytes};
use crate::generate::Job;
use crate::metrics::ModelLabel;
use crate::models::ServedModel;
use crate::reuse;
use crate::server::AppState;

/// What to store once the answer is complete.
pub struct SemanticFill {
    index: Arc<SemanticIndex>,
    scope: CacheKey,
    vector: Vec<f32>,
}

impl SemanticFill {
    /// Stores `answer` for the question.
    pub fn store(&self, answer: Arc<[u8]>) {
        self.index.insert(self.scope, self.vector.clone(), answer);
    }
}

/// The outcome of a semantic lookup.
pub enum Probe {
    /// A stored answer to a question with the same meaning.
    Hit(SemanticHit),
    /// None: store this request's answer when it is complete.
    Miss(SemanticFill),
}

/// The index a policy asks for, if it enables the semantic cache.
pub fn build_index(spec: &SemanticCacheSpec) -> Result<Option<Arc<SemanticIndex>>, CacheError> {
    if !spec.enabled {
        return Ok(None);
    }
    let bytes = parse_bytes(&spec.max_bytes.0).map_err(|e| e.at("semanticCache.maxBytes"))?;
    Ok(Some(Arc::new(SemanticIndex::new(
        spec.max_entries,
        bytes,
        Duration::from_secs(u64::from(spec.ttl_seconds)),
        spec.threshold as f32,
    ))))
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
pub async fn probe(state: &AppState, model: &ServedModel, job: &Job) -> Option<Probe> {
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
        state
            .metrics
            .semantic_unavailable
            .get_or_create(&label)
            .inc();
    };
    let Some(encoder) = state.encoder(&policy.embedding_model) else {
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
        None => Probe::Miss(SemanticFill {
            index,
            scope,
            vector,
        }),
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
