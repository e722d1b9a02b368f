//! Shaping a prompt before it is tokenized: the conservative rewrite that
//! saves tokens without changing a word ([`optimize`]), and fitting a long
//! chat into the model's context by dropping its oldest turns
//! ([`fit_turns`]). Both run before the cache key is computed, so an
//! optimized prompt also meets more cache hits.

use weir_engine::tokenizer::ChatMessage;

use crate::api::ApiError;

/// The conservative rewrite of one text: trailing spaces go; runs of spaces
/// and tabs inside a line become one space (indentation is kept); a line
/// repeating the one before it goes; runs of blank lines become one; list
/// markers `*`, `+`, `•` become `-` followed by one space. Words, their
/// order and the line structure otherwise stay as written. Code fences
/// (```` ``` ````) are left untouched inside.
pub fn optimize(text: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            out.push(line.trim_end().to_owned());
            continue;
        }
        if in_code {
            out.push(line.to_owned());
            continue;
        }
        let line = squeeze(line);
        let blank = line.is_empty();
        let repeats = out.last().is_some_and(|prev| *prev == line);
        if repeats && (blank || !is_structural(&line)) {
            continue;
        }
        out.push(line);
    }
    // Leading and trailing blank lines carry nothing.
    while out.last().is_some_and(String::is_empty) {
        out.pop();
    }
    let first = out.iter().position(|l| !l.is_empty()).unwrap_or(out.len());
    out[first..].join("\n")
}

/// Lines that may repeat on purpose (table rules, separators).
fn is_structural(line: &str) -> bool {
    line.chars()
        .all(|c| matches!(c, '-' | '=' | '|' | '+' | '*' | ' '))
}

/// One line with its indentation kept, inner whitespace runs squeezed,
/// trailing whitespace gone and its list marker made uniform.
fn squeeze(line: &str) -> String {
    let body = line.trim_start();
    let indent = &line[..line.len() - body.len()];
    let body = match body.split_once(char::is_whitespace) {
        Some(("*" | "+" | "•", rest)) => format!("- {rest}"),
        _ => body.to_owned(),
    };
    let mut squeezed = String::with_capacity(line.len());
    squeezed.push_str(indent);
    let mut space = false;
    for c in body.trim_end().chars() {
        if c == ' ' || c == '\t' {
            if !space {
                squeezed.push(' ');
            }
            space = true;
        } else {
            squeezed.push(c);
            space = false;
        }
    }
    if squeezed.trim().is_empty() {
        return String::new();
    }
    squeezed
}

/// A chat fitted into the context.
#[derive(Debug)]
pub struct Fitted {
    /// The messages kept.
    pub messages: Vec<ChatMessage>,
    /// Their prompt's token ids.
    pub prompt: Vec<u32>,
    /// Turns dropped (a user message with the replies after it).
    pub dropped: usize,
}

/// Fits `messages` so that their prompt (`render` turns messages into token
/// ids) leaves `reserve` tokens of a `limit`-token context: the oldest
/// turns go first, the leading system messages and the last user turn
/// (with what follows it) always stay. Error if even that does not fit.
pub fn fit_turns(
    messages: Vec<ChatMessage>,
    limit: usize,
    reserve: usize,
    render: impl Fn(&[ChatMessage]) -> Result<Vec<u32>, ApiError>,
) -> Result<Fitted, ApiError> {
    let budget = limit.saturating_sub(reserve.max(1));
    let prompt = render(&messages)?;
    if prompt.len() <= budget {
        return Ok(Fitted {
            messages,
            prompt,
            dropped: 0,
        });
    }
    let head = messages.iter().take_while(|m| m.role == "system").count();
    let last_user = messages
        .iter()
        .rposition(|m| m.role == "user")
        .filter(|i| *i >= head)
        .unwrap_or(messages.len());
    // Turn starts between the system messages and the last user turn.
    let starts: Vec<usize> = (head..last_user)
        .filter(|&i| i == head || messages[i].role == "user")
        .collect();
    let without = |turns: usize| -> Vec<ChatMessage> {
        let from = starts.get(turns).copied().unwrap_or(last_user);
        messages[..head]
            .iter()
            .chain(&messages[from..])
            .cloned()
            .collect()
    };
    // Fewest turns to drop: dropping more never makes the prompt longer.
    let (mut lo, mut hi) = (1, starts.len());
    let mut best = None;
    while lo <= hi {
        let mid = (lo + hi) / 2;
        let kept = without(mid);
        let ids = render(&kept)?;
        if ids.len() <= budget {
            best = Some((mid, kept, ids));
            hi = mid - 1;
        } else {
            lo = mid + 1;
        }
    }
    match best {
        Some((dropped, messages, prompt)) => Ok(Fitted {
            messages,
            prompt,
            dropped,
        }),
        None => Err(ApiError::invalid(
            "messages",
            format!(
                "the system messages and the last user turn alone take more than {budget} of \
                 this model's {limit} context tokens (with {reserve} kept for the answer)"
            ),
        )),
    }
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

    /// One token per word, plus one per message.
    fn words(messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
        let n: usize = messages
            .iter()
            .map(|m| 1 + m.content.split_whitespace().count())
            .sum();
        Ok(vec![7; n])
    }

    #[test]
    fn optimize_squeezes_whitespace_repeats_and_markers_only() {
        let text =
            "  Hello   world  \n\n\n\n* one\n+  two\n•\tthree\nsame line\nsame line\n---\n---\n";
        assert_eq!(
            optimize(text),
            "  Hello world\n\n- one\n- two\n- three\nsame line\n---\n---"
        );
        let code = "```\nlet  x =  1;\nlet  x =  1;\n```";
        assert_eq!(optimize(code), code, "code is left alone");
        let plain = "Nothing to do here.";
        assert_eq!(optimize(plain), plain);
        let words_of = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
        let spaced = "a  b\tc   d";
        assert_eq!(words_of(&optimize(spaced)), words_of(spaced));
    }

    #[test]
    fn a_chat_that_fits_is_untouched() {
        let chat = vec![msg("system", "be brief"), msg("user", "hi there")];
        let fitted = fit_turns(chat.clone(), 100, 10, words).unwrap();
        assert_eq!(fitted.dropped, 0);
        assert_eq!(fitted.messages.len(), 2);
    }

    #[test]
    fn oldest_turns_go_first_and_system_and_last_user_stay() {
        let mut chat = vec![msg("system", "you are a helpful assistant")];
        for i in 0..10 {
            chat.push(msg("user", &format!("question {i} with some words")));
            chat.push(msg(
                "assistant",
                &format!("answer {i} with some more words"),
            ));
        }
        chat.push(msg("user", "the last question"));
        let full = words(&chat).unwrap().len();
        let fitted = fit_turns(chat.clone(), full - 5, 10, words).unwrap();
        assert!(fitted.prompt.len() <= full - 5 - 10, "within the context");
        assert!(fitted.dropped >= 1);
        assert_eq!(fitted.messages[0], chat[0], "system kept");
        assert_eq!(fitted.messages.last(), chat.last(), "last user turn kept");
        // The turns kept are the newest, whole and in order.
        let kept = &fitted.messages[1..];
        assert_eq!(kept, &chat[chat.len() - kept.len()..]);
        assert_eq!(kept[0].role, "user", "no reply without its question");
        // The fewest turns were dropped.
        let one_less = fitted.dropped - 1;
        if one_less > 0 {
            let from = 1 + 2 * one_less;
            let more: Vec<_> = chat[..1].iter().chain(&chat[from..]).cloned().collect();
            assert!(words(&more).unwrap().len() > full - 5 - 10);
        }
    }

    #[test]
    fn when_even_the_last_turn_is_too_long_it_is_an_error() {
        let chat = vec![
            msg("system", "s"),
            msg("user", "old"),
            msg("user", &"word ".repeat(200)),
        ];
        let err = fit_turns(chat, 100, 10, words).unwrap_err();
        assert_eq!(err.status().as_u16(), 400);
    }
}
