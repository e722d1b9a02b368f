//! The request parser on the fuzz corpus (checked in under
//! `agent/fuzz/corpus/parse_request/`) and on arbitrary bytes, on stable
//! Rust, so CI exercises what the cargo-fuzz target checks: parsing never
//! panics, and every refusal is a 4xx in OpenAI's shape.

use proptest::prelude::*;
use weir_agent::api::extract::parse;
use weir_agent::api::types::{ChatCompletionRequest, CompletionRequest, EmbeddingRequest};

fn check(data: &[u8]) {
    let errors = [
        parse::<ChatCompletionRequest>(data).err(),
        parse::<CompletionRequest>(data).err(),
        parse::<EmbeddingRequest>(data).err(),
    ];
    for e in errors.into_iter().flatten() {
        assert!(e.status().is_client_error(), "{}: {e}", e.status());
        assert!(e.body()["error"]["message"].is_string());
    }
}

#[test]
fn corpus_seeds_parse_or_are_refused_cleanly() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse_request");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        check(&std::fs::read(entry.unwrap().path()).unwrap());
        seen += 1;
    }
    assert!(seen >= 10, "corpus has {seen} seeds");
    assert!(parse::<ChatCompletionRequest>(&std::fs::read(dir.join("chat_full")).unwrap()).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&data);
    }

    #[test]
    fn mutated_valid_bodies_never_panic(cut in 0usize..200, byte in any::<u8>(), at in 0usize..200) {
        let mut body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stop":["a"]}"#.to_vec();
        let at = at % body.len();
        body[at] = byte;
        body.truncate(cut.max(1).min(body.len()));
        check(&body);
    }
}
