//! Routing: any agent accepts a request for any model served anywhere. A
//! model held here is served here; a model held by peers is forwarded to
//! one of their ready replicas, chosen by rendezvous hashing of the prompt
//! prefix with bounded load, so that shared prefixes meet their cached KV
//! blocks without overloading one replica. A connection failure retries the
//! next replica; a request already forwarded once is never forwarded again.
//! A model that exists without a ready replica has its requests held here
//! until one is ready ([`hold`]).

pub mod ensemble;
pub mod forward;
pub mod hold;
pub mod peers;

/// Header marking a request forwarded by another agent.
pub const FORWARDED: &str = "x-weir-forwarded";
/// Load bound factor: no replica takes more than this times its fair share.
const LOAD_FACTOR: f64 = 1.25;

/// 64-bit FNV-1a: stable across processes and versions, unlike std's hasher.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Hash of a prompt's first 256 bytes: requests that share it land on the
/// same replica.
pub fn prefix_hash(prompt: &str) -> u64 {
    let end = (0..=prompt.len().min(256))
        .rev()
        .find(|&i| prompt.is_char_boundary(i))
        .unwrap_or(0);
    stable_hash(&prompt.as_bytes()[..end])
}

/// Orders `candidates` for a request with prefix hash `key`: rendezvous
/// (highest random weight) hashing, skipping replicas above the load bound
/// `ceil(c × (total + 1) / n)` unless all are above it.
pub fn order(key: u64, candidates: &[(String, usize)]) -> Vec<usize> {
    let n = candidates.len();
    if n == 0 {
        return Vec::new();
    }
    let total: usize = candidates.iter().map(|(_, load)| load).sum();
    let bound = (LOAD_FACTOR * (total + 1) as f64 / n as f64).ceil() as usize;
    let mut scored: Vec<(u64, usize)> = candidates
        .iter()
        .enumerate()
        .map(|(i, (url, _))| (stable_hash(format!("{key:016x}{url}").as_bytes()), i))
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let (under, over): (Vec<usize>, Vec<usize>) = scored
        .into_iter()
        .map(|(_, i)| i)
        .partition(|&i| candidates[i].1 < bound);
    under.into_iter().chain(over).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(n: usize) -> Vec<(String, usize)> {
        (0..n)
            .map(|i| (format!("http://10.0.0.{i}:8080"), 0))
            .collect()
    }

    #[test]
    fn the_same_prefix_goes_to_the_same_replica() {
        let r = replicas(5);
        let key = prefix_hash("You are a helpful assistant. Summarise:");
        assert_eq!(order(key, &r)[0], order(key, &r)[0]);
        // Different prefixes spread over the replicas.
        let firsts: std::collections::BTreeSet<usize> = (0..200)
            .map(|i| order(prefix_hash(&format!("prompt {i}")), &r)[0])
            .collect();
        assert_eq!(firsts.len(), 5);
    }

    #[test]
    fn removing_a_replica_moves_only_its_keys() {
        let all = replicas(5);
        let fewer: Vec<_> = all[..4].to_vec();
        let keys: Vec<u64> = (0..2000)
            .map(|i| prefix_hash(&format!("key {i}")))
            .collect();
        let mut moved = 0;
        for &k in &keys {
            let before = &all[order(k, &all)[0]].0;
            let after = &fewer[order(k, &fewer)[0]].0;
            if before != after {
                assert_eq!(before, &all[4].0, "a key moved although its replica stayed");
                moved += 1;
            }
        }
        assert!(
            (300..=500).contains(&moved),
            "moved {moved} of 2000, expected about 1/5"
        );
    }

    #[test]
    fn loaded_replicas_are_skipped_until_all_are_loaded() {
        let key = prefix_hash("hot prefix");
        let mut r = replicas(3);
        let favourite = order(key, &r)[0];
        r[favourite].1 = 10;
        let next = order(key, &r);
        assert_ne!(next[0], favourite);
        assert_eq!(*next.last().unwrap(), favourite);
        for x in &mut r {
            x.1 = 10;
        }
        assert_eq!(
            order(key, &r)[0],
            favourite,
            "all equally loaded: back to the hash order"
        );
    }

    #[test]
    fn prefix_hash_respects_utf8_and_length() {
        let long = "é".repeat(300);
        assert_eq!(prefix_hash(&long), prefix_hash(&format!("{long}tail")));
        assert_ne!(prefix_hash("a"), prefix_hash("b"));
    }
}
