//! API keys as the agent keeps them: only their SHA-256, never the key.
//! A sent key is hashed and compared with every stored hash in constant
//! time, so that neither the comparison nor which tenant matched shows in
//! the time a refusal takes.

use sha2::{Digest, Sha256};

/// The SHA-256 of an API key. Its `Debug` shows nothing of the hash.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// The hash of `key` with surrounding whitespace (a Secret file's
    /// trailing newline) removed.
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.trim().as_bytes()).into())
    }

    /// Whether `self` and `other` are equal, in time independent of where
    /// they differ.
    pub fn matches(&self, other: &KeyHash) -> bool {
        constant_time_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHash(..)")
    }
}

/// Equality of two digests that reads every byte whatever the inputs:
/// the differences are OR-folded and tested once at the end. Hand-rolled
/// rather than a crate's: one fold over 32 bytes; `black_box` keeps the
/// optimizer from turning it into an early exit.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= std::hint::black_box(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

/// The index of the first hash in `stored` equal to `sent`, comparing
/// with every entry (no early exit).
pub fn find(stored: &[KeyHash], sent: &KeyHash) -> Option<usize> {
    let mut found = None;
    for (i, hash) in stored.iter().enumerate() {
        if hash.matches(sent) && found.is_none() {
            found = Some(i);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_trim_and_compare() {
        let a = KeyHash::of("sk-team-a\n");
        assert!(a.matches(&KeyHash::of("sk-team-a")));
        assert!(!a.matches(&KeyHash::of("sk-team-b")));
        // Known SHA-256 of "abc".
        let abc = KeyHash::of("abc");
        assert_eq!(
            abc.0[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "SHA-256(abc) starts ba7816bf"
        );
        assert_eq!(format!("{a:?}"), "KeyHash(..)");
    }

    #[test]
    fn constant_time_eq_finds_a_difference_anywhere() {
        let base = [7u8; 32];
        assert!(constant_time_eq(&base, &base));
        for i in 0..32 {
            let mut other = base;
            other[i] ^= 0x80;
            assert!(!constant_time_eq(&base, &other), "byte {i}");
        }
    }

    #[test]
    fn find_returns_the_first_match() {
        let stored = [KeyHash::of("a"), KeyHash::of("b"), KeyHash::of("b")];
        assert_eq!(find(&stored, &KeyHash::of("b")), Some(1));
        assert_eq!(find(&stored, &KeyHash::of("c")), None);
    }
}
