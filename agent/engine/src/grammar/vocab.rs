//! The model's vocabulary as byte strings, for the grammar engine's token
//! trie.
//!
//! `toktrie` needs each token id's exact bytes. The adapter crate that reads
//! them from a `tokenizers::Tokenizer` pins an older `tokenizers` than ours,
//! so the bytes are read here from our tokenizer: byte-level BPE tokens
//! (GPT-2's byte-to-character map), byte-fallback SentencePiece tokens
//! (`<0xNN>` and `▁` for space), and special tokens marked as `toktrie`
//! expects (a leading `0xFF`), so a grammar can never produce them as text.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::tokenizer::TextTokenizer;

/// How token strings map to bytes, read from the tokenizer's decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    /// GPT-2 byte level: each byte is one printable character.
    ByteLevel,
    /// SentencePiece with byte fallback: `<0xNN>` tokens and `▁` for space.
    ByteFallback,
    /// Anything else: each token decoded on its own (lossy for tokens that
    /// hold part of a UTF-8 character).
    Decoded,
}

/// Which encoding the decoder (as JSON) uses.
fn encoding_of(decoder: &Value) -> Encoding {
    let mut found = Encoding::Decoded;
    visit_decoders(decoder, &mut |kind| match kind {
        "ByteLevel" => found = Encoding::ByteLevel,
        "ByteFallback" if found != Encoding::ByteLevel => found = Encoding::ByteFallback,
        _ => {}
    });
    found
}

fn visit_decoders(decoder: &Value, f: &mut impl FnMut(&str)) {
    if let Some(kind) = decoder.get("type").and_then(Value::as_str) {
        f(kind);
    }
    if let Some(inner) = decoder.get("decoders").and_then(Value::as_array) {
        for d in inner {
            visit_decoders(d, f);
        }
    }
}

/// GPT-2's map from printable characters back to bytes.
fn byte_level_map() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = HashMap::with_capacity(256);
    let mut next = 256u32;
    for b in 0..=255u8 {
        if printable(b) {
            map.insert(b as char, b);
        } else {
            if let Some(c) = char::from_u32(next) {
                map.insert(c, b);
            }
            next += 1;
        }
    }
    map
}

/// The bytes of every token id below `vocab_size` (ids the tokenizer does
/// not know, such as the padding rows of an LM head, get no bytes and so can
/// never be chosen under a grammar).
pub(crate) fn token_bytes(tokenizer: &TextTokenizer, vocab_size: usize) -> Vec<Vec<u8>> {
    let inner = tokenizer.inner();
    let decoder = inner
        .get_decoder()
        .and_then(|d| serde_json::to_value(d).ok())
        .unwrap_or(Value::Null);
    let encoding = encoding_of(&decoder);
    let added = inner.get_added_tokens_decoder();
    let chars = byte_level_map();
    (0..vocab_size as u32)
        .map(|id| {
            if let Some(token) = added.get(&id) {
                if token.special {
                    let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    bytes.extend_from_slice(token.content.as_bytes());
                    return bytes;
                }
                return token.content.as_bytes().to_vec();
            }
            let Some(piece) = inner.id_to_token(id) else {
                return Vec::new();
            };
            match encoding {
                Encoding::ByteLevel => piece
                    .chars()
                    .map(|c| chars.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_default(),
                Encoding::ByteFallback => byte_fallback(&piece),
                Encoding::Decoded => tokenizer
                    .decode(&[id], false)
                    .map(String::into_bytes)
                    .unwrap_or_default(),
            }
        })
        .collect()
}

fn byte_fallback(piece: &str) -> Vec<u8> {
    let hex = piece
        .strip_prefix("<0x")
        .and_then(|s| s.strip_suffix('>'))
        .filter(|h| h.len() == 2);
    match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
        Some(b) => vec![b],
        None => piece.replace('\u{2581}', " ").into_bytes(),
    }
}

/// A token environment over a trie of the model's vocabulary. It tokenizes
/// greedily over the trie; the grammar engine only needs that for forced
/// tokens, which the engine does not use.
struct TrieEnv {
    trie: TokTrie,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// The token environment of a model: its vocabulary of `vocab_size` ids and
/// its first end-of-sequence token.
pub(crate) fn tok_env(tokenizer: &TextTokenizer, vocab_size: usize, eos: u32) -> TokEnv {
    let words = token_bytes(tokenizer, vocab_size);
    let info = TokRxInfo::new(words.len() as u32, eos);
    Arc::new(TrieEnv {
        trie: TokTrie::from(&info, &words),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_map_covers_every_byte_once() {
        let map = byte_level_map();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'a'], b'a');
        assert_eq!(map[&'Ċ'], b'\n');
    }

    #[test]
    fn byte_fallback_pieces() {
        assert_eq!(byte_fallback("<0x0A>"), b"\n");
        assert_eq!(byte_fallback("\u{2581}the"), b" the");
        assert_eq!(byte_fallback("<0xZZ>"), b"<0xZZ>");
    }

    #[test]
    fn decoder_kinds() {
        let seq = serde_json::json!({"type": "Sequence", "decoders": [
            {"type": "Replace"}, {"type": "ByteFallback"}, {"type": "Fuse"}]});
        assert_eq!(encoding_of(&seq), Encoding::ByteFallback);
        let bl = serde_json::json!({"type": "ByteLevel"});
        assert_eq!(encoding_of(&bl), Encoding::ByteLevel);
        assert_eq!(encoding_of(&Value::Null), Encoding::Decoded);
    }
}
