//! What a KV pool holds, published for routers: the pool's cache additions
//! and evictions as [`KvEvent`]s, folded into a bounded [`KvSummary`] that
//! answers "what changed since sequence number N" with a delta, or with a
//! full snapshot when N is too old (or from another process lifetime).
//!
//! # Guarantees
//!
//! - A summary holds at most its cap of hashes: the most recently stored
//!   ones. When a store pushes it over the cap, the oldest hash is dropped
//!   and published as removed, so a reader's copy never exceeds the cap
//!   either. Dropping only makes a router underestimate a cache hit.
//! - Every change gets the next sequence number; the log of changes keeps
//!   the latest [`LOG_CAP`] of them. A reader that asks from a number still
//!   in the log gets exactly the changes after it; anything older (or a
//!   different epoch) gets a snapshot, after which deltas resume.
//! - Bounded memory: cap hashes plus [`LOG_CAP`] log entries.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::BlockHash;

/// A change to the set of blocks a pool's prefix cache can find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvEvent {
    /// A full block became findable.
    Stored(BlockHash),
    /// A block stopped being findable (evicted).
    Removed(BlockHash),
    /// Every cached block was forgotten.
    Cleared,
}

/// Changes kept for readers asking for deltas.
pub const LOG_CAP: usize = 8192;
/// Hashes a summary keeps by default.
pub const DEFAULT_HASH_CAP: usize = 16_384;

/// What a reader gets from [`KvSummary::since`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvChanges {
    /// Every hash held now; replaces the reader's copy.
    Snapshot(Vec<BlockHash>),
    /// Hashes added and removed since the reader's sequence number (net:
    /// a hash stored then evicted in the window is only in `removed`).
    Delta {
        /// Now findable.
        added: Vec<BlockHash>,
        /// No longer findable.
        removed: Vec<BlockHash>,
    },
}

/// A bounded, shareable view of one pool's cached block hashes.
#[derive(Debug)]
pub struct KvSummary {
    epoch: u64,
    cap: usize,
    block_size: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    seq: u64,
    /// Hash → sequence number at which it was (last) stored.
    held: HashMap<BlockHash, u64>,
    /// The same, by sequence number: oldest first, for the cap.
    by_seq: BTreeMap<u64, BlockHash>,
    /// (sequence number, change); `None` marks a clear.
    log: VecDeque<(u64, Option<(BlockHash, bool)>)>,
}

impl Default for KvSummary {
    fn default() -> Self {
        Self::new(DEFAULT_HASH_CAP)
    }
}

impl KvSummary {
    /// An empty summary keeping at most `cap` hashes (at least one). Its
    /// epoch is taken from the clock, so a restarted process has another.
    pub fn new(cap: usize) -> Self {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self {
            epoch,
            cap: cap.max(1),
            block_size: AtomicU64::new(0),
            state: Mutex::default(),
        }
    }

    /// Identifies this summary's lifetime: sequence numbers of another
    /// epoch mean nothing here.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Tokens per block of the pool it describes (0 until set).
    pub fn block_size(&self) -> usize {
        self.block_size.load(Ordering::Relaxed) as usize
    }

    /// Records the pool's block size.
    pub fn set_block_size(&self, block_size: usize) {
        self.block_size.store(block_size as u64, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Folds a pool's events in, in order.
    pub fn apply(&self, events: impl IntoIterator<Item = KvEvent>) {
        let mut s = self.lock();
        for event in events {
            match event {
                KvEvent::Stored(h) => {
                    s.seq += 1;
                    let seq = s.seq;
                    if let Some(old) = s.held.insert(h, seq) {
                        s.by_seq.remove(&old);
                    }
                    s.by_seq.insert(seq, h);
                    s.push(seq, Some((h, true)));
                    if s.held.len() > self.cap
                        && let Some((_, oldest)) = s.by_seq.pop_first()
                    {
                        s.held.remove(&oldest);
                        s.seq += 1;
                        let seq = s.seq;
                        s.push(seq, Some((oldest, false)));
                    }
                }
                KvEvent::Removed(h) => {
                    if let Some(old) = s.held.remove(&h) {
                        s.by_seq.remove(&old);
                        s.seq += 1;
                        let seq = s.seq;
                        s.push(seq, Some((h, false)));
                    }
                }
                KvEvent::Cleared => {
                    s.held.clear();
                    s.by_seq.clear();
                    s.seq += 1;
                    let seq = s.seq;
                    s.push(seq, None);
                }
            }
        }
    }

    /// The latest sequence number and the changes a reader at `since` (of
    /// `epoch`) needs: a delta when its number is still in the log, else a
    /// snapshot.
    pub fn since(&self, epoch: u64, since: Option<u64>) -> (u64, KvChanges) {
        let s = self.lock();
        let oldest_known = s.log.front().map_or(s.seq, |(seq, _)| seq - 1);
        let delta_ok = epoch == self.epoch
            && since.is_some_and(|n| n >= oldest_known && n <= s.seq)
            && !s
                .log
                .iter()
                .any(|(seq, c)| Some(*seq) > since && c.is_none());
        if !delta_ok {
            let hashes = s.by_seq.values().copied().collect();
            return (s.seq, KvChanges::Snapshot(hashes));
        }
        let since = since.unwrap_or(0);
        let mut last: HashMap<BlockHash, bool> = HashMap::new();
        for (_, change) in s.log.iter().filter(|(seq, _)| *seq > since) {
            if let Some((h, stored)) = change {
                last.insert(*h, *stored);
            }
        }
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for (h, stored) in last {
            if stored {
                added.push(h)
            } else {
                removed.push(h)
            }
        }
        added.sort_unstable();
        removed.sort_unstable();
        (s.seq, KvChanges::Delta { added, removed })
    }

    /// How many of `hashes`, from the first, are held (a prompt's cached
    /// prefix, in blocks).
    pub fn leading_held(&self, hashes: &[BlockHash]) -> usize {
        let s = self.lock();
        hashes.iter().take_while(|h| s.held.contains_key(h)).count()
    }

    /// Hashes held now.
    pub fn len(&self) -> usize {
        self.lock().held.len()
    }

    /// Whether no hash is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl State {
    fn push(&mut self, seq: u64, change: Option<(BlockHash, bool)>) {
        if self.log.len() == LOG_CAP {
            self.log.pop_front();
        }
        self.log.push_back((seq, change));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u64) -> BlockHash {
        BlockHash(n)
    }

    /// Applies `changes` to a reader's copy.
    fn follow(copy: &mut Vec<BlockHash>, changes: KvChanges) {
        match changes {
            KvChanges::Snapshot(all) => *copy = all,
            KvChanges::Delta { added, removed } => {
                copy.retain(|x| !removed.contains(x));
                for a in added {
                    if !copy.contains(&a) {
                        copy.push(a);
                    }
                }
            }
        }
        copy.sort_unstable();
    }

    #[test]
    fn deltas_follow_stores_and_evictions_and_old_readers_get_snapshots() {
        let s = KvSummary::new(100);
        s.apply([KvEvent::Stored(h(1)), KvEvent::Stored(h(2))]);
        let (seq, first) = s.since(s.epoch(), None);
        assert_eq!(first, KvChanges::Snapshot(vec![h(1), h(2)]));
        s.apply([
            KvEvent::Removed(h(1)),
            KvEvent::Stored(h(3)),
            KvEvent::Stored(h(4)),
            KvEvent::Removed(h(4)),
        ]);
        let (next, delta) = s.since(s.epoch(), Some(seq));
        assert_eq!(
            delta,
            KvChanges::Delta {
                added: vec![h(3)],
                removed: vec![h(1), h(4)]
            }
        );
        // Nothing new: an empty delta.
        let (_, none) = s.since(s.epoch(), Some(next));
        assert_eq!(
            none,
            KvChanges::Delta {
                added: vec![],
                removed: vec![]
            }
        );
        // Another epoch, a future number, or a clear in the window: snapshot.
        assert!(matches!(
            s.since(s.epoch() + 1, Some(seq)).1,
            KvChanges::Snapshot(_)
        ));
        assert!(matches!(
            s.since(s.epoch(), Some(next + 5)).1,
            KvChanges::Snapshot(_)
        ));
        s.apply([KvEvent::Cleared, KvEvent::Stored(h(9))]);
        assert_eq!(
            s.since(s.epoch(), Some(next)).1,
            KvChanges::Snapshot(vec![h(9)])
        );
    }

    #[test]
    fn the_cap_keeps_the_most_recent_hashes_and_tells_readers_what_it_dropped() {
        let s = KvSummary::new(3);
        let mut copy = Vec::new();
        let (mut seq, c) = s.since(s.epoch(), None);
        follow(&mut copy, c);
        for i in 0..10 {
            s.apply([KvEvent::Stored(h(i))]);
            let (n, c) = s.since(s.epoch(), Some(seq));
            seq = n;
            follow(&mut copy, c);
            assert!(copy.len() <= 3);
        }
        assert_eq!(copy, vec![h(7), h(8), h(9)]);
        assert_eq!(s.len(), 3);
        // Storing a held hash again makes it the most recent.
        s.apply([KvEvent::Stored(h(7)), KvEvent::Stored(h(10))]);
        let (_, c) = s.since(s.epoch(), Some(seq));
        follow(&mut copy, c);
        assert_eq!(copy, vec![h(7), h(9), h(10)]);
        assert_eq!(s.leading_held(&[h(7), h(9), h(1), h(10)]), 2);
    }

    #[test]
    fn a_reader_that_fell_out_of_the_log_recovers_from_a_snapshot() {
        let s = KvSummary::new(LOG_CAP * 2);
        s.apply([KvEvent::Stored(h(0))]);
        let (seq, _) = s.since(s.epoch(), None);
        s.apply((1..=LOG_CAP as u64).map(|i| KvEvent::Stored(h(i))));
        // The log still reaches back to `seq`: a delta.
        assert!(matches!(
            s.since(s.epoch(), Some(seq)).1,
            KvChanges::Delta { .. }
        ));
        s.apply([KvEvent::Stored(h(u64::MAX))]);
        let (_, c) = s.since(s.epoch(), Some(seq));
        let KvChanges::Snapshot(all) = c else {
            panic!("expected a snapshot after the log moved on");
        };
        assert_eq!(all.len(), LOG_CAP + 2);
    }
}
