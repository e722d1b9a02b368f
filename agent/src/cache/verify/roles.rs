//! Roles: the same words in a different order around a pivot is a
//! different question ("flights from Paris to Rome" / "from Rome to
//! Paris", "is Java faster than Go" / "is Go faster than Java", "does the
//! dog chase the cat" / "does the cat chase the dog").
//!
//! Two checks, on words that occur once in each question:
//!
//! * Swapped around a pivot: two shared words `x`, `y` in opposite order,
//!   with a third shared word (not an article) between them in both
//!   questions, or the same words between them in both. Moving a
//!   phrase ("in Python, how do I sort a list" / "how do I sort a list in
//!   Python") keeps no word between the moved pair in both orders, so it
//!   passes. Symmetric connectors (`and`, `or`, `vs`, `between`, `with`,
//!   commas) are never pivots: "TCP or UDP" asks what "UDP or TCP" asks.
//!   Any script with spaces between words.
//! * Bound by role words (English): two role words (`from`, `to`, `than`,
//!   `into`, `before`, `after`, `over`, `under`, `per`, `against`, `by`,
//!   `for`), each once in each question, that exchanged the words they
//!   bind (the next word that is not an article) moved the roles ("to
//!   Rome from Paris" / "from Rome to Paris").
//!
//! The swapped words are content words: English function words
//! (auxiliaries, pronouns, question words) moving around ("what is the
//! meaning of life" / "what do they say the meaning of life is") are not
//! roles. Other languages have no such list, so there a moved auxiliary
//! vetoes a paraphrase (never a wrong hit).

use super::Veto;
use super::text::Question;

const SYMMETRIC: &[&str] = &[
    "and", "or", "vs", "versus", "between", "with", "nor", "plus", "both", "either", "&", "y", "o",
    "et", "ou", "und", "oder", "e", "en",
];

/// English function words that are never the swapped pair.
const FUNCTION_WORDS: &[&str] = &[
    "is", "are", "was", "were", "be", "been", "being", "am", "do", "does", "did", "have", "has",
    "had", "can", "could", "should", "would", "will", "shall", "may", "might", "must", "what",
    "which", "who", "whom", "whose", "how", "why", "when", "where", "i", "you", "we", "they", "he",
    "she", "it", "me", "us", "them", "there", "here", "to", "in", "on", "at", "of", "from", "than",
    "into", "for", "by", "about", "say", "tell", "explain", "please", "way", "best", "s",
];

const ROLE_WORDS: &[&str] = &[
    "from", "to", "than", "into", "onto", "before", "after", "over", "under", "per", "against",
    "by", "for", "toward", "towards",
];

/// Words (articles and the like) skipped when reading what a role word
/// binds.
const FILLERS: &[&str] = &[
    "a", "an", "the", "my", "your", "our", "their", "his", "her", "its", "this", "that", "some",
];

/// Whether the roles of the shared words agree in `a` and `b`.
pub fn check(a: &Question, b: &Question) -> Result<(), Veto> {
    if swapped_around_pivot(a, b) || rebound(a, b) {
        return Err(Veto::Roles);
    }
    Ok(())
}

/// Positions of the words that occur exactly once in `q`, by stem.
fn unique_positions(q: &Question) -> Vec<(&str, usize)> {
    q.tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| q.tokens.iter().filter(|u| u.stem == t.stem).count() == 1)
        .map(|(i, t)| (t.stem.as_str(), i))
        .collect()
}

fn swapped_around_pivot(a: &Question, b: &Question) -> bool {
    let pa = unique_positions(a);
    let pb = unique_positions(b);
    // Shared content words with their positions in a and in b.
    let shared: Vec<(&str, usize, usize)> = pa
        .iter()
        .filter(|(w, _)| {
            ![SYMMETRIC, FILLERS, FUNCTION_WORDS]
                .iter()
                .any(|l| l.contains(w))
        })
        .filter_map(|&(w, i)| pb.iter().find(|(v, _)| *v == w).map(|&(_, j)| (w, i, j)))
        .collect();
    let between = |q: &'_ Question, i: usize, j: usize| -> Vec<String> {
        q.tokens[i.min(j) + 1..i.max(j)]
            .iter()
            .map(|t| t.stem.clone())
            .collect()
    };
    for (n, &(_, xa, xb)) in shared.iter().enumerate() {
        for &(_, ya, yb) in &shared[n + 1..] {
            if (xa < ya) == (xb < yb) {
                continue;
            }
            let (in_a, in_b) = (between(a, xa, ya), between(b, xb, yb));
            let symmetric = |v: &[String]| v.iter().any(|w| SYMMETRIC.contains(&w.as_str()));
            if symmetric(&in_a) || symmetric(&in_b) {
                continue;
            }
            let same_filling = !in_a.is_empty() && in_a == in_b;
            let pivot = in_a
                .iter()
                .any(|w| !FILLERS.contains(&w.as_str()) && in_b.contains(w));
            if same_filling || pivot {
                return true;
            }
        }
    }
    false
}

/// What each role word that occurs once binds: the next word that is
/// not a filler.
fn bindings(q: &Question) -> Vec<(&str, &str)> {
    let t = &q.tokens;
    (0..t.len())
        .filter(|&i| ROLE_WORDS.contains(&t[i].norm.as_str()))
        .filter(|&i| t.iter().filter(|u| u.norm == t[i].norm).count() == 1)
        .filter_map(|i| {
            let bound = t[i + 1..]
                .iter()
                .find(|u| !FILLERS.contains(&u.norm.as_str()))?;
            Some((t[i].norm.as_str(), bound.stem.as_str()))
        })
        .collect()
}

/// Two role words that exchanged what they bind: `r1 → x, r2 → y` in one
/// question, `r1 → y, r2 → x` in the other.
fn rebound(a: &Question, b: &Question) -> bool {
    let (ba, bb) = (bindings(a), bindings(b));
    ba.iter().any(|&(r1, x)| {
        ba.iter()
            .any(|&(r2, y)| r1 != r2 && x != y && bb.contains(&(r1, y)) && bb.contains(&(r2, x)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(a: &str, b: &str) -> Result<(), Veto> {
        check(&Question::parse(a), &Question::parse(b))
    }

    #[test]
    fn swapped_roles_are_vetoed() {
        for (a, b) in [
            (
                "Cheap flights from Paris to Rome",
                "Cheap flights from Rome to Paris",
            ),
            (
                "Transfer $50 from checking to savings",
                "Transfer $50 from savings to checking",
            ),
            ("Is Java faster than Go?", "Is Go faster than Java?"),
            ("Does the dog chase the cat?", "Does the cat chase the dog?"),
            ("Is a square a rectangle?", "Is a rectangle a square?"),
            ("Convert PDF to Word", "Convert Word to PDF"),
            ("Flights to Rome from Paris", "Flights from Rome to Paris"),
            (
                "How many cups are in a liter?",
                "How many liters are in a cup?",
            ),
            ("¿El perro persigue al gato?", "¿El gato persigue al perro?"),
        ] {
            assert_eq!(verdict(a, b), Err(Veto::Roles), "{a} / {b}");
        }
    }

    #[test]
    fn reordered_paraphrases_pass() {
        for (a, b) in [
            ("Flights from Paris to Rome", "Flights to Rome from Paris"),
            (
                "How do I sort a list in Python?",
                "In Python, how do I sort a list?",
            ),
            (
                "Difference between TCP and UDP",
                "Difference between UDP and TCP",
            ),
            (
                "Is a tomato a fruit or a vegetable?",
                "Is a tomato a vegetable or a fruit?",
            ),
            (
                "Which is bigger, the sun or the moon?",
                "Is the moon bigger than the sun?",
            ),
            ("What is the population of Tokyo?", "Tokyo's population?"),
            (
                "Python vs Java for beginners",
                "Java vs Python for beginners",
            ),
            (
                "How many calories are in an apple?",
                "An apple has how many calories?",
            ),
            (
                "How do I remove duplicates from a list?",
                "Remove duplicate items from a Python list",
            ),
            (
                "What is the meaning of life?",
                "What do philosophers say the meaning of life is?",
            ),
        ] {
            assert_eq!(verdict(a, b), Ok(()), "{a} / {b}");
        }
    }
}
