//! The paged KV block pool: which fixed-size KV blocks are in use, by how many
//! owners, and which free blocks still hold a reusable prompt prefix.
//!
//! This is bookkeeping only. The tensors live in the backend, which maps a
//! [`BlockId`] to memory; nothing here touches them.

use std::collections::{BTreeMap, HashMap};

use thiserror::Error;

pub use events::{KvChanges, KvEvent, KvSummary};

/// Index of one KV block, `0..num_blocks`.
pub type BlockId = u32;

/// Content hash of a full block, chained over every token before it.
///
/// Computed by [`BlockHash::chain`], which is deterministic across runs,
/// processes and machines, so hashes from several replicas can be compared
/// (for instance by a prefix-aware router).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

impl BlockHash {
    /// Hash of a block holding `tokens`, following the block hashed `parent`
    /// (`None` for the first block of a sequence).
    pub fn chain(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        const SEED: u64 = 0x6a09_e667_f3bc_c908;
        const MUL: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut h = match parent {
            Some(p) => fmix64(p.0 ^ SEED).wrapping_add(1),
            None => SEED,
        };
        for &t in tokens {
            h = (h.rotate_left(23) ^ u64::from(t)).wrapping_mul(MUL);
        }
        BlockHash(fmix64(h ^ tokens.len() as u64))
    }
}

/// The murmur3 64-bit finaliser: spreads every input bit over the output.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Errors of the block pool. All of them leave the pool unchanged.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KvPoolError {
    /// `new` was given unusable sizes.
    #[error("invalid KV pool configuration: {0}")]
    InvalidConfig(&'static str),
    /// Fewer free blocks than requested; nothing was allocated.
    #[error("out of KV blocks: {requested} requested, {free} free")]
    OutOfBlocks {
        /// Blocks asked for.
        requested: usize,
        /// Blocks free at the time.
        free: usize,
    },
    /// The id is not below `num_blocks`.
    #[error("block {0} does not exist")]
    UnknownBlock(BlockId),
    /// The block is free, or would have to be released more times than it is held.
    #[error("block {0} is not referenced (double release or use after free)")]
    NotReferenced(BlockId),
    /// A reference count would overflow.
    #[error("block {0} has too many references")]
    TooManyReferences(BlockId),
    /// A full block must hold exactly `block_size` tokens.
    #[error("a full block holds {expected} tokens, got {got}")]
    WrongBlockLength {
        /// The pool's block size.
        expected: usize,
        /// Tokens given.
        got: usize,
    },
    /// The parent block was never registered as full.
    #[error("parent block {0} is not registered as a full block")]
    ParentNotRegistered(BlockId),
    /// The block was already registered as full.
    #[error("block {0} is already registered as a full block")]
    AlreadyRegistered(BlockId),
    /// `audit` found broken bookkeeping (a bug in the pool).
    #[error("KV pool bookkeeping is inconsistent: {0}")]
    Inconsistent(String),
}

/// A prefix-cache hit: leading full blocks of a prompt that are already computed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CachedPrefix {
    /// The blocks, in sequence order; the caller now holds one reference to each.
    pub blocks: Vec<BlockId>,
    /// Their chained hashes, in the same order.
    pub hashes: Vec<BlockHash>,
}

impl CachedPrefix {
    /// Number of prompt tokens covered, given the pool's block size.
    pub fn num_tokens(&self, block_size: usize) -> usize {
        self.blocks.len() * block_size
    }
}

/// What [`KvBlockPool::acquire_cached_prefix`] would return, without taking it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixProbe {
    /// Leading full blocks found in the cache.
    pub num_blocks: usize,
    /// How many of those are free now: acquiring them lowers `num_free()` by this.
    pub num_free: usize,
}

/// Identity of a full block's content: its hash plus an id that is exact.
#[derive(Clone, Copy, Debug)]
struct Content {
    hash: BlockHash,
    /// Same for two blocks only if their whole prefixes are equal token for token.
    uid: u64,
}

/// Uid standing for "no parent": the start of a sequence.
const ROOT_UID: u64 = 0;

/// The cache's copy of one full block.
#[derive(Debug)]
struct CacheEntry {
    block: BlockId,
    uid: u64,
    parent_uid: u64,
    tokens: Box<[u32]>,
}

#[derive(Clone, Debug, Default)]
struct Block {
    refs: u32,
    /// Set once the block is full and registered; kept while it holds that data.
    content: Option<Content>,
    /// This block is the copy the cache index points to.
    cached: bool,
    /// While free and cached: its key in the eviction queue.
    free_tick: Option<u64>,
}

/// Reference-counted pool of fixed-size KV blocks with automatic prefix caching.
///
/// Blocks are `block_size` tokens each, numbered `0..num_blocks`. A block with
/// a reference count above zero belongs to one or more sequences (several when
/// a prefix is shared, or when `n` samples fork one prompt). A full block whose
/// tokens are all computed can be registered under its chained [`BlockHash`];
/// when its last owner releases it, it stays findable by later prompts until
/// its memory is needed again.
///
/// # Guarantees
///
/// - A block is either free or referenced, never both, and
///   `num_free() + referenced == num_blocks()` at all times.
/// - `allocate` never returns a referenced block, and is all-or-nothing.
/// - `acquire_cached_prefix` returns only blocks whose stored tokens equal the
///   query's, block for block, and whose parents are the blocks returned
///   before them: a hash collision can never yield wrong blocks. (The hash is
///   only the index; each cached block also records the exact identity of
///   its parent's content, which is why `register_full_block` takes the
///   parent block rather than its hash.) It never
///   covers the last token of the query, so the caller always has at least
///   one token to compute (and logits to sample from).
/// - Allocation prefers free blocks holding no cached data; after those, it
///   evicts cached free blocks least recently freed first, and an evicted
///   block can no longer be found.
/// - `release` frees a block table tail first, so the end of a prefix is
///   evicted before its start.
/// - Every fallible call either succeeds or changes nothing.
/// - Deterministic: the same calls give the same block ids.
///
/// # Assumptions
///
/// - A caller writes KV data only into blocks it holds alone (`ref_count == 1`)
///   and registers a block only after every token in it is computed.
/// - A block registered as full is never written again while referenced.
/// - Token ids mean the same thing for every sequence (one model, one
///   tokenizer, no adapter-specific KV); callers mixing those must use one
///   pool each or reset the cache.
///
/// # Caveats
///
/// - If a block's content is already cached in another block, the new block
///   is not registered (block tables stay append-only); it is simply freed
///   without being cached.
/// - Evicting a block in the middle of a cached chain makes the blocks after
///   it unreachable; they stay free and are evicted in turn.
#[derive(Debug)]
pub struct KvBlockPool {
    block_size: usize,
    prefix_caching: bool,
    blocks: Vec<Block>,
    /// Free blocks with no cached data; allocated from the end.
    fresh: Vec<BlockId>,
    /// Free cached blocks by the tick at which they were freed (oldest first).
    evictable: BTreeMap<u64, BlockId>,
    cache: HashMap<BlockHash, CacheEntry>,
    next_tick: u64,
    next_uid: u64,
    queries: u64,
    hits: u64,
    evictions: u64,
    /// Cache additions and evictions not yet taken, when recording.
    events: Option<Vec<KvEvent>>,
}

impl KvBlockPool {
    /// A pool of `num_blocks` free blocks of `block_size` tokens each.
    ///
    /// Fails if either size is zero or `num_blocks` does not fit [`BlockId`].
    pub fn new(
        num_blocks: usize,
        block_size: usize,
        prefix_caching: bool,
    ) -> Result<Self, KvPoolError> {
        if block_size == 0 {
            return Err(KvPoolError::InvalidConfig("block_size must be at least 1"));
        }
        let Some(last) = num_blocks.checked_sub(1) else {
            return Err(KvPoolError::InvalidConfig("num_blocks must be at least 1"));
        };
        let Ok(last) = BlockId::try_from(last) else {
            return Err(KvPoolError::InvalidConfig(
                "num_blocks exceeds the BlockId range",
            ));
        };
        Ok(Self {
            block_size,
            prefix_caching,
            blocks: vec![Block::default(); num_blocks],
            fresh: (0..=last).rev().collect(),
            evictable: BTreeMap::new(),
            cache: HashMap::new(),
            next_tick: 0,
            next_uid: ROOT_UID + 1,
            queries: 0,
            hits: 0,
            evictions: 0,
            events: None,
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Whether full blocks are cached and looked up.
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// Free blocks, including cached ones that allocation may evict.
    pub fn num_free(&self) -> usize {
        self.fresh.len() + self.evictable.len()
    }

    /// Blocks with at least one reference.
    pub fn num_referenced(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Share of blocks referenced, in `[0, 1]`.
    pub fn usage(&self) -> f64 {
        self.num_referenced() as f64 / self.num_blocks() as f64
    }

    /// Blocks the prefix cache can currently find (referenced or free).
    pub fn num_cached_blocks(&self) -> usize {
        self.cache.len()
    }

    /// Reference count of `block`, or `None` if it does not exist.
    pub fn ref_count(&self, block: BlockId) -> Option<u32> {
        self.blocks.get(block as usize).map(|b| b.refs)
    }

    /// The tokens stored with `block` if it is the cache's copy of a full block.
    pub fn cached_tokens(&self, block: BlockId) -> Option<&[u32]> {
        let content = self.blocks.get(block as usize)?.content?;
        self.cache
            .get(&content.hash)
            .filter(|e| e.block == block)
            .map(|e| &*e.tokens)
    }

    /// Prompt tokens looked up in the prefix cache so far.
    pub fn prefix_cache_queries(&self) -> u64 {
        self.queries
    }

    /// Prompt tokens found in the prefix cache so far.
    pub fn prefix_cache_hits(&self) -> u64 {
        self.hits
    }

    /// Starts recording cache additions and evictions for
    /// [`take_events`](Self::take_events); the caller must take them
    /// regularly (the engine does after every step).
    pub fn record_events(&mut self) {
        self.events.get_or_insert_with(Vec::new);
    }

    /// The cache additions and evictions since the last call, in order.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn note(&mut self, event: KvEvent) {
        if let Some(events) = &mut self.events {
            events.push(event);
        }
    }

    /// Cached blocks evicted to make room so far.
    pub fn num_evictions(&self) -> u64 {
        self.evictions
    }

    /// Walks the cached full blocks that start `tokens`, stopping before the
    /// block holding the last token.
    fn walk_prefix(&self, tokens: &[u32], mut visit: impl FnMut(BlockId, BlockHash)) {
        if !self.prefix_caching {
            return;
        }
        let max_blocks = tokens.len().saturating_sub(1) / self.block_size;
        let mut parent = None;
        let mut parent_uid = ROOT_UID;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let hash = BlockHash::chain(parent, chunk);
            let Some(entry) = self.cache.get(&hash) else {
                break;
            };
            let refs = self.blocks[entry.block as usize].refs;
            if entry.parent_uid != parent_uid || *entry.tokens != *chunk || refs == u32::MAX {
                break;
            }
            visit(entry.block, hash);
            parent = Some(hash);
            parent_uid = entry.uid;
        }
    }

    /// How much of `tokens` [`acquire_cached_prefix`](Self::acquire_cached_prefix)
    /// would return now; changes nothing and counts nothing.
    pub fn probe_cached_prefix(&self, tokens: &[u32]) -> PrefixProbe {
        let mut probe = PrefixProbe::default();
        self.walk_prefix(tokens, |block, _| {
            probe.num_blocks += 1;
            if self.blocks[block as usize].refs == 0 {
                probe.num_free += 1;
            }
        });
        probe
    }

    /// Takes one reference to each cached full block that starts `tokens`
    /// (the longest such run, never covering the last token).
    ///
    /// Counts `tokens.len()` queried and the covered tokens as hits. With
    /// prefix caching off it returns nothing and counts nothing.
    pub fn acquire_cached_prefix(&mut self, tokens: &[u32]) -> CachedPrefix {
        if !self.prefix_caching {
            return CachedPrefix::default();
        }
        let mut found = CachedPrefix::default();
        self.walk_prefix(tokens, |block, hash| {
            found.blocks.push(block);
            found.hashes.push(hash);
        });
        for &block in &found.blocks {
            self.take_ref(block);
        }
        self.queries += tokens.len() as u64;
        self.hits += found.num_tokens(self.block_size) as u64;
        found
    }

    /// Adds a reference, taking the block off the eviction queue if it was free.
    fn take_ref(&mut self, block: BlockId) {
        let b = &mut self.blocks[block as usize];
        if let Some(tick) = b.free_tick.take() {
            self.evictable.remove(&tick);
        }
        b.refs += 1;
    }

    /// Allocates `n` blocks, each with one reference; all or nothing.
    ///
    /// Takes free blocks holding no cached data first, then evicts the least
    /// recently freed cached ones (which then stop being findable).
    pub fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>, KvPoolError> {
        let free = self.num_free();
        if n > free {
            return Err(KvPoolError::OutOfBlocks { requested: n, free });
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let block = match self.fresh.pop() {
                Some(block) => block,
                None => self
                    .evict_lru()
                    .expect("num_free() counted this block as fresh or evictable"),
            };
            self.blocks[block as usize].refs = 1;
            out.push(block);
        }
        Ok(out)
    }

    /// Removes the least recently freed cached block from the cache.
    fn evict_lru(&mut self) -> Option<BlockId> {
        let (_, block) = self.evictable.pop_first()?;
        let b = &mut self.blocks[block as usize];
        b.free_tick = None;
        b.cached = false;
        if let Some(content) = b.content.take() {
            self.cache.remove(&content.hash);
            self.note(KvEvent::Removed(content.hash));
        }
        self.evictions += 1;
        Some(block)
    }

    fn check_referenced(&self, block: BlockId) -> Result<&Block, KvPoolError> {
        let b = self
            .blocks
            .get(block as usize)
            .ok_or(KvPoolError::UnknownBlock(block))?;
        if b.refs == 0 {
            return Err(KvPoolError::NotReferenced(block));
        }
        Ok(b)
    }

    /// Records that `block`, following `parent` in its sequence (`None` for
    /// the first block), is full with `tokens`, all computed. Returns its hash.
    ///
    /// With prefix caching on, the block becomes findable unless identical
    /// content is already cached (the existing copy stays the cached one) or
    /// its parent is no longer findable. Both blocks must be referenced, and
    /// `parent` registered before.
    pub fn register_full_block(
        &mut self,
        block: BlockId,
        parent: Option<BlockId>,
        tokens: &[u32],
    ) -> Result<BlockHash, KvPoolError> {
        if self.check_referenced(block)?.content.is_some() {
            return Err(KvPoolError::AlreadyRegistered(block));
        }
        if tokens.len() != self.block_size {
            return Err(KvPoolError::WrongBlockLength {
                expected: self.block_size,
                got: tokens.len(),
            });
        }
        let (parent_hash, parent_uid) = match parent {
            None => (None, ROOT_UID),
            Some(p) => {
                let c = self
                    .check_referenced(p)?
                    .content
                    .ok_or(KvPoolError::ParentNotRegistered(p))?;
                (Some(c.hash), c.uid)
            }
        };
        let hash = BlockHash::chain(parent_hash, tokens);
        let uid = match self.cache.get(&hash) {
            Some(e) if e.parent_uid == parent_uid && *e.tokens == *tokens => e.uid,
            Some(_) => self.new_uid(), // a true hash collision: leave it uncached
            None if self.prefix_caching && self.is_findable(parent_hash, parent_uid) => {
                let uid = self.new_uid();
                let entry = CacheEntry {
                    block,
                    uid,
                    parent_uid,
                    tokens: tokens.into(),
                };
                self.cache.insert(hash, entry);
                self.note(KvEvent::Stored(hash));
                self.blocks[block as usize].cached = true;
                uid
            }
            None => self.new_uid(),
        };
        self.blocks[block as usize].content = Some(Content { hash, uid });
        Ok(hash)
    }

    fn new_uid(&mut self) -> u64 {
        let uid = self.next_uid;
        self.next_uid += 1;
        uid
    }

    /// Whether a block with this hash and uid can be reached by a lookup.
    fn is_findable(&self, hash: Option<BlockHash>, uid: u64) -> bool {
        match hash {
            None => uid == ROOT_UID,
            Some(h) => self.cache.get(&h).is_some_and(|e| e.uid == uid),
        }
    }

    /// Adds one reference to each block (a block listed twice gets two), for
    /// owners that share blocks they already hold, such as `n` samples of one
    /// prompt. Every block must already be referenced.
    pub fn share(&mut self, blocks: &[BlockId]) -> Result<(), KvPoolError> {
        for (block, times) in runs(blocks) {
            let b = self.check_referenced(block)?;
            if b.refs.checked_add(times).is_none() {
                return Err(KvPoolError::TooManyReferences(block));
            }
        }
        for &block in blocks {
            self.blocks[block as usize].refs += 1;
        }
        Ok(())
    }

    /// Drops one reference to each block of a block table given in sequence
    /// order. Blocks reaching zero become free, tail first: cached ones join
    /// the eviction queue with the table's last block ahead of its first.
    pub fn release(&mut self, blocks: &[BlockId]) -> Result<(), KvPoolError> {
        for (block, times) in runs(blocks) {
            if self.check_referenced(block)?.refs < times {
                return Err(KvPoolError::NotReferenced(block));
            }
        }
        for &block in blocks.iter().rev() {
            let b = &mut self.blocks[block as usize];
            b.refs -= 1;
            if b.refs > 0 {
                continue;
            }
            if b.cached {
                let tick = self.next_tick;
                self.next_tick += 1;
                b.free_tick = Some(tick);
                self.evictable.insert(tick, block);
            } else {
                b.content = None;
                self.fresh.push(block);
            }
        }
        Ok(())
    }

    /// Forgets every cached block (for instance after new weights are loaded).
    /// Referenced blocks stay with their owners; free ones lose their data.
    /// Returns how many blocks the cache held.
    pub fn reset_prefix_cache(&mut self) -> usize {
        let dropped = self.cache.len();
        for entry in self.cache.values() {
            self.blocks[entry.block as usize].cached = false;
        }
        self.cache.clear();
        self.note(KvEvent::Cleared);
        while let Some((_, block)) = self.evictable.pop_first() {
            let b = &mut self.blocks[block as usize];
            b.free_tick = None;
            b.content = None;
            self.fresh.push(block);
        }
        dropped
    }
}

/// `(block, times listed)` for each distinct block in `blocks`.
fn runs(blocks: &[BlockId]) -> Vec<(BlockId, u32)> {
    let mut sorted = blocks.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<(BlockId, u32)> = Vec::with_capacity(sorted.len());
    for id in sorted {
        match out.last_mut() {
            Some((last, n)) if *last == id => *n = n.saturating_add(1),
            _ => out.push((id, 1)),
        }
    }
    out
}

mod audit;
pub mod events;
#[cfg(test)]
mod tests;
