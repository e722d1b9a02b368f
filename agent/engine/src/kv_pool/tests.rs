//! Unit tests of the block pool, with access to its internals.

use super::*;

const BS: usize = 4;

fn pool(n: usize) -> KvBlockPool {
    KvBlockPool::new(n, BS, true).expect("valid sizes")
}

/// Allocates blocks for `tokens` and registers every full one, like a
/// sequence whose prompt has been computed.
fn fill(p: &mut KvBlockPool, tokens: &[u32]) -> Vec<BlockId> {
    let blocks = p.allocate(tokens.len().div_ceil(BS)).expect("room");
    for (i, chunk) in tokens.chunks_exact(BS).enumerate() {
        let parent = i.checked_sub(1).map(|j| blocks[j]);
        p.register_full_block(blocks[i], parent, chunk)
            .expect("register");
    }
    blocks
}

fn seq(start: u32, len: u32) -> Vec<u32> {
    (start..start + len).collect()
}

#[test]
fn new_rejects_unusable_sizes() {
    assert!(matches!(
        KvBlockPool::new(0, 4, true),
        Err(KvPoolError::InvalidConfig(_))
    ));
    assert!(matches!(
        KvBlockPool::new(4, 0, true),
        Err(KvPoolError::InvalidConfig(_))
    ));
    let p = KvBlockPool::new(3, 2, false).expect("valid");
    assert_eq!((p.num_blocks(), p.block_size(), p.num_free()), (3, 2, 3));
    assert_eq!(p.usage(), 0.0);
}

#[test]
fn hash_is_deterministic_and_chained() {
    // Pinned: hashes are compared across processes and replicas.
    assert_eq!(
        BlockHash::chain(None, &[1, 2, 3, 4]).0,
        0xf232_d1a0_da75_193f
    );
    let a = BlockHash::chain(None, &[1, 2, 3, 4]);
    let b = BlockHash::chain(None, &[1, 2, 3, 5]);
    assert_ne!(a, b);
    assert_ne!(
        BlockHash::chain(Some(a), &[9; 4]),
        BlockHash::chain(Some(b), &[9; 4])
    );
    assert_ne!(
        BlockHash::chain(None, &[9; 4]),
        BlockHash::chain(Some(a), &[9; 4])
    );
    assert_ne!(
        BlockHash::chain(None, &[0]),
        BlockHash::chain(None, &[0, 0])
    );
}

#[test]
fn allocate_is_all_or_nothing_and_counts() {
    let mut p = pool(4);
    assert_eq!(p.allocate(3).expect("room"), vec![0, 1, 2]);
    assert_eq!(
        p.allocate(2),
        Err(KvPoolError::OutOfBlocks {
            requested: 2,
            free: 1
        })
    );
    assert_eq!(p.num_free(), 1);
    assert_eq!(p.usage(), 0.75);
    assert_eq!(p.allocate(1).expect("room"), vec![3]);
    assert_eq!(p.ref_count(3), Some(1));
    assert_eq!(p.ref_count(4), None);
    assert_eq!(p.allocate(0).expect("nothing to do"), Vec::<BlockId>::new());
    p.audit().expect("consistent");
}

#[test]
fn cached_prefix_is_found_and_shared() {
    let mut p = pool(8);
    let prompt = seq(100, 10); // two full blocks and a partial one
    let a = fill(&mut p, &prompt);
    let hit = p.acquire_cached_prefix(&prompt);
    assert_eq!(hit.blocks, a[..2]);
    assert_eq!(hit.hashes[0], BlockHash::chain(None, &prompt[..4]));
    assert_eq!(
        hit.hashes[1],
        BlockHash::chain(Some(hit.hashes[0]), &prompt[4..8])
    );
    assert_eq!(
        (p.ref_count(a[0]), p.ref_count(a[1]), p.ref_count(a[2])),
        (Some(2), Some(2), Some(1))
    );
    assert_eq!(p.cached_tokens(a[1]), Some(&prompt[4..8]));
    assert_eq!(p.cached_tokens(a[2]), None, "partial blocks are not cached");
    assert_eq!((p.prefix_cache_queries(), p.prefix_cache_hits()), (10, 8));
    // A different first block breaks the chain even if the second matches.
    let mut other = prompt.clone();
    other[0] = 7;
    assert!(p.acquire_cached_prefix(&other).blocks.is_empty());
    assert_eq!((p.prefix_cache_queries(), p.prefix_cache_hits()), (20, 8));
    p.audit().expect("consistent");
}

#[test]
fn prefix_never_covers_the_last_token() {
    let mut p = pool(8);
    let prompt = seq(0, 8);
    fill(&mut p, &prompt);
    assert_eq!(
        p.probe_cached_prefix(&prompt).num_blocks,
        1,
        "8 tokens: last block kept"
    );
    assert_eq!(p.acquire_cached_prefix(&prompt).blocks.len(), 1);
    assert_eq!(p.acquire_cached_prefix(&seq(0, 9)).blocks.len(), 2);
    assert!(p.acquire_cached_prefix(&seq(0, 4)).blocks.is_empty());
    assert!(p.acquire_cached_prefix(&[]).blocks.is_empty());
}

#[test]
fn caching_off_finds_nothing_and_counts_nothing() {
    let mut p = KvBlockPool::new(8, BS, false).expect("valid");
    let prompt = seq(0, 9);
    let a = fill(&mut p, &prompt);
    assert!(p.acquire_cached_prefix(&prompt).blocks.is_empty());
    assert_eq!((p.prefix_cache_queries(), p.num_cached_blocks()), (0, 0));
    p.release(&a).expect("held");
    assert_eq!(p.num_free(), 8);
    p.audit().expect("consistent");
}

#[test]
fn stored_tokens_guard_against_hash_collisions() {
    let mut p = pool(8);
    let a = fill(&mut p, &seq(0, 8));
    // Forge a colliding entry: the hash of the query's first block, other tokens.
    let query = seq(50, 9);
    let hash = BlockHash::chain(None, &query[..4]);
    let uid = p.new_uid();
    let entry = CacheEntry {
        block: a[0],
        uid,
        parent_uid: ROOT_UID,
        tokens: vec![1; 4].into(),
    };
    p.cache.insert(hash, entry);
    assert!(p.acquire_cached_prefix(&query).blocks.is_empty());
    // Same tokens under the wrong parent are refused too.
    let b = fill(&mut p, &seq(60, 4));
    let second = BlockHash::chain(Some(hash), &query[4..8]);
    let entry = CacheEntry {
        block: b[0],
        uid: 999,
        parent_uid: 12345,
        tokens: query[4..8].into(),
    };
    p.cache.insert(second, entry);
    p.cache.get_mut(&hash).expect("forged").tokens = query[..4].into();
    assert_eq!(p.acquire_cached_prefix(&query).blocks, vec![a[0]]);
}

#[test]
fn free_blocks_without_cache_data_are_used_before_evicting() {
    let mut p = pool(4);
    let a = fill(&mut p, &seq(0, 8)); // blocks 0, 1 cached
    p.release(&a).expect("held");
    assert_eq!(p.allocate(2).expect("room"), vec![2, 3]);
    assert_eq!(p.num_cached_blocks(), 2);
    assert_eq!(p.num_evictions(), 0);
}

#[test]
fn eviction_is_lru_and_drops_the_hash() {
    let mut p = pool(4);
    let a = fill(&mut p, &seq(0, 4));
    let b = fill(&mut p, &seq(10, 4));
    let c = fill(&mut p, &seq(20, 4));
    let _held = p.allocate(1).expect("room");
    p.release(&b).expect("held");
    p.release(&a).expect("held");
    p.release(&c).expect("held");
    assert_eq!(
        p.allocate(1).expect("room"),
        b,
        "freed first, evicted first"
    );
    assert!(
        p.probe_cached_prefix(&seq(10, 5)).num_blocks == 0,
        "evicted block is gone"
    );
    assert_eq!(p.cached_tokens(b[0]), None);
    assert_eq!(p.probe_cached_prefix(&seq(0, 5)).num_blocks, 1);
    // Touching `a` makes it referenced; then `c` is the next victim.
    let hit = p.acquire_cached_prefix(&seq(0, 5));
    assert_eq!(hit.blocks, a);
    assert_eq!(p.allocate(1).expect("room"), c);
    assert_eq!(p.num_evictions(), 2);
    assert_eq!(
        p.allocate(1),
        Err(KvPoolError::OutOfBlocks {
            requested: 1,
            free: 0
        })
    );
    p.audit().expect("consistent");
}

#[test]
fn release_is_tail_first() {
    let mut p = pool(3);
    let a = fill(&mut p, &seq(0, 12));
    p.release(&a).expect("held");
    assert_eq!(p.allocate(1).expect("room"), vec![a[2]]);
    assert_eq!(
        p.probe_cached_prefix(&seq(0, 13)).num_blocks,
        2,
        "start of prefix kept"
    );
    assert_eq!(p.allocate(1).expect("room"), vec![a[1]]);
    assert_eq!(p.probe_cached_prefix(&seq(0, 13)).num_blocks, 1);
}

#[test]
fn identical_block_keeps_the_existing_cached_copy() {
    let mut p = pool(4);
    let a = fill(&mut p, &seq(0, 4));
    let b = fill(&mut p, &seq(0, 4));
    assert_ne!(a, b);
    assert_eq!(p.num_cached_blocks(), 1);
    assert_eq!(p.cached_tokens(b[0]), None);
    p.release(&b).expect("held");
    assert_eq!(p.acquire_cached_prefix(&seq(0, 5)).blocks, a);
    // A child of the duplicate is findable through the cached copy.
    let c = p.allocate(2).expect("room");
    p.register_full_block(c[0], None, &seq(0, 4)).expect("dup");
    p.register_full_block(c[1], Some(c[0]), &seq(4, 4))
        .expect("child");
    assert_eq!(p.acquire_cached_prefix(&seq(0, 9)).blocks, vec![a[0], c[1]]);
    p.audit().expect("consistent");
}

#[test]
fn register_rejects_bad_calls() {
    let mut p = pool(4);
    let a = p.allocate(2).expect("room");
    assert_eq!(
        p.register_full_block(9, None, &[0; 4]),
        Err(KvPoolError::UnknownBlock(9))
    );
    assert_eq!(
        p.register_full_block(3, None, &[0; 4]),
        Err(KvPoolError::NotReferenced(3))
    );
    assert_eq!(
        p.register_full_block(a[0], None, &[0; 3]),
        Err(KvPoolError::WrongBlockLength {
            expected: 4,
            got: 3
        })
    );
    assert_eq!(
        p.register_full_block(a[1], Some(a[0]), &[0; 4]),
        Err(KvPoolError::ParentNotRegistered(a[0]))
    );
    p.register_full_block(a[0], None, &[0; 4]).expect("first");
    assert_eq!(
        p.register_full_block(a[0], None, &[0; 4]),
        Err(KvPoolError::AlreadyRegistered(a[0]))
    );
    assert_eq!(p.num_cached_blocks(), 1);
    p.audit().expect("consistent");
}

#[test]
fn release_and_share_validate_before_changing_anything() {
    let mut p = pool(4);
    let a = p.allocate(2).expect("room");
    assert_eq!(
        p.release(&[a[0], a[0]]),
        Err(KvPoolError::NotReferenced(a[0]))
    );
    assert_eq!(p.release(&[a[1], 3]), Err(KvPoolError::NotReferenced(3)));
    assert_eq!(p.release(&[a[1], 70]), Err(KvPoolError::UnknownBlock(70)));
    assert_eq!(p.share(&[a[0], 3]), Err(KvPoolError::NotReferenced(3)));
    assert_eq!((p.ref_count(a[0]), p.ref_count(a[1])), (Some(1), Some(1)));
    p.share(&a).expect("held");
    p.share(&[a[0]]).expect("held");
    assert_eq!((p.ref_count(a[0]), p.ref_count(a[1])), (Some(3), Some(2)));
    p.release(&[a[0], a[0], a[1]]).expect("held");
    assert_eq!(p.num_free(), 2);
    p.release(&a).expect("held");
    assert_eq!(p.num_free(), 4);
    assert_eq!(p.release(&a), Err(KvPoolError::NotReferenced(a[0])));
    p.blocks[a[0] as usize].refs = u32::MAX;
    assert_eq!(p.share(&[a[0]]), Err(KvPoolError::TooManyReferences(a[0])));
}

#[test]
fn reset_forgets_cached_blocks_and_keeps_owners() {
    let mut p = pool(4);
    let a = fill(&mut p, &seq(0, 8));
    let b = fill(&mut p, &seq(20, 8));
    p.release(&a).expect("held");
    assert_eq!(p.reset_prefix_cache(), 4);
    assert_eq!(p.num_cached_blocks(), 0);
    assert_eq!(p.probe_cached_prefix(&seq(0, 9)), PrefixProbe::default());
    assert_eq!((p.ref_count(b[0]), p.num_free()), (Some(1), 2));
    p.audit().expect("consistent");
    // Blocks registered under a forgotten parent are not cached either.
    let c = p.allocate(1).expect("room");
    p.register_full_block(c[0], Some(b[1]), &seq(28, 4))
        .expect("registers");
    assert_eq!(p.num_cached_blocks(), 0);
    p.release(&b).expect("held");
    p.release(&c).expect("held");
    assert_eq!(p.num_free(), 4);
    p.audit().expect("consistent");
}

#[test]
fn audit_detects_broken_bookkeeping() {
    let mut p = pool(2);
    let a = p.allocate(1).expect("room");
    p.blocks[a[0] as usize].refs = 0;
    assert!(matches!(p.audit(), Err(KvPoolError::Inconsistent(_))));
}

#[test]
fn recorded_events_follow_what_the_cache_can_find() {
    let mut pool = KvBlockPool::new(2, 2, true).unwrap();
    assert!(pool.take_events().is_empty(), "not recording yet");
    pool.record_events();
    let a = pool.allocate(1).unwrap();
    let ha = pool.register_full_block(a[0], None, &[1, 2]).unwrap();
    assert_eq!(pool.take_events(), vec![KvEvent::Stored(ha)]);
    pool.release(&a).unwrap();
    // Two fresh allocations: one fresh block, then the cached one is evicted.
    let b = pool.allocate(2).unwrap();
    assert_eq!(pool.take_events(), vec![KvEvent::Removed(ha)]);
    pool.release(&b).unwrap();
    let c = pool.allocate(1).unwrap();
    let hc = pool.register_full_block(c[0], None, &[3, 4]).unwrap();
    pool.reset_prefix_cache();
    assert_eq!(
        pool.take_events(),
        vec![KvEvent::Stored(hc), KvEvent::Cleared]
    );
    assert!(pool.take_events().is_empty());
}
