//! Self-check of the pool's bookkeeping, for tests and debugging.

use super::{KvBlockPool, KvPoolError};

impl KvBlockPool {
    /// Checks the internal bookkeeping (O(`num_blocks`)); for tests and debugging.
    pub fn audit(&self) -> Result<(), KvPoolError> {
        let bad = |msg: String| Err(KvPoolError::Inconsistent(msg));
        let mut free_seen = vec![false; self.blocks.len()];
        for &id in &self.fresh {
            let b = self.blocks.get(id as usize);
            let ok = b.is_some_and(|b| {
                b.refs == 0 && !b.cached && b.content.is_none() && b.free_tick.is_none()
            });
            if !ok || std::mem::replace(&mut free_seen[id as usize], true) {
                return bad(format!(
                    "fresh block {id} is referenced, cached or listed twice"
                ));
            }
        }
        for (&tick, &id) in &self.evictable {
            let b = self.blocks.get(id as usize);
            let ok = b.is_some_and(|b| b.refs == 0 && b.cached && b.free_tick == Some(tick));
            if !ok || std::mem::replace(&mut free_seen[id as usize], true) {
                return bad(format!(
                    "evictable block {id} is referenced, uncached or listed twice"
                ));
            }
        }
        for (id, b) in self.blocks.iter().enumerate() {
            if (b.refs == 0) != free_seen[id] {
                return bad(format!(
                    "block {id} has {} refs but free={}",
                    b.refs, free_seen[id]
                ));
            }
        }
        for (hash, e) in &self.cache {
            let b = self.blocks.get(e.block as usize);
            let ok = b.is_some_and(|b| {
                b.cached && b.content.is_some_and(|c| c.hash == *hash && c.uid == e.uid)
            });
            if !ok || e.tokens.len() != self.block_size {
                return bad(format!(
                    "cache entry for block {} does not match it",
                    e.block
                ));
            }
        }
        let flagged = self.blocks.iter().filter(|b| b.cached).count();
        if flagged != self.cache.len() {
            return bad(format!(
                "{flagged} blocks flagged cached, index holds {}",
                self.cache.len()
            ));
        }
        Ok(())
    }
}
