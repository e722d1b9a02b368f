//! Logits of the CPU backend against `transformers` on the checked-in tiny
//! models (golden values from `scripts/golden_logits.py`): full prefill,
//! chunked prefill and token-by-token decode through the paged KV cache,
//! greedy continuation, and tokenizer parity.

use std::path::{Path, PathBuf};

use weir_engine::backend::BatchLayout;
use weir_engine::backend::cpu::CpuBackend;
use weir_engine::model::LlamaModel;
use weir_engine::weights::Weights;

const TOLERANCE: f32 = 1e-4;

struct Golden {
    dir: PathBuf,
    prompt: String,
    ids: Vec<u32>,
    greedy: Vec<u32>,
    logits: Vec<f32>,
    vocab: usize,
}

fn golden(name: &str) -> Golden {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        record[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let weights = Weights::open_file(&dir.join("golden.safetensors")).unwrap();
    let view = weights.get_any("logits").unwrap();
    Golden {
        prompt: record["prompt"].as_str().unwrap().to_owned(),
        ids: ids("input_ids"),
        greedy: ids("greedy_tokens"),
        vocab: view.shape[1],
        logits: view.to_f32(),
        dir,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A scattered block table, so that paging (not contiguity) is tested.
fn block_table(blocks: usize) -> Vec<u32> {
    (0..blocks as u32)
        .map(|i| (i * 7 + 3) % blocks as u32)
        .collect()
}

const BLOCK: usize = 4;

fn run_chunks(g: &Golden, chunk: usize) {
    let model = LlamaModel::load(&g.dir, CpuBackend, 256).unwrap();
    let blocks = g.ids.len().div_ceil(BLOCK) + 1;
    let mut cache = model.alloc_kv_cache(blocks, BLOCK).unwrap();
    let table = block_table(blocks);
    let mut start = 0;
    while start < g.ids.len() {
        let end = (start + chunk).min(g.ids.len());
        let mut layout = BatchLayout::default();
        layout.push_seq(&g.ids[start..end], start, &table, BLOCK, false);
        layout.logits_rows = (0..(end - start) as u32).collect();
        let logits = model.forward(&layout, &mut cache).unwrap();
        let expected = &g.logits[start * g.vocab..end * g.vocab];
        let diff = max_diff(&logits, expected);
        assert!(
            diff <= TOLERANCE,
            "{}: chunk {chunk}, positions {start}..{end}: max |Δ| {diff}",
            g.dir.display()
        );
        start = end;
    }
}

fn greedy(g: &Golden) {
    let model = LlamaModel::load(&g.dir, CpuBackend, 256).unwrap();
    let total = g.ids.len() + g.greedy.len();
    let blocks = total.div_ceil(BLOCK);
    let mut cache = model.alloc_kv_cache(blocks, BLOCK).unwrap();
    let table = block_table(blocks);
    let mut tokens = g.ids.clone();
    let mut computed = 0;
    for _ in 0..g.greedy.len() {
        let mut layout = BatchLayout::default();
        layout.push_seq(&tokens[computed..], computed, &table, BLOCK, true);
        let logits = model.forward(&layout, &mut cache).unwrap();
        computed = tokens.len();
        let next = logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 { (i, v) } else { best }
            })
            .0 as u32;
        tokens.push(next);
    }
    assert_eq!(&tokens[g.ids.len()..], &g.greedy[..], "{}", g.dir.display());
}

fn tokenizer_parity(g: &Golden) {
    let tokenizer = tokenizers::Tokenizer::from_file(g.dir.join("tokenizer.json")).unwrap();
    let ids = tokenizer
        .encode(g.prompt.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    let bos = usize::from(g.ids.len() > ids.len());
    assert_eq!(ids, g.ids[bos..], "{}", g.dir.display());
}

#[test]
fn llama_prefill_matches_transformers() {
    run_chunks(&golden("tiny-llama"), usize::MAX);
}

#[test]
fn llama_chunked_prefill_and_decode_match_transformers() {
    let g = golden("tiny-llama");
    run_chunks(&g, 5);
    run_chunks(&g, 1);
}

#[test]
fn qwen2_prefill_matches_transformers() {
    run_chunks(&golden("tiny-qwen2"), usize::MAX);
}

#[test]
fn qwen2_chunked_prefill_and_decode_match_transformers() {
    let g = golden("tiny-qwen2");
    run_chunks(&g, 7);
    run_chunks(&g, 1);
}

#[test]
fn greedy_continuation_matches_transformers() {
    greedy(&golden("tiny-llama"));
    greedy(&golden("tiny-qwen2"));
}

#[test]
fn tokenizer_matches_transformers() {
    tokenizer_parity(&golden("tiny-llama"));
    tokenizer_parity(&golden("tiny-qwen2"));
}

fn chat_template_parity(name: &str) {
    use weir_engine::tokenizer::{ChatMessage, TextTokenizer};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let messages: Vec<ChatMessage> = record["conversation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
            ..Default::default()
        })
        .collect();
    let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
    let rendered = tokenizer
        .apply_chat_template(&messages, true, None)
        .unwrap();
    assert_eq!(rendered, record["chat_prompt"].as_str().unwrap(), "{name}");
}

#[test]
fn chat_template_matches_transformers() {
    chat_template_parity("tiny-llama");
    chat_template_parity("tiny-qwen2");
}

#[test]
fn incremental_decoding_reassembles_the_text_exactly() {
    use weir_engine::tokenizer::{IncrementalDecoder, TextTokenizer};
    for name in ["tiny-llama", "tiny-qwen2"] {
        let g = golden(name);
        let tokenizer = TextTokenizer::from_dir(&g.dir).unwrap();
        let split = 3;
        let mut decoder = IncrementalDecoder::new(&g.ids[..split]);
        let mut text = String::new();
        for &id in &g.ids[split..] {
            let delta = decoder.push(&tokenizer, id).unwrap();
            assert!(
                !delta.contains('\u{FFFD}'),
                "{name}: broken UTF-8 in {delta:?}"
            );
            text.push_str(&delta);
        }
        let whole = tokenizer.decode(&g.ids, true).unwrap();
        let head = tokenizer.decode(&g.ids[..split], true).unwrap();
        assert_eq!(format!("{head}{text}"), whole, "{name}");
        assert!(whole.contains("🙂") && whole.contains("Naïve"), "{whole}");
    }
}

#[test]
fn unknown_role_raises_a_template_error() {
    use weir_engine::tokenizer::{ChatMessage, TextTokenizer};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
    let bad = [ChatMessage {
        role: "wizard".into(),
        content: "hi".into(),
        ..Default::default()
    }];
    let err = tokenizer
        .apply_chat_template(&bad, true, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown role wizard"), "{err}");
}
