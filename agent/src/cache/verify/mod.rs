//! The semantic cache's verifier: decides whether a candidate the
//! embedding index found asks the same thing as the question, before its
//! answer may be served. Embeddings place "flights from Paris to Rome" and
//! "flights from Rome to Paris" at cosine 0.99; the verifier is what tells
//! them apart.
//!
//! Checks run cheapest first and each may veto:
//!
//! 1. facts ([`facts`]): numbers and versions, units, dates, quoted
//!    strings and names must agree;
//! 2. polarity ([`polarity`]): negation and opposite words must agree;
//! 3. roles ([`roles`]): the same words in a different order around a
//!    pivot or a role word is a different question;
//! 4. optionally a model ([`model`]): the served LLM asked a yes/no
//!    question (the caller runs it; this module writes the prompt and
//!    reads the answer).
//!
//! Guarantees: the rules are pure functions of the two texts, symmetric in
//! them, and take microseconds (no allocation beyond the token lists).
//! Caveats: they can only veto — a pair they pass may still differ in a
//! way no rule reads (a changed common noun: "learn guitar" / "learn
//! piano"); that is what the model check is for. Which rules are English
//! only is said in each module.

pub mod facts;
pub mod model;
pub mod polarity;
pub mod roles;
pub mod text;

use text::Question;

/// Why a candidate was not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Veto {
    /// Numbers or versions differ.
    Numbers,
    /// Units or currencies differ.
    Units,
    /// Dates differ.
    Dates,
    /// A quoted string is missing from the other question.
    Quotes,
    /// A name is missing from the other question.
    Names,
    /// One question is negated and the other is not.
    Negation,
    /// Opposite words (in/out, faster/slower).
    Opposites,
    /// The same words in swapped roles.
    Roles,
    /// The verifier model said no.
    Model,
    /// The verifier model was missing, failed or too slow.
    ModelUnavailable,
}

impl Veto {
    /// Metric label and `x-weir-semantic-veto` value.
    pub fn label(self) -> &'static str {
        match self {
            Veto::Numbers => "numbers",
            Veto::Units => "units",
            Veto::Dates => "dates",
            Veto::Quotes => "quotes",
            Veto::Names => "names",
            Veto::Negation => "negation",
            Veto::Opposites => "opposites",
            Veto::Roles => "roles",
            Veto::Model => "model",
            Veto::ModelUnavailable => "model_unavailable",
        }
    }
}

/// The rules' verdict on whether `a` and `b` ask the same thing: `Ok` when
/// no rule vetoes.
pub fn rules(a: &str, b: &str) -> Result<(), Veto> {
    if a == b {
        return Ok(());
    }
    let (mut qa, mut qb) = (Question::parse(a), Question::parse(b));
    facts::check(&qa, &qb)?;
    facts::canonical_units(&mut qa);
    facts::canonical_units(&mut qb);
    polarity::check(&qa, &qb)?;
    roles::check(&qa, &qb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_symmetric_and_ordered_cheapest_first() {
        let pairs = [
            (
                "Flights from Paris to Rome in May 2024",
                "Flights from Rome to Paris in May 2024",
            ),
            ("Is Rust not memory safe?", "Is Rust memory safe?"),
            ("Python 3.11 vs 3.12", "Python 3.11 vs 3.13"),
            ("How do I zoom in?", "How do I zoom out?"),
        ];
        let want = [Veto::Roles, Veto::Negation, Veto::Numbers, Veto::Opposites];
        for ((a, b), want) in pairs.into_iter().zip(want) {
            assert_eq!(rules(a, b), Err(want), "{a} / {b}");
            assert_eq!(rules(b, a), Err(want), "{b} / {a}");
        }
        // Numbers are read before roles.
        assert_eq!(
            rules("Move 5 files from a to b", "Move 6 files from b to a"),
            Err(Veto::Numbers)
        );
        assert_eq!(rules("same text", "same text"), Ok(()));
        assert_eq!(
            rules("What is 100 kg in pounds?", "What is 100 lbs in kilograms?"),
            Err(Veto::Roles),
            "unit words share a stem"
        );
        assert_eq!(
            rules(
                "What is the capital of France?",
                "Which city is the capital of France?"
            ),
            Ok(())
        );
    }
}
