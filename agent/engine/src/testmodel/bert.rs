//! A tiny random-weight BERT sentence encoder in the sentence-transformers
//! layout (`config.json`, `model.safetensors`, a WordPiece `tokenizer.json`
//! trained on the fixed corpus, `modules.json`, `1_Pooling/config.json`,
//! `sentence_bert_config.json`). Its vectors carry no meaning; it stands in
//! for a real encoder where only the shape of the path is under test.

use std::path::Path;

use serde_json::json;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer};

use super::{CORPUS, SplitMix, pretty, random_tensor, tok_err, write, write_safetensors};
use crate::error::{EngineError, Result};
use crate::weights::WeightDtype;

/// The shape of a tiny encoder.
#[derive(Clone, Debug)]
pub struct TinyBertSpec {
    /// Hidden width.
    pub hidden_size: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Largest vocabulary (the corpus's characters and specials, then its
    /// most frequent words).
    pub vocab_size: usize,
    /// Rows of the position table.
    pub max_position_embeddings: usize,
    /// Longest input the sentence head takes.
    pub max_seq_length: usize,
    /// Seed of the weights.
    pub seed: u64,
}

impl Default for TinyBertSpec {
    fn default() -> Self {
        Self {
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            vocab_size: 400,
            max_position_embeddings: 128,
            max_seq_length: 96,
            seed: 7,
        }
    }
}

const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// The vocabulary, built without a trainer (WordPiece training breaks
/// merge ties differently from run to run, and two agents writing the
/// built-in encoder must make the same model): the specials, every
/// character of the corpus alone and as a continuation, then the corpus's
/// words, most frequent first (ties alphabetical), up to `vocab_size`.
fn wordpiece_vocab(spec: &TinyBertSpec) -> Vec<String> {
    let text = CORPUS.to_lowercase();
    let chars: std::collections::BTreeSet<char> =
        text.chars().filter(|c| !c.is_whitespace()).collect();
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for word in text.split(|c: char| !c.is_alphanumeric()) {
        if word.chars().count() > 1 {
            *counts.entry(word).or_default() += 1;
        }
    }
    let mut words: Vec<(&str, usize)> = counts.into_iter().collect();
    words.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut vocab: Vec<String> = SPECIALS.iter().map(|s| (*s).to_owned()).collect();
    vocab.extend(chars.iter().map(|c| c.to_string()));
    vocab.extend(
        chars
            .iter()
            .filter(|c| c.is_alphanumeric())
            .map(|c| format!("##{c}")),
    );
    let room = spec.vocab_size.saturating_sub(vocab.len());
    vocab.extend(words.into_iter().take(room).map(|(w, _)| w.to_owned()));
    vocab
}

fn wordpiece_tokenizer(spec: &TinyBertSpec) -> Result<Tokenizer> {
    let vocab: serde_json::Map<String, serde_json::Value> = wordpiece_vocab(spec)
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i.into()))
        .collect();
    // Through serde: the builder wants the crate's private map type.
    let model = serde_json::json!({
        "type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
        "max_input_chars_per_word": 100, "vocab": vocab,
    });
    let model: WordPiece = serde_json::from_str(&model.to_string()).map_err(tok_err)?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_decoder(Some(WordPieceDecoder::default()));
    tokenizer.add_special_tokens(
        &SPECIALS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect::<Vec<_>>(),
    );
    let id = |t: &str| {
        tokenizer
            .token_to_id(t)
            .ok_or_else(|| tok_err(format!("{t} not in vocabulary")))
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    tokenizer.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    Ok(tokenizer)
}

fn weights(spec: &TinyBertSpec, vocab: usize) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = SplitMix(spec.seed);
    let (h, ff) = (spec.hidden_size, spec.intermediate_size);
    let mut out = Vec::new();
    let mut tensor = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        out.push(random_tensor(&mut rng, name, shape, scale, offset));
    };
    let w = |fan_in: usize| 1.7 / (fan_in as f32).sqrt();
    let e = "embeddings";
    tensor(
        format!("{e}.word_embeddings.weight"),
        vec![vocab, h],
        1.0,
        0.0,
    );
    let positions = spec.max_position_embeddings;
    tensor(
        format!("{e}.position_embeddings.weight"),
        vec![positions, h],
        0.5,
        0.0,
    );
    tensor(
        format!("{e}.token_type_embeddings.weight"),
        vec![2, h],
        0.5,
        0.0,
    );
    tensor(format!("{e}.LayerNorm.weight"), vec![h], 0.1, 1.0);
    tensor(format!("{e}.LayerNorm.bias"), vec![h], 0.1, 0.0);
    for l in 0..spec.num_layers {
        let p = format!("encoder.layer.{l}");
        let dense = |name: &str, out: usize, inp: usize| {
            vec![
                (format!("{p}.{name}.weight"), vec![out, inp], w(inp)),
                (format!("{p}.{name}.bias"), vec![out], 0.1),
            ]
        };
        let mut layer = Vec::new();
        layer.extend(dense("attention.self.query", h, h));
        layer.extend(dense("attention.self.key", h, h));
        layer.extend(dense("attention.self.value", h, h));
        layer.extend(dense("attention.output.dense", h, h));
        for (name, shape, scale) in layer {
            tensor(name, shape, scale, 0.0);
        }
        tensor(
            format!("{p}.attention.output.LayerNorm.weight"),
            vec![h],
            0.1,
            1.0,
        );
        tensor(
            format!("{p}.attention.output.LayerNorm.bias"),
            vec![h],
            0.1,
            0.0,
        );
        for (name, shape, scale) in
            dense("intermediate.dense", ff, h)
                .into_iter()
                .chain(dense("output.dense", h, ff))
        {
            tensor(name, shape, scale, 0.0);
        }
        tensor(format!("{p}.output.LayerNorm.weight"), vec![h], 0.1, 1.0);
        tensor(format!("{p}.output.LayerNorm.bias"), vec![h], 0.1, 0.0);
    }
    out
}

/// Writes a complete sentence-transformers directory for `spec` into `dir`.
pub fn write_tiny_bert(dir: &Path, spec: &TinyBertSpec) -> Result<()> {
    let mkdir = |d: &Path| {
        std::fs::create_dir_all(d).map_err(|source| EngineError::Io {
            path: d.to_path_buf(),
            source,
        })
    };
    mkdir(dir)?;
    mkdir(&dir.join("1_Pooling"))?;
    let tokenizer = wordpiece_tokenizer(spec)?;
    let vocab = tokenizer.get_vocab_size(true);
    let text = tokenizer.to_string(true).map_err(tok_err)?;
    write(&dir.join("tokenizer.json"), text.as_bytes())?;
    let config = json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "type_vocab_size": 2,
        "vocab_size": vocab,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    });
    write(&dir.join("config.json"), pretty(&config).as_bytes())?;
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
        "unk_token": "[UNK]", "mask_token": "[MASK]",
        "do_lower_case": true,
        "model_max_length": spec.max_position_embeddings,
    });
    write(
        &dir.join("tokenizer_config.json"),
        pretty(&tokenizer_config).as_bytes(),
    )?;
    let modules = json!([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]);
    write(&dir.join("modules.json"), pretty(&modules).as_bytes())?;
    let pooling = json!({
        "word_embedding_dimension": spec.hidden_size,
        "pooling_mode_cls_token": false,
        "pooling_mode_mean_tokens": true,
        "pooling_mode_max_tokens": false,
    });
    write(
        &dir.join("1_Pooling/config.json"),
        pretty(&pooling).as_bytes(),
    )?;
    let sentence = json!({"max_seq_length": spec.max_seq_length, "do_lower_case": false});
    write(
        &dir.join("sentence_bert_config.json"),
        pretty(&sentence).as_bytes(),
    )?;
    write_safetensors(
        &dir.join("model.safetensors"),
        weights(spec, vocab),
        WeightDtype::F32,
    )
}
