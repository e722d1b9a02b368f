//! The tokenizer a GGUF file carries (`tokenizer.ggml.*`), rebuilt as the
//! `tokenizers` crate's [`tokenizers::Tokenizer`] — the type the engine
//! uses for Hugging Face directories — by writing the `tokenizer.json` it
//! describes:
//!
//! * `gpt2`: byte-level BPE from `tokens` and `merges`, split the way
//!   llama.cpp splits for `tokenizer.ggml.pre` (GPT-2's regex; `smollm`
//!   and its kin split digits one by one first; `llama-bpe`/`qwen2` use
//!   their own regexes);
//! * `llama`: SentencePiece-style BPE with byte fallback, its merges ranked
//!   by the `scores` of the merged pieces (as llama.cpp merges the best
//!   scoring pair first), spaces as `▁`, a leading `▁` unless
//!   `add_space_prefix` is false.
//!
//! Control tokens (type 3) become special added tokens and user-defined
//! ones (type 4) plain added tokens, so both are matched whole; BOS/EOS are
//! added as `add_bos_token`/`add_eos_token` say (llama.cpp's defaults: BOS
//! for `llama`, none for `gpt2`). The chat template is
//! `tokenizer.chat_template`.

use serde_json::{Value, json};

use super::reader::{GgufFile, MetaValue};
use crate::error::{EngineError, Result};
use crate::tokenizer::TextTokenizer;

const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// llama.cpp's split for Llama 3 vocabularies (`llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's split for Qwen2 vocabularies (`qwen2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn err(file: &GgufFile, key: &str, message: String) -> EngineError {
    EngineError::Config {
        path: file.path().to_path_buf(),
        field: key.to_owned(),
        message,
    }
}

fn strings<'a>(file: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>> {
    let Some(value) = file.get(key) else {
        return Ok(None);
    };
    value
        .as_array()
        .and_then(|items| items.iter().map(MetaValue::as_str).collect())
        .map(Some)
        .ok_or_else(|| err(file, key, "not an array of strings".into()))
}

fn flag(file: &GgufFile, key: &str) -> Option<bool> {
    match file.get(key) {
        Some(MetaValue::Bool(b)) => Some(*b),
        _ => None,
    }
}

/// The vocabulary, read once.
struct Vocab<'a> {
    tokens: Vec<&'a str>,
    types: Vec<i64>,
    scores: Vec<f64>,
}

impl<'a> Vocab<'a> {
    fn read(file: &'a GgufFile) -> Result<Self> {
        let key = "tokenizer.ggml.tokens";
        let tokens = strings(file, key)?
            .ok_or_else(|| err(file, key, "missing: the file carries no tokenizer".into()))?;
        let numbers = |key: &str| -> Vec<f64> {
            file.get(key)
                .and_then(MetaValue::as_array)
                .map(|v| v.iter().map(|x| x.as_f64().unwrap_or(0.0)).collect())
                .unwrap_or_default()
        };
        let types = numbers("tokenizer.ggml.token_type");
        Ok(Self {
            types: (0..tokens.len())
                .map(|i| types.get(i).map_or(1, |&t| t as i64))
                .collect(),
            scores: numbers("tokenizer.ggml.scores"),
            tokens,
        })
    }

    fn json_vocab(&self) -> Value {
        let map: serde_json::Map<String, Value> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| ((*t).to_owned(), json!(i)))
            .collect();
        Value::Object(map)
    }

    fn added_tokens(&self) -> Vec<Value> {
        self.tokens
            .iter()
            .zip(&self.types)
            .enumerate()
            .filter(|(_, (_, t))| matches!(**t, CONTROL | USER_DEFINED))
            .map(|(id, (content, &t))| {
                json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": t == CONTROL})
            })
            .collect()
    }

    fn token(&self, file: &GgufFile, key: &str) -> Option<String> {
        let id = file.get(key)?.as_u64()? as usize;
        self.tokens.get(id).map(|t| (*t).to_owned())
    }
}

/// The tokenizer and chat template of `file`.
pub fn text_tokenizer(file: &GgufFile) -> Result<TextTokenizer> {
    let vocab = Vocab::read(file)?;
    let model_key = "tokenizer.ggml.model";
    let kind = file
        .get(model_key)
        .and_then(MetaValue::as_str)
        .ok_or_else(|| err(file, model_key, "missing".into()))?;
    let mut spec = match kind {
        "gpt2" => byte_level(file, &vocab)?,
        "llama" => sentencepiece(file, &vocab),
        other => {
            return Err(err(
                file,
                model_key,
                format!("tokenizer `{other}` is not supported (gpt2, llama)"),
            ));
        }
    };
    let bos = vocab.token(file, "tokenizer.ggml.bos_token_id");
    let eos = vocab.token(file, "tokenizer.ggml.eos_token_id");
    let add_bos = flag(file, "tokenizer.ggml.add_bos_token").unwrap_or(kind == "llama");
    let add_eos = flag(file, "tokenizer.ggml.add_eos_token").unwrap_or(false);
    spec["added_tokens"] = Value::Array(vocab.added_tokens());
    spec["post_processor"] = post_processor(
        file,
        add_bos.then_some(bos.as_deref()).flatten(),
        add_eos.then_some(eos.as_deref()).flatten(),
    );
    let inner: tokenizers::Tokenizer = spec.to_string().parse().map_err(|e| {
        EngineError::Tokenizer(format!(
            "{}: building the tokenizer from tokenizer.ggml.*: {e}",
            file.path().display()
        ))
    })?;
    let template = file
        .get("tokenizer.chat_template")
        .and_then(MetaValue::as_str)
        .map(str::to_owned);
    Ok(TextTokenizer::from_parts(inner, template, bos, eos))
}

fn byte_level(file: &GgufFile, vocab: &Vocab<'_>) -> Result<Value> {
    let key = "tokenizer.ggml.merges";
    let merges = strings(file, key)?.ok_or_else(|| err(file, key, "missing".into()))?;
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| err(file, key, format!("merge `{m}` is not two tokens")))
        })
        .collect::<Result<Vec<_>>>()?;
    let pre_key = "tokenizer.ggml.pre";
    let pre = file
        .get(pre_key)
        .and_then(MetaValue::as_str)
        .unwrap_or("gpt2");
    let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    let (pre_tokenizer, ignore_merges) = match pre {
        "gpt2" | "default" => (byte_level(true), false),
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" | "minerva" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "falcon3" | "pixtral" => (
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
            true,
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
            false,
        ),
        other => {
            return Err(err(
                file,
                pre_key,
                format!(
                    "pre-tokenizer `{other}` is not supported (gpt2, smollm, starcoder, \
                     llama-bpe, qwen2 and their aliases)"
                ),
            ));
        }
    };
    Ok(json!({
        "version": "1.0",
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                  "vocab": vocab.json_vocab(), "merges": merges},
    }))
}

fn sentencepiece(file: &GgufFile, vocab: &Vocab<'_>) -> Value {
    let space_prefix = flag(file, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
    let mut normalizers =
        vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if space_prefix {
        normalizers.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let unk = vocab.token(file, "tokenizer.ggml.unknown_token_id");
    json!({
        "version": "1.0",
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab.json_vocab(), "merges": score_merges(vocab)},
    })
}

/// Merges implied by a scored vocabulary: every split of a piece into two
/// pieces of the vocabulary, best merged score first (ties: longer left,
/// then longer right piece, then vocabulary order), as `transformers`
/// derives them for SentencePiece GGUFs.
fn score_merges(vocab: &Vocab<'_>) -> Vec<Value> {
    let ids: std::collections::HashMap<&str, usize> = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (*t, i))
        .collect();
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for (i, piece) in vocab.tokens.iter().enumerate() {
        let score = vocab.scores.get(i).copied().unwrap_or(0.0);
        let mut local: Vec<(&str, &str, f64)> = piece
            .char_indices()
            .skip(1)
            .map(|(at, _)| piece.split_at(at))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (ids[l], ids[r]));
        merges.extend(local);
    }
    let chars = |s: &str| s.chars().count();
    merges.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then(chars(b.0).cmp(&chars(a.0)))
            .then(chars(b.1).cmp(&chars(a.1)))
    });
    merges.into_iter().map(|(l, r, _)| json!([l, r])).collect()
}

fn post_processor(file: &GgufFile, bos: Option<&str>, eos: Option<&str>) -> Value {
    if bos.is_none() && eos.is_none() {
        return Value::Null;
    }
    let id_of = |t: &str| {
        strings(file, "tokenizer.ggml.tokens")
            .ok()
            .flatten()
            .and_then(|v| v.iter().position(|x| *x == t))
    };
    let mut single = Vec::new();
    let mut special = serde_json::Map::new();
    let mut add = |t: &str, single: &mut Vec<Value>| {
        single.push(json!({"SpecialToken": {"id": t, "type_id": 0}}));
        special.insert(
            t.to_owned(),
            json!({"id": t, "ids": [id_of(t)], "tokens": [t]}),
        );
    };
    if let Some(b) = bos {
        add(b, &mut single);
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let Some(e) = eos {
        add(e, &mut single);
    }
    let mut pair = single.clone();
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special})
}
