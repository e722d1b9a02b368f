//! Facts that must agree exactly: numbers and versions, units and
//! currencies, dates, quoted strings and names.
//!
//! * Numbers: every token with a digit (`3.11`, `v2`, `python3`, `1,000`
//!   = `1000`, `3rd` = `3`), plus English number words (`two`, `twenty
//!   five` = `25`, `dozen` = `12`). The sets must be equal. `one` is not
//!   read as a number (it is mostly a pronoun); a lone `1` against `one`,
//!   `a` or `an` is allowed.
//! * Units and currencies: a table of English unit words and symbols
//!   mapped to one name each (`kilometres`, `km` → `km`; `$`, `dollars` →
//!   `usd`); the sets must be equal.
//! * Dates: month and weekday names (English, with abbreviations) and
//!   relative days (`today`, `tomorrow`, `yesterday`, `tonight`).
//! * Quoted strings: each one must appear, case aside, in the other text
//!   (quoted there or not).
//! * Names: words with a capital not at a sentence start, acronyms and
//!   code-like tokens (`node.js`, `snake_case`) must appear in the other
//!   question. Any script with capitals; German capitalizes every noun,
//!   where this vetoes more paraphrases than it should (never a wrong hit).

use super::Veto;
use super::text::{Question, Token};

/// The first fact that differs between `a` and `b`, if any.
pub fn check(a: &Question, b: &Question) -> Result<(), Veto> {
    if !numbers_agree(a, b) {
        return Err(Veto::Numbers);
    }
    if !units_agree(a, b) {
        return Err(Veto::Units);
    }
    if set(a, date) != set(b, date) {
        return Err(Veto::Dates);
    }
    let quoted_in =
        |x: &Question, y: &Question| x.quoted.iter().all(|s| y.lower.contains(&s.to_lowercase()));
    if !quoted_in(a, b) || !quoted_in(b, a) {
        return Err(Veto::Quotes);
    }
    if !names_in(a, b) || !names_in(b, a) {
        return Err(Veto::Names);
    }
    Ok(())
}

fn set(q: &Question, read: fn(&Token) -> Option<&'static str>) -> Vec<&'static str> {
    let mut v: Vec<_> = q.tokens.iter().filter_map(read).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Unit sets must be equal when both questions name units; when only one
/// does, it may say "how many minutes" where the other says "how long",
/// unless the unit qualifies a number ("5 km").
fn units_agree(a: &Question, b: &Question) -> bool {
    let (ua, ub) = (set(a, unit), set(b, unit));
    match (ua.is_empty(), ub.is_empty()) {
        (false, false) => ua == ub,
        (true, true) => true,
        (true, false) => !unit_on_number(b),
        (false, true) => !unit_on_number(a),
    }
}

fn unit_on_number(q: &Question) -> bool {
    let number =
        |t: &Token| t.norm.chars().any(|c| c.is_ascii_digit()) || number_word(&t.norm).is_some();
    q.tokens.windows(2).any(|w| {
        (number(&w[0]) && unit(&w[1]).is_some()) || (unit(&w[0]).is_some() && number(&w[1]))
    })
}

fn numbers_agree(a: &Question, b: &Question) -> bool {
    let (na, nb) = (numbers(a), numbers(b));
    if na == nb {
        return true;
    }
    // "1 cup" against "a cup" / "one cup".
    let without_one =
        |n: &[String]| -> Vec<String> { n.iter().filter(|x| x.as_str() != "1").cloned().collect() };
    let says_one = |q: &Question| ["one", "a", "an"].iter().any(|w| q.has(w));
    without_one(&na) == without_one(&nb)
        && (na.contains(&"1".to_owned()) && says_one(b)
            || nb.contains(&"1".to_owned()) && says_one(a))
}

/// The numbers of `q`, normalized, sorted and without repeats.
fn numbers(q: &Question) -> Vec<String> {
    let mut out = Vec::new();
    let mut words = q.tokens.iter().peekable();
    while let Some(t) = words.next() {
        if t.norm.chars().any(|c| c.is_ascii_digit()) {
            out.push(digits(&t.norm));
        } else if let Some(n) = number_word(&t.norm) {
            let mut n = n;
            // "twenty five" is one number.
            if (20..100).contains(&n)
                && let Some(unit) = words.peek().and_then(|u| number_word(&u.norm))
                && unit < 10
            {
                n += unit;
                words.next();
            }
            out.push(n.to_string());
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// `1,000` → `1000`; `3rd` → `3`; anything else with a digit as it is.
fn digits(norm: &str) -> String {
    let plain = if norm.contains(',') && norm.chars().all(|c| c.is_ascii_digit() || c == ',') {
        norm.replace(',', "")
    } else {
        norm.to_owned()
    };
    for suffix in ["st", "nd", "rd", "th"] {
        if let Some(head) = plain.strip_suffix(suffix)
            && !head.is_empty()
            && head.chars().all(|c| c.is_ascii_digit())
        {
            return head.to_owned();
        }
    }
    plain
}

fn number_word(norm: &str) -> Option<u64> {
    const SMALL: [&str; 20] = [
        "zero",
        "",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    const TENS: [&str; 8] = [
        "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    ];
    if let Some(i) = SMALL.iter().position(|w| !w.is_empty() && *w == norm) {
        return Some(i as u64);
    }
    if let Some(i) = TENS.iter().position(|w| *w == norm) {
        return Some(20 + 10 * i as u64);
    }
    match norm {
        "dozen" => Some(12),
        "hundred" => Some(100),
        "thousand" => Some(1000),
        "million" => Some(1_000_000),
        "billion" => Some(1_000_000_000),
        _ => None,
    }
}

/// Gives unit words one stem each (`kilograms`, `kg` → `kg`), so that the
/// role check sees "100 kg in pounds" / "100 lbs in kilograms" as a swap.
pub fn canonical_units(q: &mut Question) {
    for t in &mut q.tokens {
        if let Some(name) = unit(t) {
            t.stem = name.to_owned();
        }
    }
}

/// The unit or currency a token names, by one name per unit.
fn unit(t: &Token) -> Option<&'static str> {
    const UNITS: &[(&str, &[&str])] = &[
        ("usd", &["$", "usd", "dollar", "dollars"]),
        ("eur", &["€", "eur", "euro", "euros"]),
        ("gbp", &["£", "gbp", "sterling"]),
        ("jpy", &["¥", "yen", "jpy"]),
        ("inr", &["₹", "inr", "rupee", "rupees"]),
        ("percent", &["%", "percent", "percentage"]),
        ("degree", &["°", "degree", "degrees"]),
        ("celsius", &["celsius", "centigrade"]),
        ("fahrenheit", &["fahrenheit"]),
        ("kelvin", &["kelvin"]),
        (
            "km",
            &["km", "kilometer", "kilometers", "kilometre", "kilometres"],
        ),
        ("m", &["meter", "meters", "metre", "metres"]),
        (
            "cm",
            &[
                "cm",
                "centimeter",
                "centimeters",
                "centimetre",
                "centimetres",
            ],
        ),
        (
            "mm",
            &[
                "mm",
                "millimeter",
                "millimeters",
                "millimetre",
                "millimetres",
            ],
        ),
        ("mile", &["mile", "miles", "mi"]),
        ("foot", &["foot", "feet", "ft"]),
        ("inch", &["inch", "inches"]),
        ("yard", &["yard", "yards", "yd"]),
        ("kg", &["kg", "kilogram", "kilograms", "kilo", "kilos"]),
        ("g", &["gram", "grams"]),
        ("lb", &["lb", "lbs", "pound", "pounds"]),
        ("oz", &["oz", "ounce", "ounces"]),
        ("l", &["liter", "liters", "litre", "litres"]),
        (
            "ml",
            &[
                "ml",
                "milliliter",
                "milliliters",
                "millilitre",
                "millilitres",
            ],
        ),
        ("gallon", &["gallon", "gallons", "gal"]),
        ("cup", &["cup", "cups"]),
        ("second", &["second", "seconds", "sec", "secs"]),
        ("ms", &["ms", "millisecond", "milliseconds"]),
        ("minute", &["minute", "minutes", "min", "mins"]),
        ("hour", &["hour", "hours", "hr", "hrs"]),
        ("day", &["day", "days"]),
        ("week", &["week", "weeks"]),
        ("month", &["month", "months"]),
        ("year", &["year", "years", "yr", "yrs"]),
        ("byte", &["byte", "bytes"]),
        ("kb", &["kb", "kib", "kilobyte", "kilobytes"]),
        ("mb", &["mb", "mib", "megabyte", "megabytes"]),
        ("gb", &["gb", "gib", "gigabyte", "gigabytes"]),
        ("tb", &["tb", "tib", "terabyte", "terabytes"]),
        ("bit", &["bit", "bits"]),
        ("mph", &["mph"]),
        ("kmh", &["kmh", "kph"]),
        ("watt", &["watt", "watts", "w"]),
        ("kw", &["kw", "kilowatt", "kilowatts"]),
        ("volt", &["volt", "volts", "v"]),
        ("calorie", &["calorie", "calories", "kcal", "cal"]),
    ];
    UNITS
        .iter()
        .find(|(_, words)| words.contains(&t.norm.as_str()))
        .map(|(name, _)| *name)
}

/// The month, weekday or relative day a token names.
fn date(t: &Token) -> Option<&'static str> {
    const DATES: &[(&str, &[&str])] = &[
        ("jan", &["january", "jan"]),
        ("feb", &["february", "feb"]),
        ("mar", &["march"]),
        ("apr", &["april", "apr"]),
        ("jun", &["june", "jun"]),
        ("jul", &["july", "jul"]),
        ("aug", &["august", "aug"]),
        ("sep", &["september", "sept", "sep"]),
        ("oct", &["october", "oct"]),
        ("nov", &["november", "nov"]),
        ("dec", &["december", "dec"]),
        ("mon", &["monday", "mon"]),
        ("tue", &["tuesday", "tue", "tues"]),
        ("wed", &["wednesday", "wed"]),
        ("thu", &["thursday", "thu", "thurs"]),
        ("fri", &["friday", "fri"]),
        ("sat", &["saturday", "sat"]),
        ("sun", &["sunday"]),
        ("today", &["today", "tonight"]),
        ("tomorrow", &["tomorrow"]),
        ("yesterday", &["yesterday"]),
    ];
    // "May" and "March" are dates only with a capital ("may I", "march on").
    if t.cased && !t.sentence_start && t.norm == "may" {
        return Some("may");
    }
    if t.norm == "may" || (t.norm == "march" && !t.cased) {
        return None;
    }
    DATES
        .iter()
        .find(|(_, words)| words.contains(&t.norm.as_str()))
        .map(|(name, _)| *name)
}

/// Whether every name in `x` appears in `y` (any case, any position).
fn names_in(x: &Question, y: &Question) -> bool {
    x.tokens
        .iter()
        .filter(|t| is_name(t))
        .all(|t| y.has_stem(&t.stem) || y.lower.contains(&t.norm))
}

fn is_name(t: &Token) -> bool {
    let code = t.norm.contains('_')
        || t.norm.contains('.') && !t.norm.starts_with(|c: char| c.is_ascii_digit());
    (t.cased && !t.sentence_start) || t.acronym || code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(a: &str, b: &str) -> Result<(), Veto> {
        check(&Question::parse(a), &Question::parse(b))
    }

    #[test]
    fn different_numbers_and_versions_are_vetoed() {
        for (a, b) in [
            ("What is 15% of 200?", "What is 15% of 300?"),
            ("What's new in Python 3.11?", "What's new in Python 3.12?"),
            ("How do I install Node 18?", "How do I install Node 20?"),
            ("Is 17 a prime number?", "Is 21 a prime number?"),
            (
                "Who won the World Cup in 2014?",
                "Who won the World Cup in 2018?",
            ),
            (
                "How long to boil three eggs?",
                "How long to boil five eggs?",
            ),
            ("Explain HTTP/2", "Explain HTTP/3"),
            ("What is ES6?", "What is ES5?"),
        ] {
            assert_eq!(verdict(a, b), Err(Veto::Numbers), "{a} / {b}");
        }
    }

    #[test]
    fn same_numbers_written_differently_pass() {
        for (a, b) in [
            ("Is 1,000 bigger than 999?", "Is 1000 bigger than 999?"),
            (
                "How long to boil 2 eggs?",
                "How many minutes should I boil two eggs for?",
            ),
            ("Who was born on the 3rd?", "Who was born on the 3?"),
            ("What is twenty five squared?", "What's 25 squared?"),
            (
                "How many grams in 1 cup of flour?",
                "How many grams in a cup of flour?",
            ),
        ] {
            assert_eq!(verdict(a, b), Ok(()), "{a} / {b}");
        }
    }

    #[test]
    fn units_dates_and_quotes_must_agree() {
        let cases = [
            (
                "Convert 10 miles to km",
                "Convert 10 miles to feet",
                Veto::Units,
            ),
            (
                "How much is $50 in yen?",
                "How much is €50 in yen?",
                Veto::Units,
            ),
            (
                "What's the weather today in Oslo?",
                "What's the weather tomorrow in Oslo?",
                Veto::Dates,
            ),
            (
                "Events in July in Rome",
                "Events in August in Rome",
                Veto::Dates,
            ),
            (
                "What does \"sudo\" do?",
                "What does \"chmod\" do?",
                Veto::Quotes,
            ),
        ];
        for (a, b, want) in cases {
            assert_eq!(verdict(a, b), Err(want), "{a} / {b}");
        }
        for (a, b) in [
            ("Convert 5 kilometres to miles", "How many miles is 5 km?"),
            ("What does \"idempotent\" mean?", "Define idempotent"),
            ("May I use a semicolon here?", "Can I use a semicolon here?"),
        ] {
            assert_eq!(verdict(a, b), Ok(()), "{a} / {b}");
        }
    }

    #[test]
    fn names_must_appear_in_both() {
        for (a, b) in [
            (
                "What is the capital of France?",
                "What is the capital of Spain?",
            ),
            (
                "How do I reverse a list in Python?",
                "How do I reverse a list in Ruby?",
            ),
            ("Is TCP reliable?", "Is UDP reliable?"),
            ("How do I use useState?", "How do I use useEffect?"),
        ] {
            assert_eq!(verdict(a, b), Err(Veto::Names), "{a} / {b}");
        }
        for (a, b) in [
            (
                "What is the capital of France?",
                "Which city is France's capital?",
            ),
            (
                "Python: how do I reverse a list?",
                "How do I reverse a list in Python?",
            ),
            ("what is tcp", "Explain TCP"),
        ] {
            assert_eq!(verdict(a, b), Ok(()), "{a} / {b}");
        }
    }
}
