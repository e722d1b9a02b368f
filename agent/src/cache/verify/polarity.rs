//! Polarity: negation and opposites must agree.
//!
//! * Negation: the number of negation words must be equal. The list
//!   covers English (`not` and every `n't`, `no`, `never`, `without`, …)
//!   and the common cues of French, German, Spanish, Italian, Portuguese
//!   and Dutch; other languages are not checked.
//! * Negating prefixes (English): a word on one side only whose
//!   counterpart on the other side is the same word with `un`, `in`,
//!   `im`, `il`, `ir`, `dis`, `non` or `a` before it (`safe`/`unsafe`,
//!   `synchronous`/`asynchronous`).
//! * Opposites (English): a table of pairs — directions (`in`/`out`,
//!   `up`/`down`), comparisons (`faster`/`slower`, `most`/`least`),
//!   actions (`encrypt`/`decrypt`, `buy`/`sell`) — where one word is on
//!   one side only and its opposite on the other side only.

use super::Veto;
use super::text::Question;

const NEGATIONS: &[&str] = &[
    // English ("n't" is read as "not")
    "not", "no", "never", "none", "nobody", "nothing", "nowhere", "neither", "nor", "without",
    "cannot", // French
    "ne", "pas", "jamais", "sans", "aucun", "aucune", // German
    "nicht", "kein", "keine", "keinen", "keiner", "keinem", "nie", "niemals", "ohne",
    // Spanish, Italian, Portuguese
    "nunca", "sin", "ni", "non", "senza", "mai", "não", "nem", "sem", // Dutch
    "niet", "geen", "nooit", "zonder",
];

const PREFIXES: &[&str] = &["un", "in", "im", "il", "ir", "dis", "non", "a"];

/// Pairs of opposite words (English). Either order.
const OPPOSITES: &[(&str, &str)] = &[
    ("in", "out"),
    ("up", "down"),
    ("on", "off"),
    ("into", "out"),
    ("left", "right"),
    ("north", "south"),
    ("east", "west"),
    ("forward", "backward"),
    ("forwards", "backwards"),
    ("above", "below"),
    ("over", "under"),
    ("inside", "outside"),
    ("before", "after"),
    ("earlier", "later"),
    ("earliest", "latest"),
    ("first", "last"),
    ("next", "previous"),
    ("next", "last"),
    ("past", "future"),
    ("more", "less"),
    ("more", "fewer"),
    ("most", "least"),
    ("max", "min"),
    ("maximum", "minimum"),
    ("high", "low"),
    ("higher", "lower"),
    ("highest", "lowest"),
    ("big", "small"),
    ("bigger", "smaller"),
    ("biggest", "smallest"),
    ("large", "small"),
    ("larger", "smaller"),
    ("largest", "smallest"),
    ("long", "short"),
    ("longer", "shorter"),
    ("longest", "shortest"),
    ("tall", "short"),
    ("taller", "shorter"),
    ("wide", "narrow"),
    ("thick", "thin"),
    ("deep", "shallow"),
    ("heavy", "light"),
    ("heavier", "lighter"),
    ("fast", "slow"),
    ("faster", "slower"),
    ("fastest", "slowest"),
    ("good", "bad"),
    ("better", "worse"),
    ("best", "worst"),
    ("cheap", "expensive"),
    ("cheaper", "pricier"),
    ("cheapest", "priciest"),
    ("easy", "hard"),
    ("easier", "harder"),
    ("easy", "difficult"),
    ("old", "new"),
    ("older", "newer"),
    ("oldest", "newest"),
    ("old", "young"),
    ("older", "younger"),
    ("oldest", "youngest"),
    ("hot", "cold"),
    ("hotter", "colder"),
    ("warm", "cool"),
    ("light", "dark"),
    ("strong", "weak"),
    ("stronger", "weaker"),
    ("full", "empty"),
    ("rich", "poor"),
    ("wet", "dry"),
    ("early", "late"),
    ("increase", "decrease"),
    ("increment", "decrement"),
    ("raise", "lower"),
    ("rise", "fall"),
    ("add", "remove"),
    ("add", "subtract"),
    ("plus", "minus"),
    ("multiply", "divide"),
    ("open", "close"),
    ("start", "stop"),
    ("start", "end"),
    ("begin", "end"),
    ("enable", "disable"),
    ("show", "hide"),
    ("expand", "collapse"),
    ("push", "pull"),
    ("import", "export"),
    ("upload", "download"),
    ("encrypt", "decrypt"),
    ("encode", "decode"),
    ("compress", "decompress"),
    ("serialize", "deserialize"),
    ("buy", "sell"),
    ("buyer", "seller"),
    ("win", "lose"),
    ("gain", "lose"),
    ("gain", "loss"),
    ("profit", "loss"),
    ("send", "receive"),
    ("sender", "receiver"),
    ("give", "take"),
    ("borrow", "lend"),
    ("deposit", "withdraw"),
    ("credit", "debit"),
    ("include", "exclude"),
    ("allow", "deny"),
    ("allow", "block"),
    ("accept", "reject"),
    ("enter", "exit"),
    ("arrive", "leave"),
    ("arrival", "departure"),
    ("join", "leave"),
    ("ascending", "descending"),
    ("asc", "desc"),
    ("horizontal", "vertical"),
    ("horizontally", "vertically"),
    ("upper", "lower"),
    ("uppercase", "lowercase"),
    ("inner", "outer"),
    ("input", "output"),
    ("inbound", "outbound"),
    ("incoming", "outgoing"),
    ("internal", "external"),
    ("public", "private"),
    ("static", "dynamic"),
    ("statically", "dynamically"),
    ("sync", "async"),
    ("client", "server"),
    ("frontend", "backend"),
    ("true", "false"),
    ("positive", "negative"),
    ("odd", "even"),
    ("pros", "cons"),
    ("benefits", "drawbacks"),
    ("advantages", "disadvantages"),
    ("strengths", "weaknesses"),
    ("same", "different"),
    ("similar", "different"),
    ("always", "never"),
    ("all", "none"),
    ("everything", "nothing"),
    ("male", "female"),
    ("men", "women"),
    ("man", "woman"),
    ("boy", "girl"),
    ("husband", "wife"),
    ("parent", "child"),
    ("employer", "employee"),
    ("teacher", "student"),
    ("day", "night"),
    ("morning", "evening"),
    ("sunrise", "sunset"),
    ("summer", "winter"),
    ("spring", "autumn"),
    ("attack", "defend"),
    ("offense", "defense"),
    ("love", "hate"),
    ("agree", "disagree"),
    ("mutable", "immutable"),
    ("lazy", "eager"),
    ("singular", "plural"),
];

/// The first polarity difference between `a` and `b`, if any.
pub fn check(a: &Question, b: &Question) -> Result<(), Veto> {
    let negations = |q: &Question| {
        q.tokens
            .iter()
            .filter(|t| NEGATIONS.contains(&t.norm.as_str()))
            .count()
    };
    if negations(a) != negations(b) {
        return Err(Veto::Negation);
    }
    let only = |x: &Question, y: &Question| -> Vec<String> {
        let mut v: Vec<String> = x
            .tokens
            .iter()
            .filter(|t| !y.has(&t.norm))
            .map(|t| t.norm.clone())
            .collect();
        v.dedup();
        v
    };
    let (only_a, only_b) = (only(a, b), only(b, a));
    for x in &only_a {
        for y in &only_b {
            if prefixed(x, y) || prefixed(y, x) {
                return Err(Veto::Negation);
            }
            if OPPOSITES
                .iter()
                .any(|&(p, q)| (p == x && q == y) || (p == y && q == x))
            {
                return Err(Veto::Opposites);
            }
        }
    }
    Ok(())
}

/// Whether `negated` is `word` with a negating prefix (`unsafe`, `safe`).
fn prefixed(negated: &str, word: &str) -> bool {
    word.chars().count() >= 4
        && PREFIXES.iter().any(|p| {
            negated.strip_prefix(p) == Some(word) && (*p != "a" || word.chars().count() >= 6)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(a: &str, b: &str) -> Result<(), Veto> {
        check(&Question::parse(a), &Question::parse(b))
    }

    #[test]
    fn negations_are_vetoed_in_several_languages() {
        for (a, b) in [
            (
                "Is Python statically typed?",
                "Is Python not statically typed?",
            ),
            ("Why does my build fail?", "Why doesn't my build fail?"),
            (
                "Can I run Docker with root?",
                "Can I run Docker without root?",
            ),
            ("Which foods have gluten?", "Which foods have no gluten?"),
            ("Warum funktioniert das?", "Warum funktioniert das nicht?"),
            ("¿Por qué funciona?", "¿Por qué no funciona?"),
            ("Is this code safe?", "Is this code unsafe?"),
            ("Is the call synchronous?", "Is the call asynchronous?"),
            (
                "How do I connect the drive?",
                "How do I disconnect the drive?",
            ),
        ] {
            assert_eq!(verdict(a, b), Err(Veto::Negation), "{a} / {b}");
        }
    }

    #[test]
    fn opposites_are_vetoed() {
        for (a, b) in [
            (
                "How do I zoom in on a photo?",
                "How do I zoom out on a photo?",
            ),
            (
                "Sort a list in ascending order",
                "Sort a list in descending order",
            ),
            (
                "How do I increase the volume?",
                "How do I decrease the volume?",
            ),
            (
                "What is the fastest sorting algorithm?",
                "What is the slowest sorting algorithm?",
            ),
            (
                "How to encrypt a file with gpg",
                "How to decrypt a file with gpg",
            ),
            (
                "Is it better to buy or rent?",
                "Is it worse to buy or rent?",
            ),
            (
                "What happens before a merge?",
                "What happens after a merge?",
            ),
        ] {
            assert_eq!(verdict(a, b), Err(Veto::Opposites), "{a} / {b}");
        }
    }

    #[test]
    fn paraphrases_keep_their_polarity() {
        for (a, b) in [
            ("Why isn't my code working?", "Why is my code not working?"),
            (
                "How can I make my website faster?",
                "Ways to speed up my website",
            ),
            ("What's the best way to learn Go?", "Best way to learn Go?"),
            ("How do I sign in to Gmail?", "How to log in to Gmail"),
            (
                "Is coffee bad for you?",
                "Is drinking coffee bad for your health?",
            ),
        ] {
            assert_eq!(verdict(a, b), Ok(()), "{a} / {b}");
        }
    }
}
