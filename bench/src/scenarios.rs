//! Routing scenarios: sessions of chat turns, sent at a fixed concurrency,
//! each turn's answer appended to the history the session's next turn
//! sends.
//!
//! * `multi-turn` — conversations that grow their history turn by turn,
//!   all opening with one shared system prompt (as an application's users
//!   do): a replica that served a conversation's last turn holds its whole
//!   history in its prefix cache.
//! * `shared-prompt` — many users, one turn each, behind one long shared
//!   system prompt: a cache-greedy router would pile them onto one
//!   replica.
//! * `mix` — both at once, interleaved.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Value, json};

use crate::report::{Outcome, Summary};
use crate::request::one;
use crate::workload::Rng;

/// Which sessions to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Conversations growing their history.
    MultiTurn,
    /// Single turns behind one long system prompt.
    SharedPrompt,
    /// Both, interleaved.
    Mix,
}

impl std::str::FromStr for Workload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "multi-turn" => Self::MultiTurn,
            "shared-prompt" => Self::SharedPrompt,
            "mix" => Self::Mix,
            other => {
                return Err(format!(
                    "unknown workload `{other}` (multi-turn, shared-prompt, mix)"
                ));
            }
        })
    }
}

/// Sizes of a scenario.
#[derive(Clone, Debug)]
pub struct Options {
    /// Model name.
    pub model: String,
    /// Conversations (multi-turn and mix).
    pub conversations: usize,
    /// Turns per conversation.
    pub turns: usize,
    /// Single-turn users (shared-prompt and mix).
    pub users: usize,
    /// Sessions in flight at once.
    pub concurrency: usize,
    /// Tokens per answer.
    pub max_tokens: u32,
    /// Sentences in the shared system prompt.
    pub system_sentences: usize,
    /// Words in each user message.
    pub user_words: usize,
    /// Seed of the generated text.
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            model: "weir-tiny".into(),
            conversations: 16,
            turns: 4,
            users: 64,
            concurrency: 8,
            max_tokens: 16,
            system_sentences: 8,
            user_words: 24,
            seed: 1,
        }
    }
}

/// One session: a system prompt and the user messages of its turns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// The system prompt.
    pub system: String,
    /// The user's message of each turn.
    pub turns: Vec<String>,
}

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "river", "lantern", "copper", "meadow", "thunder", "pepper", "castle", "winter", "signal",
    "garden", "rocket", "marble", "forest", "candle", "bridge", "silver", "harbor", "puzzle",
    "engine", "orchard", "planet", "velvet", "anchor", "tiger", "window", "market", "cobalt",
    "desert", "feather", "island", "ladder", "mirror",
];

fn words(rng: &mut Rng, n: usize) -> String {
    (0..n)
        .map(|_| WORDS[((rng.unit() * WORDS.len() as f64) as usize).min(WORDS.len() - 1)])
        .collect::<Vec<_>>()
        .join(" ")
}

/// The shared system prompt: `sentences` sentences of instructions.
pub fn system_prompt(sentences: usize) -> String {
    (0..sentences)
        .map(|i| {
            format!(
                "Rule {i}: you are the assistant of the Weir weather service; answer briefly, \
                 politely and only about the weather."
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The sessions of `workload`, deterministic in `options.seed`.
pub fn sessions(workload: Workload, options: &Options) -> Vec<Session> {
    let mut rng = Rng::new(options.seed);
    let system = system_prompt(options.system_sentences);
    let mut session = |id: usize, turns: usize| Session {
        system: system.clone(),
        turns: (0..turns)
            .map(|t| {
                format!(
                    "User {id} turn {t}: {}",
                    words(&mut rng, options.user_words)
                )
            })
            .collect(),
    };
    let chats = |s: &mut dyn FnMut(usize, usize) -> Session| {
        (0..options.conversations)
            .map(|i| s(i, options.turns))
            .collect::<Vec<_>>()
    };
    match workload {
        Workload::MultiTurn => chats(&mut session),
        Workload::SharedPrompt => (0..options.users).map(|i| session(i, 1)).collect(),
        Workload::Mix => {
            let conversations = chats(&mut session);
            let singles: Vec<Session> = (0..options.users)
                .map(|i| session(options.conversations + i, 1))
                .collect();
            let mut out = Vec::with_capacity(conversations.len() + singles.len());
            let (mut a, mut b) = (conversations.into_iter(), singles.into_iter());
            loop {
                match (a.next(), b.next()) {
                    (None, None) => break,
                    (x, y) => out.extend(x.into_iter().chain(y)),
                }
            }
            out
        }
    }
}

/// Where in a queue of `len` waiting sessions one whose answer just came
/// in goes back: a seeded draw from its later half (`len / 2 ..= len`).
///
/// Always at the back, every session would keep its place in a fixed
/// cycle: with `n` sessions, its turns would be requests `i`, `i + n`,
/// `i + 2n`, … and round-robin over a number of replicas dividing `n`
/// would send all of a conversation's turns to one replica, a sticky and
/// perfectly balanced placement no real traffic gives it. The draw stands
/// for users' differing pauses between turns, and still puts about half
/// the others' turns between two of one session's.
pub fn requeue_at(len: usize, rng: &mut Rng) -> usize {
    let from = len / 2;
    from + ((rng.unit() * (len - from + 1) as f64) as usize).min(len - from)
}

/// Sends `sessions` to `entries` (session `i` enters at `entries[i %
/// len]`), `options.concurrency` turns at a time, streaming. Turns are
/// taken from one queue: a session's next turn goes back into it once its
/// answer is in, at [`requeue_at`], so other users' turns come between
/// two of its own (as people chatting at once do) and no replica sees one
/// conversation's turns back to back by accident. The summary covers
/// every turn.
pub async fn run(entries: &[String], options: &Options, sessions: Vec<Session>) -> Summary {
    let (outcomes, elapsed) = send(entries, options, sessions).await;
    Summary::of(&outcomes, elapsed)
}

/// What [`run`] summarizes: every turn's outcome and the time they took,
/// for pooling several runs into one summary.
pub async fn send(
    entries: &[String],
    options: &Options,
    sessions: Vec<Session>,
) -> (Vec<Outcome>, std::time::Duration) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(options.concurrency)
        .build()
        .unwrap_or_default();
    let sessions = Arc::new(sessions);
    let entries: Arc<Vec<String>> = Arc::new(entries.to_vec());
    // (session, its messages so far); a session is in the queue or in flight.
    let queue: VecDeque<(usize, Vec<Value>)> = (0..sessions.len())
        .map(|i| {
            (
                i,
                vec![json!({"role": "system", "content": sessions[i].system})],
            )
        })
        .collect();
    let queue = Arc::new(Mutex::new((queue, Rng::new(options.seed ^ 0x5EED))));
    let left = Arc::new(AtomicUsize::new(
        sessions.iter().map(|s| s.turns.len()).sum(),
    ));
    let started = Instant::now();
    let workers: Vec<_> = (0..options.concurrency.max(1))
        .map(|_| {
            let (client, queue, left) = (client.clone(), queue.clone(), left.clone());
            let (sessions, entries, options) = (sessions.clone(), entries.clone(), options.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while left.load(Ordering::Acquire) > 0 {
                    let next = queue
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                        .pop_front();
                    let Some((i, mut messages)) = next else {
                        // Every pending turn is in flight; one will requeue.
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                        continue;
                    };
                    let turn = messages.len() / 2;
                    messages.push(json!({"role": "user", "content": sessions[i].turns[turn]}));
                    let url = &entries[i % entries.len().max(1)];
                    let outcome = one(&client, url, request(&options, &messages)).await;
                    messages.push(json!({"role": "assistant", "content": outcome.text}));
                    outcomes.push(outcome);
                    left.fetch_sub(1, Ordering::AcqRel);
                    if turn + 1 < sessions[i].turns.len() {
                        let mut guard = queue.lock().unwrap_or_else(|p| p.into_inner());
                        let (waiting, rng) = &mut *guard;
                        let at = requeue_at(waiting.len(), rng);
                        waiting.insert(at, (i, messages));
                    }
                }
                outcomes
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.await.unwrap_or_default());
    }
    (outcomes, started.elapsed())
}

fn request(options: &Options, messages: &[Value]) -> Value {
    json!({
        "model": options.model, "messages": messages, "max_tokens": options.max_tokens,
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_share_the_system_prompt_and_differ_in_their_turns() {
        let o = Options {
            conversations: 3,
            turns: 4,
            users: 5,
            ..Options::default()
        };
        let chats = sessions(Workload::MultiTurn, &o);
        assert_eq!(chats.len(), 3);
        assert!(
            chats
                .iter()
                .all(|s| s.turns.len() == 4 && s.system == chats[0].system)
        );
        assert_ne!(chats[0].turns[0], chats[1].turns[0]);
        let singles = sessions(Workload::SharedPrompt, &o);
        assert_eq!(singles.len(), 5);
        assert!(singles.iter().all(|s| s.turns.len() == 1));
        let mix = sessions(Workload::Mix, &o);
        assert_eq!(mix.len(), 8);
        assert_eq!(
            mix.iter().map(|s| s.turns.len()).collect::<Vec<_>>(),
            vec![4, 1, 4, 1, 4, 1, 1, 1]
        );
        assert_eq!(sessions(Workload::Mix, &o), mix, "deterministic");
        assert_eq!("shared-prompt".parse(), Ok(Workload::SharedPrompt));
    }

    #[test]
    fn a_session_goes_back_into_the_later_half_of_the_queue_at_varying_places() {
        let mut rng = Rng::new(3);
        assert_eq!(requeue_at(0, &mut rng), 0);
        let places: Vec<usize> = (0..400).map(|_| requeue_at(12, &mut rng)).collect();
        assert!(places.iter().all(|p| (6..=12).contains(p)), "{places:?}");
        for p in 6..=12 {
            assert!(places.contains(&p), "{p} never drawn");
        }
    }
}
