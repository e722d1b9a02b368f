//! Splitting a question into the tokens the rules compare: words (any
//! script; Unicode letters and digits), numbers with their separators
//! (`3.11`, `1,000`), currency and percent signs, and the strings inside
//! quotes. English contractions are expanded (`doesn't` → `does not`,
//! `Python's` → `python`); other languages are split on spaces and
//! punctuation only, so scripts written without spaces (Chinese,
//! Japanese, Thai) give the rules little to compare.

/// One word or sign of a question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// Lowercase, hyphens removed (`e-mail` → `email`).
    pub norm: String,
    /// `norm` with an English plural `s` removed (`flights` → `flight`).
    pub stem: String,
    /// Starts with an uppercase letter, or has one inside (`iPhone`).
    pub cased: bool,
    /// Written in capitals throughout, two letters or more (`TCP`).
    pub acronym: bool,
    /// First word of a sentence (its capital says nothing).
    pub sentence_start: bool,
}

/// A question as the rules see it.
#[derive(Clone, Debug, Default)]
pub struct Question {
    /// Words and signs in order.
    pub tokens: Vec<Token>,
    /// Text inside quotes (`"…"`, `“…”`, `'…'`, `` `…` ``, `«…»`), trimmed.
    pub quoted: Vec<String>,
    /// The whole text, lowercase (for "appears anywhere" checks).
    pub lower: String,
}

/// Signs kept as tokens of their own (units and currencies).
const SIGNS: &[char] = &['$', '€', '£', '¥', '%', '°', '₹'];

impl Question {
    /// Tokenizes `text`.
    pub fn parse(text: &str) -> Self {
        let mut q = Question {
            quoted: quoted(text),
            lower: text.to_lowercase(),
            ..Question::default()
        };
        let chars: Vec<char> = text.chars().collect();
        let mut i = 0;
        let mut sentence_start = true;
        while i < chars.len() {
            let c = chars[i];
            if SIGNS.contains(&c) {
                q.push(&c.to_string(), false);
                i += 1;
            } else if c.is_alphanumeric() {
                let end = word_end(&chars, i);
                let word: String = chars[i..end].iter().collect();
                q.push_word(&word, sentence_start);
                sentence_start = false;
                i = end;
            } else {
                if matches!(c, '.' | '?' | '!' | ':' | ';' | '\n' | '。' | '？' | '！') {
                    sentence_start = true;
                }
                i += 1;
            }
        }
        q
    }

    fn push(&mut self, norm: &str, sentence_start: bool) {
        self.tokens.push(Token {
            norm: norm.to_owned(),
            stem: stem(norm),
            cased: false,
            acronym: false,
            sentence_start,
        });
    }

    fn push_word(&mut self, word: &str, sentence_start: bool) {
        let (base, negated) = split_contraction(word);
        let norm: String = base.to_lowercase().replace('-', "");
        let letters: Vec<char> = base.chars().filter(|c| c.is_alphabetic()).collect();
        let cased = letters.iter().any(|c| c.is_uppercase());
        let caps = |l: &[char]| l.len() >= 2 && l.iter().all(|c| c.is_uppercase());
        // "APIs", "GPUs": an acronym's plural.
        let plural = letters.len() >= 3
            && letters.last() == Some(&'s')
            && caps(&letters[..letters.len() - 1]);
        let acronym = caps(&letters) || plural;
        if !norm.is_empty() {
            let stem = if plural {
                norm[..norm.len() - 1].to_owned()
            } else {
                stem(&norm)
            };
            self.tokens.push(Token {
                stem,
                norm,
                cased: cased && !(letters.len() == 1 && base == "I"),
                acronym,
                sentence_start,
            });
        }
        if negated {
            self.push("not", false);
        }
    }

    /// Whether any token has this normalized form.
    pub fn has(&self, norm: &str) -> bool {
        self.tokens.iter().any(|t| t.norm == norm)
    }

    /// Whether any token has this stem.
    pub fn has_stem(&self, stem: &str) -> bool {
        self.tokens.iter().any(|t| t.stem == stem)
    }
}

/// End of the word starting at `start`: letters and digits, joined by
/// `-`, `_`, `'` or `’` between letters, by `.` or `,` between digits,
/// `.` inside names such as `node.js`, and trailing `+`/`#` (`c++`, `c#`).
fn word_end(chars: &[char], start: usize) -> usize {
    let mut i = start;
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphanumeric() {
            i += 1;
            continue;
        }
        let prev = chars[i - 1];
        let next = chars.get(i + 1).copied().unwrap_or(' ');
        let joins = match c {
            '-' | '_' | '\'' | '’' => prev.is_alphanumeric() && next.is_alphanumeric(),
            ',' => prev.is_ascii_digit() && next.is_ascii_digit(),
            '.' => {
                let name = prev.is_alphanumeric()
                    && next.is_lowercase()
                    && chars.get(i + 2).is_some_and(|c| c.is_alphanumeric());
                (prev.is_ascii_digit() && next.is_ascii_digit()) || name
            }
            '+' | '#' => {
                let tail = &chars[i..];
                let signs = tail.iter().take_while(|c| matches!(c, '+' | '#')).count();
                let after = tail.get(signs).copied().unwrap_or(' ');
                if !after.is_alphanumeric() {
                    return i + signs;
                }
                false
            }
            _ => false,
        };
        if !joins {
            break;
        }
        i += 1;
    }
    i
}

/// `doesn't` → (`does`, true); `Python's` → (`Python`, false); `we're` →
/// (`we`, false). Words without an apostrophe come back unchanged.
fn split_contraction(word: &str) -> (String, bool) {
    let word = word.replace('’', "'");
    let lower = word.to_lowercase();
    if let Some(head) = lower.strip_suffix("n't") {
        let head = match head {
            "wo" => "will",
            "ca" => "can",
            "sha" => "shall",
            other => other,
        };
        return (head.to_owned(), true);
    }
    for suffix in ["'s", "'re", "'ll", "'ve", "'d", "'m"] {
        if lower.ends_with(suffix) {
            return (word[..word.len() - suffix.len()].to_owned(), false);
        }
    }
    (word, false)
}

/// A light English plural stem: `flights` → `flight`, `boxes` → `box`;
/// words of three letters or fewer, and `ss`/`us`/`is` endings, stay.
pub fn stem(norm: &str) -> String {
    if norm.chars().count() <= 3 || norm.chars().any(|c| c.is_ascii_digit()) {
        return norm.to_owned();
    }
    if let Some(head) = norm.strip_suffix("ies") {
        return format!("{head}y");
    }
    for keep in ["ss", "us", "is"] {
        if norm.ends_with(keep) {
            return norm.to_owned();
        }
    }
    if let Some(head) = norm.strip_suffix("es")
        && (head.ends_with("sh") || head.ends_with("ch") || head.ends_with('x'))
    {
        return head.to_owned();
    }
    norm.strip_suffix('s').unwrap_or(norm).to_owned()
}

/// Strings inside matching quotes. A `'` opens only at the start of a word
/// and closes only at the end of one, so apostrophes are not quotes.
fn quoted(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let close = match chars[i] {
            '"' => Some('"'),
            '“' => Some('”'),
            '«' => Some('»'),
            '`' => Some('`'),
            '\'' if i == 0 || !chars[i - 1].is_alphanumeric() => Some('\''),
            _ => None,
        };
        let Some(close) = close else {
            i += 1;
            continue;
        };
        let end = (i + 1..chars.len()).find(|&j| {
            chars[j] == close
                && (close != '\'' || chars.get(j + 1).is_none_or(|c| !c.is_alphanumeric()))
        });
        match end {
            Some(end) => {
                let inner: String = chars[i + 1..end].iter().collect();
                let inner = inner.trim();
                if !inner.is_empty() {
                    found.push(inner.to_owned());
                }
                i = end + 1;
            }
            None => i += 1,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norms(text: &str) -> Vec<String> {
        Question::parse(text)
            .tokens
            .into_iter()
            .map(|t| t.norm)
            .collect()
    }

    #[test]
    fn words_numbers_and_signs() {
        assert_eq!(
            norms("Doesn't Python 3.11 cost $1,000 (or 5%)?"),
            [
                "does", "not", "python", "3.11", "cost", "$", "1,000", "or", "5", "%"
            ]
        );
        assert_eq!(
            norms("C++ vs C# on node.js, e-mail"),
            ["c++", "vs", "c#", "on", "node.js", "email"]
        );
        assert_eq!(
            norms("Python's GIL. Won't it?"),
            ["python", "gil", "will", "not", "it"]
        );
        assert_eq!(
            norms("¿Por qué no funciona?"),
            ["por", "qué", "no", "funciona"]
        );
    }

    #[test]
    fn case_and_sentence_starts() {
        let q = Question::parse("Is TCP faster than iPhone in Paris? Yes I think");
        let t = &q.tokens;
        assert!(t[0].sentence_start && t[0].cased);
        assert!(t[1].acronym && t[1].cased);
        assert!(!t[2].cased);
        assert!(t[4].cased && !t[4].acronym, "iPhone");
        assert!(t[6].cased && !t[6].sentence_start, "Paris");
        let apis = &Question::parse("REST APIs").tokens[1];
        assert!(apis.acronym && apis.stem == "api", "{apis:?}");
        assert!(t[7].sentence_start, "after ?");
        assert!(!t[8].cased, "the pronoun I");
    }

    #[test]
    fn quotes_but_not_apostrophes() {
        let q = Question::parse(
            r#"What does "idempotent" mean in 'REST' and `git rebase`? It's fine, don't"#,
        );
        assert_eq!(q.quoted, ["idempotent", "REST", "git rebase"]);
        assert!(
            Question::parse("Can't the dog's bone stay?")
                .quoted
                .is_empty()
        );
    }

    #[test]
    fn plural_stems() {
        for (word, want) in [
            ("flights", "flight"),
            ("boxes", "box"),
            ("cities", "city"),
            ("class", "class"),
            ("status", "status"),
            ("analysis", "analysis"),
            ("gas", "gas"),
            ("v2s", "v2s"),
        ] {
            assert_eq!(stem(word), want, "{word}");
        }
    }
}
