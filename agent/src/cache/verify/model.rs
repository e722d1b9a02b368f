//! The model check: the served LLM is asked whether two questions ask the
//! same thing, as a constrained yes/no question — a short prompt, one
//! greedy token, and its top alternatives. This module writes the
//! messages and reads the answer; `pipeline/semantic_cache.rs` runs it on
//! the verifier model's engine.
//!
//! Reading: the answer is yes only when the most likely of the `yes`/`no`
//! tokens (any case, leading space or not) among the first token's
//! alternatives is `yes` and it is the generated token or more likely than
//! every `no`. Anything else — no such token, an error, a timeout — is
//! not a yes, so a verifier that cannot answer never causes a hit.

use weir_engine::tokenizer::ChatMessage;

/// Alternatives asked for with the one token.
pub const TOP_ALTERNATIVES: usize = 5;

/// The chat messages asking whether `question` and `candidate` are the
/// same question.
pub fn prompt(question: &str, candidate: &str) -> Vec<ChatMessage> {
    let system = "You check a cache. Two questions are the same when one answer \
                  answers both exactly: same entities in the same roles, same numbers, \
                  same negation, same direction. Answer with one word: yes or no.";
    let user = format!(
        "Question A: {}\nQuestion B: {}\nDo A and B ask the same thing?",
        clip(question),
        clip(candidate)
    );
    vec![
        ChatMessage {
            role: "system".into(),
            content: system.into(),
            ..Default::default()
        },
        ChatMessage {
            role: "user".into(),
            content: user,
            ..Default::default()
        },
    ]
}

/// At most 1,000 characters of a question (the check is a short prefill).
fn clip(text: &str) -> &str {
    match text.char_indices().nth(1000) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// What a token's text says: `Some(true)` for yes, `Some(false)` for no.
fn says(token: &str) -> Option<bool> {
    match token
        .trim()
        .trim_matches(|c: char| !c.is_alphanumeric())
        .to_lowercase()
        .as_str()
    {
        "yes" | "y" => Some(true),
        "no" | "n" => Some(false),
        _ => None,
    }
}

/// Whether the model's first token (`generated`) with its alternatives
/// (`top`, token and log probability) says yes.
pub fn read_answer(generated: &str, top: &[(String, f32)]) -> bool {
    let best = |want: bool| {
        top.iter()
            .filter(|(t, _)| says(t) == Some(want))
            .map(|(_, p)| *p)
            .fold(f32::NEG_INFINITY, f32::max)
    };
    match says(generated) {
        Some(false) => false,
        Some(true) => best(true) >= best(false),
        None => best(true) > best(false) && best(true).is_finite(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alts(v: &[(&str, f32)]) -> Vec<(String, f32)> {
        v.iter().map(|(t, p)| ((*t).to_owned(), *p)).collect()
    }

    #[test]
    fn only_a_clear_yes_is_a_yes() {
        assert!(read_answer("Yes", &alts(&[("Yes", -0.1), ("No", -2.5)])));
        assert!(read_answer(" yes.", &[]));
        assert!(!read_answer("No", &alts(&[("No", -0.1), ("Yes", -2.5)])));
        assert!(!read_answer("Maybe", &alts(&[("Maybe", -0.1)])));
        assert!(read_answer(
            "Sure",
            &alts(&[("Sure", -0.1), (" yes", -1.0), ("no", -3.0)])
        ));
        assert!(!read_answer(
            "Sure",
            &alts(&[("Sure", -0.1), (" yes", -3.0), ("no", -1.0)])
        ));
        assert!(!read_answer("", &[]));
    }

    #[test]
    fn the_prompt_names_both_questions_and_is_short() {
        let long = "x".repeat(5000);
        let m = prompt("from Paris to Rome", &long);
        assert_eq!(m.len(), 2);
        assert!(m[1].content.contains("Question A: from Paris to Rome"));
        assert!(m[1].content.len() < 1200, "{}", m[1].content.len());
    }
}
