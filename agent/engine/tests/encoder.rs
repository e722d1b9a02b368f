//! The sentence encoder against transformers: token ids and unit vectors
//! for the tiny random BERT fixture and for the real all-MiniLM-L6-v2
//! (fetched with pip, see `testmodel::minilm_dir`). Golden values come from
//! `scripts/golden_embeddings.py`.

use std::path::{Path, PathBuf};

use serde_json::Value;
use weir_engine::encoder::{TextEmbedder, Truncation, is_encoder_dir};
use weir_engine::testmodel::minilm_dir;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Every golden sentence: the same token ids, and a vector within `tol`
/// (max abs difference) of transformers' with unit length.
fn check_against_golden(dir: &Path, golden: &Path, tol: f32) -> Vec<Vec<f32>> {
    let embedder = TextEmbedder::load(dir).expect("load encoder");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(golden).unwrap()).unwrap();
    let mut vectors = Vec::new();
    for case in golden["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let want: Vec<f32> = serde_json::from_value(case["vector"].clone()).unwrap();
        let ids = embedder.tokenize(text, Truncation::Error).unwrap();
        assert_eq!(ids, want_ids, "token ids of {text:?}");
        let got = embedder.embed_ids(vec![ids]).unwrap().remove(0);
        assert_eq!(got.vector.len(), want.len());
        let max_diff = got
            .vector
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(max_diff <= tol, "{text:?}: max |Δ| {max_diff} > {tol}");
        let norm = cosine(&got.vector, &got.vector).sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        vectors.push(got.vector);
    }
    vectors
}

#[test]
fn tiny_bert_matches_transformers() {
    let dir = fixtures().join("tiny-bert");
    assert!(is_encoder_dir(&dir));
    assert!(!is_encoder_dir(&fixtures().join("tiny-llama")));
    check_against_golden(&dir, &dir.join("golden.json"), 1e-5);
}

#[test]
fn minilm_matches_transformers_and_ranks_paraphrases_first() {
    let dir = minilm_dir().expect("fetch all-MiniLM-L6-v2 with pip");
    let vectors = check_against_golden(&dir, &fixtures().join("minilm-golden.json"), 1e-4);
    // Sentences 0 and 1 are paraphrases; 2 is about something else.
    let same = cosine(&vectors[0], &vectors[1]);
    let other = cosine(&vectors[0], &vectors[2]);
    assert!(same > 0.9, "paraphrase similarity {same}");
    assert!(other < 0.3, "unrelated similarity {other}");
}

#[test]
fn batch_gives_the_same_vectors_as_one_at_a_time() {
    let embedder = TextEmbedder::load(&fixtures().join("tiny-bert")).unwrap();
    let texts = ["the agent on each node", "requests arrive", "a"];
    let batch = embedder.embed_texts(&texts, Truncation::Error).unwrap();
    for (text, together) in texts.iter().zip(&batch) {
        let alone = embedder.embed_texts(&[text], Truncation::Error).unwrap();
        let diff = together
            .vector
            .iter()
            .zip(&alone[0].vector)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-6, "{text}: {diff}");
        assert_eq!(together.tokens, alone[0].tokens);
    }
}

#[test]
fn long_inputs_are_refused_or_cut_and_bad_ids_are_errors() {
    let embedder = TextEmbedder::load(&fixtures().join("tiny-bert")).unwrap();
    let max = embedder.max_input_tokens();
    let long = "model ".repeat(max * 2);
    let err = embedder.tokenize(&long, Truncation::Error).unwrap_err();
    assert!(err.to_string().contains(&format!("at most {max}")), "{err}");
    let cut = embedder.tokenize(&long, Truncation::Keep).unwrap();
    assert_eq!(cut.len(), max);
    let sep = embedder.tokenize("", Truncation::Error).unwrap();
    assert_eq!(cut.last(), sep.last(), "the closing [SEP] is kept");
    let vocab = embedder.encoder().config().vocab_size as u32;
    let err = embedder.embed_ids(vec![vec![1, vocab + 5]]).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    assert!(embedder.embed_ids(vec![vec![]]).is_err());
    assert!(embedder.embed_ids(Vec::new()).unwrap().is_empty());
}

#[test]
fn a_decoder_directory_is_refused_with_the_field() {
    let err = TextEmbedder::load(&fixtures().join("tiny-llama"))
        .err()
        .expect("a llama directory is not an encoder");
    assert!(err.to_string().contains("model_type"), "{err}");
}

#[test]
fn the_tiny_bert_writer_is_reproducible_and_its_model_loads() {
    use weir_engine::testmodel::{TinyBertSpec, write_tiny_bert};
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_tiny_bert(&a, &TinyBertSpec::default()).unwrap();
    write_tiny_bert(&b, &TinyBertSpec::default()).unwrap();
    for file in ["tokenizer.json", "model.safetensors", "config.json"] {
        let (x, y) = (
            std::fs::read(a.join(file)).unwrap(),
            std::fs::read(b.join(file)).unwrap(),
        );
        assert!(x == y, "{file} differs between two writes");
    }
    let embedder = TextEmbedder::load(&a).unwrap();
    let out = embedder
        .embed_texts(&["the agent on each node"], Truncation::Error)
        .unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(a.join("tokenizer.json")).unwrap();
    let ids: Vec<Option<u32>> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|t| tokenizer.token_to_id(t))
        .collect();
    assert_eq!(
        ids,
        [Some(0), Some(1), Some(2), Some(3), Some(4)],
        "specials first"
    );
    let encoding = tokenizer.encode("the agent on each node", true).unwrap();
    assert_eq!(encoding.get_ids().first(), Some(&2), "[CLS] leads");
    assert_eq!(out[0].tokens, encoding.get_ids().len());
    let norm: f32 = out[0].vector.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
}
