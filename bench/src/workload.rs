//! The prompts a load run sends: a built-in set of questions, each with
//! paraphrases, mixed so that a chosen share of requests repeats an earlier
//! prompt exactly and another share paraphrases one (what response and
//! semantic caches see in production).

/// Built-in questions, each followed by paraphrases.
const QUESTIONS: &[&[&str]] = &[
    &[
        "What is the capital of France?",
        "Which city is the capital of France?",
        "Name France's capital city.",
    ],
    &[
        "How do I reverse a list in Python?",
        "What's the way to reverse a Python list?",
        "Reverse a list in Python: how?",
    ],
    &[
        "Explain continuous batching.",
        "What is continuous batching in LLM serving?",
        "Describe continuous batching briefly.",
    ],
    &[
        "Summarise the plot of Hamlet.",
        "Give a short summary of Hamlet.",
        "What happens in Hamlet, in brief?",
    ],
    &[
        "What is a KV cache?",
        "Explain the key-value cache of a transformer.",
        "Why do transformers keep a KV cache?",
    ],
    &[
        "Translate 'good morning' into German.",
        "How do you say good morning in German?",
        "German for 'good morning'?",
    ],
    &[
        "List three prime numbers.",
        "Name three primes.",
        "Give me three prime numbers.",
    ],
    &[
        "What does Kubernetes do?",
        "Explain what Kubernetes is for.",
        "Why would I use Kubernetes?",
    ],
];

/// Deterministic generator (SplitMix64) so runs are repeatable.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A uniform draw in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n.saturating_sub(1))
    }
}

/// Where a prompt came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Never sent before in this run.
    Fresh,
    /// Exactly an earlier prompt.
    Repeat,
    /// A paraphrase of an earlier prompt.
    Paraphrase,
}

/// Words fresh prompts are built from, so that they differ in meaning from
/// each other and from the built-in questions (a semantic cache must not
/// answer them).
#[rustfmt::skip]
const WORDS: &[&str] = &[
    "glacier", "violin", "mortgage", "volcano", "sonnet", "enzyme", "harbor", "tariff", "falcon",
    "quartz", "ballet", "vaccine", "canyon", "ledger", "orchid", "turbine", "monsoon", "sculpture",
    "algebra", "pirate", "saffron", "telescope", "marathon", "parliament", "lullaby", "bamboo",
    "satellite", "origami", "espresso", "tsunami", "chess", "cathedral", "pottery", "nebula",
    "referendum", "waffle", "archery", "tundra", "opera", "compost",
];

/// A fresh prompt: a question about a random combination of words, with
/// the request number so that it is never a repeat by accident.
fn fresh_prompt(rng: &mut Rng, i: usize) -> String {
    let mut pick = || WORDS[rng.below(WORDS.len())];
    let (a, b, c) = (pick(), pick(), pick());
    format!("Write a short story about a {a}, a {b} and a {c} (request {i}).")
}

/// `count` prompts: `repeat_share` exact repeats of earlier prompts,
/// `paraphrase_share` paraphrases of a built-in question sent earlier, the
/// rest fresh: first the built-in questions' first forms, then prompts that
/// mean something new (see [`fresh_prompt`]). `own` prompts replace the
/// built-in set (no paraphrases then).
pub fn mix(
    count: usize,
    repeat_share: f64,
    paraphrase_share: f64,
    seed: u64,
    own: &[String],
) -> Vec<(String, Origin)> {
    let mut rng = Rng::new(seed);
    // Every prompt sent, and which built-in question it asks (if one).
    let mut sent: Vec<(Option<usize>, String)> = Vec::new();
    let mut asked: Vec<usize> = Vec::new();
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let u = rng.unit();
        if !sent.is_empty() && u < repeat_share {
            let (_, text) = &sent[rng.below(sent.len())];
            out.push((text.clone(), Origin::Repeat));
            continue;
        }
        if !asked.is_empty() && u < repeat_share + paraphrase_share && own.is_empty() {
            let forms = QUESTIONS[asked[rng.below(asked.len())]];
            let form = forms[1 + rng.below(forms.len() - 1)];
            out.push((form.to_owned(), Origin::Paraphrase));
            continue;
        }
        let (group, text) = if !own.is_empty() {
            (None, own[rng.below(own.len())].clone())
        } else if asked.len() < QUESTIONS.len() && rng.unit() < 0.5 {
            let g = (0..QUESTIONS.len())
                .find(|g| !asked.contains(g))
                .unwrap_or(0);
            asked.push(g);
            (Some(g), QUESTIONS[g][0].to_owned())
        } else {
            (None, fresh_prompt(&mut rng, i))
        };
        sent.push((group, text.clone()));
        out.push((text, Origin::Fresh));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_respected_and_runs_repeat() {
        let prompts = mix(5000, 0.3, 0.2, 7, &[]);
        let share = |o: Origin| prompts.iter().filter(|(_, x)| *x == o).count() as f64 / 5000.0;
        assert!(
            (share(Origin::Repeat) - 0.3).abs() < 0.03,
            "{}",
            share(Origin::Repeat)
        );
        assert!(
            (share(Origin::Paraphrase) - 0.2).abs() < 0.03,
            "{}",
            share(Origin::Paraphrase)
        );
        assert_eq!(prompts, mix(5000, 0.3, 0.2, 7, &[]));
        let fresh: Vec<&String> = prompts
            .iter()
            .filter(|(_, o)| *o == Origin::Fresh)
            .map(|(t, _)| t)
            .collect();
        let unique: std::collections::BTreeSet<&&String> = fresh.iter().collect();
        assert_eq!(unique.len(), fresh.len(), "fresh prompts never repeat");
        for (k, (text, origin)) in prompts.iter().enumerate() {
            if *origin == Origin::Repeat {
                assert!(fresh.contains(&text));
            }
            if *origin == Origin::Paraphrase {
                let forms = QUESTIONS
                    .iter()
                    .find(|f| f.contains(&text.as_str()))
                    .unwrap();
                assert!(
                    prompts[..k]
                        .iter()
                        .any(|(t, o)| *o == Origin::Fresh && t == forms[0]),
                    "{text} paraphrases a question asked before"
                );
            }
        }
    }
}
