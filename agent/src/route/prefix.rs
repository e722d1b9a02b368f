//! Choosing a replica: the routing policies and the prefix-aware cost.
//!
//! # The cost (in prompt tokens)
//!
//! For a prompt of `P` tokens and a replica whose summary shows its cache
//! holding the first `C` of them (whole blocks, found by chaining the same
//! [`BlockHash`]es the engine computes):
//!
//! ```text
//! cost = (P − C)                       prefill left after the cached prefix
//!      + queued_prefill                prompt tokens it has yet to compute
//!      + 128 × sequences               running + waiting, estimated now
//! ```
//!
//! A sequence in the batch is priced as [`SEQ_TOKENS`] = 128 prompt
//! tokens: each one shares every engine step with the new request and
//! delays its first token by its share of them. The price decides how
//! much cache a conversation leaves behind to avoid a busier replica: one
//! more sequence is worth moving for a cached prefix under 128 tokens.
//!
//! # The balance guard (bounded load)
//!
//! As in consistent hashing with bounded loads (Mirrokni et al.): with `n`
//! replicas carrying `L` sequences in all, a replica already carrying
//! `max(⌈c × (L + 1) / n⌉, MIN_BOUND)` or more, with `c` = [`LOAD_FACTOR`]
//! = 1.25 and [`MIN_BOUND`] = 2, is skipped while any replica is below
//! that bound. (The floor keeps a nearly idle cluster from sending a
//! conversation away from its cache because its replica runs one other
//! sequence.) So when every request
//! shares one long system prompt, the replica that cached it first cannot
//! take more than 1.25× its fair share; the others soon cache it too.
//!
//! # Fallback
//!
//! The cost needs a fresh summary of every candidate (an unknown replica
//! would look empty and attract everything). When one is missing, or the
//! prompt's tokens are not known here, the request is placed by
//! rendezvous hashing of its prefix with the same bounded load
//! ([`super::order`]).

use weir_engine::kv_pool::BlockHash;

/// Bound factor of the balance guard.
pub const LOAD_FACTOR: f64 = 1.25;
/// The guard never calls a replica with fewer sequences than this loaded.
pub const MIN_BOUND: usize = 2;
/// Prompt tokens one running or waiting sequence is priced as.
pub const SEQ_TOKENS: usize = 128;

/// How requests are spread over a model's replicas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// Lowest cost: uncached prefill plus load, with the balance guard.
    #[default]
    Prefix,
    /// Rendezvous hashing of the prompt's start, with bounded load.
    Hash,
    /// Fewest sequences (then fewest queued prefill tokens).
    LeastLoad,
    /// Each replica in turn.
    RoundRobin,
}

impl Policy {
    /// Its name on the command line and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prefix => "prefix",
            Self::Hash => "hash",
            Self::LeastLoad => "least-load",
            Self::RoundRobin => "round-robin",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "prefix" => Self::Prefix,
            "hash" => Self::Hash,
            "least-load" => Self::LeastLoad,
            "round-robin" => Self::RoundRobin,
            other => {
                return Err(format!(
                    "unknown routing policy `{other}` (prefix, hash, least-load, round-robin)"
                ));
            }
        })
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What routing knows of one replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its identity in the hash (the URL peers know it by).
    pub url: String,
    /// Running plus waiting sequences (for a peer, estimated from its last
    /// report and our own in flight to it).
    pub seqs: usize,
    /// Prompt tokens it has yet to compute.
    pub prefill_queued: usize,
    /// Prompt tokens its cache holds, when a fresh summary says so.
    pub cached: Option<usize>,
}

/// What a placement was based on (a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    /// The policy's own rule.
    Policy,
    /// Rendezvous hashing, for want of summaries or tokens.
    HashFallback,
}

impl Basis {
    /// Its metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::HashFallback => "hash-fallback",
        }
    }
}

/// Load of a candidate in prompt tokens.
pub fn load_tokens(c: &Candidate) -> usize {
    c.prefill_queued + SEQ_TOKENS * c.seqs
}

/// The cost of sending a `prompt_len`-token prompt to `c`, whose cache
/// holds `cached` of its tokens.
pub fn cost(prompt_len: usize, cached: usize, c: &Candidate) -> usize {
    prompt_len.saturating_sub(cached) + load_tokens(c)
}

/// The guard's bound: a candidate with this many sequences or more is
/// skipped while another is below it.
pub fn load_bound(candidates: &[Candidate]) -> usize {
    let total: usize = candidates.iter().map(|c| c.seqs).sum();
    let fair = (LOAD_FACTOR * (total + 1) as f64 / candidates.len().max(1) as f64).ceil();
    (fair as usize).max(MIN_BOUND)
}

/// The chained hashes of the full blocks of `tokens` a cache could hold
/// (never the block holding the last token, as the pool computes it).
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    if block_size == 0 {
        return Vec::new();
    }
    let full = tokens.len().saturating_sub(1) / block_size;
    let mut parent = None;
    tokens
        .chunks_exact(block_size)
        .take(full)
        .map(|chunk| {
            let h = BlockHash::chain(parent, chunk);
            parent = Some(h);
            h
        })
        .collect()
}

/// Tokens covered by the leading `hashes` that `holds` says are cached.
pub fn cached_tokens(
    hashes: &[BlockHash],
    block_size: usize,
    holds: impl Fn(BlockHash) -> bool,
) -> usize {
    hashes.iter().take_while(|h| holds(**h)).count() * block_size
}

/// Candidates in the order to try them for a request whose prefix hashes
/// to `key`, whose prompt has `prompt_len` tokens when known, under
/// `policy`; `turn` numbers round-robin placements.
pub fn place(
    policy: Policy,
    candidates: &[Candidate],
    key: u64,
    prompt_len: Option<usize>,
    turn: usize,
) -> (Vec<usize>, Basis) {
    let n = candidates.len();
    let hash_order = || {
        let loads: Vec<(String, usize)> =
            candidates.iter().map(|c| (c.url.clone(), c.seqs)).collect();
        super::order(key, &loads)
    };
    match policy {
        Policy::Hash => (hash_order(), Basis::Policy),
        Policy::RoundRobin => (
            (0..n).map(|i| (turn + i) % n.max(1)).collect(),
            Basis::Policy,
        ),
        Policy::LeastLoad => {
            let mut order = hash_order();
            order.sort_by_key(|&i| (candidates[i].seqs, candidates[i].prefill_queued));
            (order, Basis::Policy)
        }
        Policy::Prefix => {
            let cached: Option<Vec<usize>> = candidates.iter().map(|c| c.cached).collect();
            let (Some(cached), Some(prompt_len)) = (cached, prompt_len) else {
                return (hash_order(), Basis::HashFallback);
            };
            let bound = load_bound(candidates);
            // Hash order breaks ties, so equal costs still spread by prefix.
            let mut order = hash_order();
            order.sort_by_key(|&i| {
                let c = &candidates[i];
                (c.seqs >= bound, cost(prompt_len, cached[i], c))
            });
            (order, Basis::Policy)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(i: usize, seqs: usize, cached: usize) -> Candidate {
        Candidate {
            url: format!("http://10.0.0.{i}:8080"),
            seqs,
            prefill_queued: 0,
            cached: Some(cached),
        }
    }

    #[test]
    fn the_cost_is_uncached_prefill_plus_load_in_tokens() {
        let mut c = replica(0, 2, 0);
        c.prefill_queued = 100;
        assert_eq!(load_tokens(&c), 100 + 2 * SEQ_TOKENS);
        assert_eq!(cost(1000, 640, &c), 360 + 100 + 2 * SEQ_TOKENS);
        assert_eq!(
            cost(10, 64, &c),
            100 + 2 * SEQ_TOKENS,
            "never below the load"
        );
    }

    #[test]
    fn the_longest_cached_prefix_wins_at_equal_load() {
        let r = vec![replica(0, 1, 0), replica(1, 1, 512), replica(2, 1, 128)];
        let (order, basis) = place(Policy::Prefix, &r, 7, Some(600), 0);
        assert_eq!(basis, Basis::Policy);
        assert_eq!(order, vec![1, 2, 0]);
    }

    #[test]
    fn load_outweighs_a_small_cache_advantage() {
        // A cached prefix worth less than the 2 more sequences loses.
        let small = 2 * SEQ_TOKENS - 16;
        let r = vec![replica(0, 3, small), replica(1, 1, 0)];
        assert_eq!(load_bound(&r), 4, "the guard is not what decides here");
        assert_eq!(place(Policy::Prefix, &r, 7, Some(2000), 0).0[0], 1);
        // One worth more wins.
        let r = vec![replica(0, 3, 2 * SEQ_TOKENS + 16), replica(1, 1, 0)];
        assert_eq!(place(Policy::Prefix, &r, 7, Some(2000), 0).0[0], 0);
    }

    #[test]
    fn the_balance_guard_skips_a_replica_above_its_bound_whatever_it_caches() {
        // Total 6 over 4: bound ceil(1.25 × 7 / 4) = 3.
        let r = vec![
            replica(0, 3, 4096),
            replica(1, 1, 0),
            replica(2, 1, 0),
            replica(3, 1, 0),
        ];
        assert_eq!(load_bound(&r), 3);
        let (order, _) = place(Policy::Prefix, &r, 7, Some(4100), 0);
        assert_ne!(order[0], 0);
        assert_eq!(*order.last().unwrap(), 0, "tried last, not never");
        // Nearly idle: one sequence is not a load to avoid.
        let r = vec![replica(0, 1, 512), replica(1, 0, 0), replica(2, 0, 0)];
        assert_eq!(load_bound(&r), MIN_BOUND);
        assert_eq!(place(Policy::Prefix, &r, 7, Some(600), 0).0[0], 0);
        // Below the bound (ceil(1.25 × 5 / 4) = 2), the cache wins.
        let r = vec![
            replica(0, 1, 4096),
            replica(1, 1, 0),
            replica(2, 1, 0),
            replica(3, 1, 0),
        ];
        assert_eq!(place(Policy::Prefix, &r, 7, Some(4100), 0).0[0], 0);
    }

    #[test]
    fn one_shared_prompt_does_not_pile_onto_one_replica() {
        // Every request shares a prompt only replica 0 cached at first;
        // each placement adds a sequence, and a replica caches the prompt
        // once it has served it. No replica may exceed its bound.
        let mut r: Vec<Candidate> = (0..4).map(|i| replica(i, 0, 0)).collect();
        r[0].cached = Some(1024);
        for _ in 0..40 {
            let first = place(Policy::Prefix, &r, 7, Some(1100), 0).0[0];
            let bound = load_bound(&r);
            assert!(r[first].seqs < bound, "placed above the bound");
            r[first].seqs += 1;
            r[first].cached = Some(1024);
        }
        let most = r.iter().map(|c| c.seqs).max().unwrap();
        assert!(most as f64 <= 1.25 * 10.0 + 1.0, "shares {:?}", r);
    }

    #[test]
    fn without_every_summary_or_the_tokens_it_falls_back_to_hashing() {
        let mut r = vec![replica(0, 0, 0), replica(1, 0, 512)];
        r[0].cached = None;
        let loads: Vec<(String, usize)> = r.iter().map(|c| (c.url.clone(), 0)).collect();
        let (order, basis) = place(Policy::Prefix, &r, 99, Some(600), 0);
        assert_eq!(basis, Basis::HashFallback);
        assert_eq!(order, super::super::order(99, &loads));
        r[0].cached = Some(0);
        assert_eq!(
            place(Policy::Prefix, &r, 99, None, 0).1,
            Basis::HashFallback
        );
    }

    #[test]
    fn the_other_policies() {
        let r = vec![replica(0, 3, 0), replica(1, 1, 0), replica(2, 2, 0)];
        assert_eq!(place(Policy::LeastLoad, &r, 1, None, 0).0, vec![1, 2, 0]);
        assert_eq!(place(Policy::RoundRobin, &r, 1, None, 4).0, vec![1, 2, 0]);
        let loads: Vec<(String, usize)> = r.iter().map(|c| (c.url.clone(), c.seqs)).collect();
        assert_eq!(
            place(Policy::Hash, &r, 5, None, 0).0,
            super::super::order(5, &loads)
        );
        assert_eq!("least-load".parse::<Policy>(), Ok(Policy::LeastLoad));
        assert!("best".parse::<Policy>().is_err());
    }

    #[test]
    fn block_hashes_match_the_pool_and_skip_the_last_token() {
        let tokens: Vec<u32> = (0..33).collect();
        let h = block_hashes(&tokens, 16);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0], BlockHash::chain(None, &tokens[..16]));
        assert_eq!(h[1], BlockHash::chain(Some(h[0]), &tokens[16..32]));
        assert_eq!(
            block_hashes(&tokens[..32], 16).len(),
            1,
            "the last token's block is never cached"
        );
        assert_eq!(cached_tokens(&h, 16, |x| x == h[0]), 16);
        assert_eq!(
            cached_tokens(&h, 16, |x| x == h[1]),
            0,
            "only a leading run counts"
        );
    }
}
