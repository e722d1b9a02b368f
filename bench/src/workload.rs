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

/// `count` prompts: `repeat_share` exact repeats, `paraphrase_share`
/// paraphrases, the rest fresh (a fresh prompt carries a unique suffix, so
/// it is never a repeat by accident).
pub fn mix(
    count: usize,
    repeat_share: f64,
    paraphrase_share: f64,
    seed: u64,
    own: &[String],
) -> Vec<(String, Origin)> {
    let mut rng = Rng::new(seed);
    let mut sent: Vec<(usize, usize, String)> = Vec::new();
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let u = rng.unit();
        if !sent.is_empty() && u < repeat_share {
            let (_, _, text) = &sent[rng.below(sent.len())];
            out.push((text.clone(), Origin::Repeat));
        } else if !sent.is_empty() && u < repeat_share + paraphrase_share && own.is_empty() {
            let (q, variant, _) = sent[rng.below(sent.len())].clone();
            let forms = QUESTIONS[q];
            let other = (variant + 1 + rng.below(forms.len() - 1)) % forms.len();
            out.push((forms[other].to_owned(), Origin::Paraphrase));
        } else {
            let text = if own.is_empty() {
                let q = rng.below(QUESTIONS.len());
                format!("{} (request {i})", QUESTIONS[q][0])
            } else {
                own[rng.below(own.len())].clone()
            };
            let q = rng.below(QUESTIONS.len());
            sent.push((q, 0, text.clone()));
            out.push((text, Origin::Fresh));
        }
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
        for (text, origin) in &prompts {
            if *origin == Origin::Repeat {
                assert!(fresh.contains(&text));
            }
        }
    }
}
