//! Property tests of the KV block pool: random sequences of allocate, prefix
//! lookup, register, share and release against a model of who owns what.

use std::collections::HashMap;

use proptest::prelude::*;
use weir_engine::kv_pool::{BlockId, KvBlockPool};

/// One owner of blocks: a sequence whose first `tokens.len()` tokens are its
/// content, or an anonymous holder (`tokens` empty, never registers).
#[derive(Clone, Debug)]
struct Owner {
    blocks: Vec<BlockId>,
    tokens: Vec<u32>,
    /// Leading blocks already registered as full (or found in the cache).
    registered: usize,
    /// Forks share blocks with their origin and never register.
    can_register: bool,
}

#[derive(Clone, Debug)]
enum Op {
    /// Start a sequence: prefix lookup, then allocate the rest of its blocks.
    Start {
        base: usize,
        base_len: usize,
        suffix: Vec<u32>,
    },
    Allocate(usize),
    Register(usize),
    Share(usize),
    Release(usize),
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..14usize, prop::collection::vec(0..3u32, 0..6))
            .prop_map(|(base, base_len, suffix)| Op::Start { base, base_len, suffix }),
        1 => (0..4usize).prop_map(Op::Allocate),
        6 => any::<prop::sample::Index>().prop_map(|i| Op::Register(i.index(1 << 16))),
        1 => any::<prop::sample::Index>().prop_map(|i| Op::Share(i.index(1 << 16))),
        3 => any::<prop::sample::Index>().prop_map(|i| Op::Release(i.index(1 << 16))),
        1 => Just(Op::Reset),
    ]
}

struct Model {
    pool: KvBlockPool,
    owners: Vec<Owner>,
    /// What each registered block truly holds: its sequence's tokens from the
    /// start up to the block's end (the whole prefix, not only the block).
    content: HashMap<BlockId, Vec<u32>>,
}

/// Three base prompts that share long runs, so prefixes collide often.
fn base_prompt(base: usize, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| if base == 2 && i > 5 { 7 } else { i % 5 })
        .collect()
}

impl Model {
    fn owners_of(&self, block: BlockId) -> u32 {
        let held = self.owners.iter().flat_map(|o| o.blocks.iter());
        held.filter(|&&b| b == block).count() as u32
    }

    fn take_new(&mut self, n: usize) -> Option<Vec<BlockId>> {
        let free_before = self.pool.num_free();
        match self.pool.allocate(n) {
            Ok(blocks) => {
                for &b in &blocks {
                    assert_eq!(
                        self.owners_of(b),
                        0,
                        "allocate handed out referenced block {b}"
                    );
                    self.content.remove(&b);
                }
                assert_eq!(self.pool.num_free(), free_before - n);
                Some(blocks)
            }
            Err(_) => {
                assert!(
                    n > free_before,
                    "allocate failed with {free_before} free for {n}"
                );
                assert_eq!(
                    self.pool.num_free(),
                    free_before,
                    "failed allocate changed the pool"
                );
                None
            }
        }
    }

    fn start(&mut self, tokens: Vec<u32>) {
        let bs = self.pool.block_size();
        let probe = self.pool.probe_cached_prefix(&tokens);
        let hit = self.pool.acquire_cached_prefix(&tokens);
        assert_eq!(hit.blocks.len(), probe.num_blocks);
        assert!(
            hit.num_tokens(bs) < tokens.len().max(1),
            "a hit covered the last token"
        );
        for (i, &b) in hit.blocks.iter().enumerate() {
            let want = &tokens[i * bs..(i + 1) * bs];
            assert_eq!(
                self.pool.cached_tokens(b),
                Some(want),
                "stored tokens differ"
            );
            let truth = self.content.get(&b).map(Vec::as_slice);
            assert_eq!(
                truth,
                Some(&tokens[..(i + 1) * bs]),
                "block {b} holds another prefix"
            );
        }
        let mut blocks = hit.blocks;
        let registered = blocks.len();
        let more = tokens.len().div_ceil(bs).max(1) - registered;
        // The hit is held by no owner yet: record it first so take_new sees it.
        self.owners.push(Owner {
            blocks: blocks.clone(),
            tokens: tokens.clone(),
            registered,
            can_register: false,
        });
        let fresh = self.take_new(more);
        let owner = self.owners.pop().expect("just pushed");
        match fresh {
            Some(fresh) => {
                blocks.extend(fresh);
                self.owners.push(Owner {
                    blocks,
                    tokens,
                    registered,
                    can_register: true,
                });
            }
            None => self.pool.release(&owner.blocks).expect("the hit is held"),
        }
    }

    fn register(&mut self, i: usize) {
        let bs = self.pool.block_size();
        let o = &self.owners[i];
        if !o.can_register || o.registered >= o.tokens.len() / bs {
            return;
        }
        let k = o.registered;
        let parent = k.checked_sub(1).map(|p| o.blocks[p]);
        let (block, prefix) = (o.blocks[k], o.tokens[..(k + 1) * bs].to_vec());
        self.pool
            .register_full_block(block, parent, &prefix[k * bs..])
            .expect("valid register");
        self.content.insert(block, prefix);
        self.owners[i].registered += 1;
    }

    fn apply(&mut self, op: Op) {
        let n = self.owners.len();
        match op {
            Op::Start {
                base,
                base_len,
                suffix,
            } => {
                let mut tokens = base_prompt(base, base_len);
                tokens.extend(suffix);
                if !tokens.is_empty() {
                    self.start(tokens);
                }
            }
            Op::Allocate(k) => {
                if let Some(blocks) = self.take_new(k) {
                    self.owners.push(Owner {
                        blocks,
                        tokens: vec![],
                        registered: 0,
                        can_register: false,
                    });
                }
            }
            Op::Register(i) if n > 0 => self.register(i % n),
            Op::Share(i) if n > 0 => {
                let mut fork = self.owners[i % n].clone();
                self.pool
                    .share(&fork.blocks)
                    .expect("owner holds its blocks");
                fork.can_register = false;
                self.owners.push(fork);
            }
            Op::Release(i) if n > 0 => {
                let o = self.owners.swap_remove(i % n);
                self.pool
                    .release(&o.blocks)
                    .expect("owner holds its blocks");
                // A second release of blocks nobody holds any more is refused.
                if o.blocks.iter().any(|&b| self.owners_of(b) == 0) {
                    assert!(
                        self.pool.release(&o.blocks).is_err(),
                        "double release accepted"
                    );
                }
            }
            Op::Reset => {
                self.pool.reset_prefix_cache();
                assert_eq!(self.pool.num_cached_blocks(), 0);
            }
            _ => {}
        }
    }

    fn check(&self) {
        self.pool.audit().expect("pool bookkeeping");
        let mut free = 0;
        for b in 0..self.pool.num_blocks() as BlockId {
            let refs = self.pool.ref_count(b).expect("in range");
            assert_eq!(
                refs,
                self.owners_of(b),
                "refcount of block {b} differs from its owners"
            );
            free += usize::from(refs == 0);
        }
        assert_eq!(
            self.pool.num_free(),
            free,
            "num_free is not the unreferenced blocks"
        );
        assert_eq!(
            self.pool.num_free() + self.pool.num_referenced(),
            self.pool.num_blocks()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn pool_invariants_hold(
        num_blocks in 1..24usize,
        block_size in 1..5usize,
        caching in any::<bool>(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let pool = KvBlockPool::new(num_blocks, block_size, caching).expect("valid sizes");
        let mut m = Model { pool, owners: vec![], content: HashMap::new() };
        for op in ops {
            m.apply(op);
            m.check();
        }
        for o in std::mem::take(&mut m.owners) {
            m.pool.release(&o.blocks).expect("owner holds its blocks");
        }
        prop_assert_eq!(m.pool.num_free(), num_blocks);
        m.check();
    }
}
