//! Arbitrary bytes as request bodies: parsing never panics, and every
//! refusal is a 4xx in OpenAI's shape.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_agent::api::extract::parse;
use weir_agent::api::types::{ChatCompletionRequest, CompletionRequest, EmbeddingRequest};

fuzz_target!(|data: &[u8]| {
    for status in [
        parse::<ChatCompletionRequest>(data).err().map(|e| e.status()),
        parse::<CompletionRequest>(data).err().map(|e| e.status()),
        parse::<EmbeddingRequest>(data).err().map(|e| e.status()),
    ]
    .into_iter()
    .flatten()
    {
        assert!(status.is_client_error(), "{status}");
    }
});
