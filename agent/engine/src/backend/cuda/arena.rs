//! The activation workspace's allocator: offsets into one device buffer
//! allocated at start, so that no engine step calls the CUDA allocator.
//!
//! Guarantees:
//! * deterministic: the same sequence of allocations and frees returns the
//!   same offsets, which is what lets a captured CUDA graph be replayed (a
//!   step of the same shape lays its tensors out at the same addresses);
//! * first fit over free ranges kept sorted by offset, neighbours merged on
//!   free, every range aligned to [`ARENA_ALIGN`](super::plan::ARENA_ALIGN);
//! * exhaustion is an error naming the sizes, never a panic.

use std::collections::BTreeMap;

use super::plan::ARENA_ALIGN;
use crate::error::{EngineError, Result};

/// Free-range bookkeeping over `size` bytes.
#[derive(Debug, Clone)]
pub struct Arena {
    size: usize,
    /// Free ranges: offset → length.
    free: BTreeMap<usize, usize>,
    in_use: usize,
    peak: usize,
}

fn aligned(bytes: usize) -> usize {
    bytes.max(1).div_ceil(ARENA_ALIGN) * ARENA_ALIGN
}

impl Arena {
    /// An empty arena of `size` bytes (rounded down to the alignment).
    pub fn new(size: usize) -> Self {
        let size = size / ARENA_ALIGN * ARENA_ALIGN;
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(0, size);
        }
        Self {
            size,
            free,
            in_use: 0,
            peak: 0,
        }
    }

    /// Reserves `bytes`; returns the offset and the length reserved.
    pub fn alloc(&mut self, bytes: usize) -> Result<(usize, usize)> {
        let len = aligned(bytes);
        let Some((&off, &room)) = self.free.iter().find(|&(_, &room)| room >= len) else {
            return Err(EngineError::Backend(format!(
                "the activation workspace is exhausted: {bytes} bytes asked, {} of {} in use",
                self.in_use, self.size
            )));
        };
        self.free.remove(&off);
        if room > len {
            self.free.insert(off + len, room - len);
        }
        self.in_use += len;
        self.peak = self.peak.max(self.in_use);
        Ok((off, len))
    }

    /// Returns a range from [`alloc`](Self::alloc).
    pub fn release(&mut self, off: usize, len: usize) {
        let (mut start, mut len_total) = (off, len);
        if let Some((&prev, &plen)) = self.free.range(..off).next_back()
            && prev + plen == off
        {
            self.free.remove(&prev);
            start = prev;
            len_total += plen;
        }
        if let Some(&next_len) = self.free.get(&(off + len)) {
            self.free.remove(&(off + len));
            len_total += next_len;
        }
        self.free.insert(start, len_total);
        self.in_use = self.in_use.saturating_sub(len);
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Most bytes ever reserved at once.
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// Size of the arena.
    pub fn size(&self) -> usize {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_sequence_same_offsets() {
        let run = |arena: &mut Arena| {
            let a = arena.alloc(1000).unwrap();
            let b = arena.alloc(10).unwrap();
            arena.release(a.0, a.1);
            let c = arena.alloc(300).unwrap();
            let d = arena.alloc(5000).unwrap();
            arena.release(b.0, b.1);
            arena.release(c.0, c.1);
            arena.release(d.0, d.1);
            [a.0, b.0, c.0, d.0]
        };
        let mut arena = Arena::new(1 << 20);
        let first = run(&mut arena);
        assert_eq!(arena.in_use(), 0);
        assert_eq!(run(&mut arena), first, "replays lay out identically");
        assert_eq!(first, [0, 1024, 0, 1280]);
        assert!(first.iter().all(|o| o % ARENA_ALIGN == 0));
    }

    #[test]
    fn frees_merge_and_exhaustion_is_an_error() {
        let mut arena = Arena::new(4 * ARENA_ALIGN);
        let blocks: Vec<_> = (0..4).map(|_| arena.alloc(ARENA_ALIGN).unwrap()).collect();
        assert!(arena.alloc(1).is_err());
        // Free out of order; the whole arena merges back into one range.
        for i in [1, 3, 0, 2] {
            arena.release(blocks[i].0, blocks[i].1);
        }
        assert_eq!(arena.alloc(4 * ARENA_ALIGN).unwrap(), (0, 4 * ARENA_ALIGN));
        assert_eq!(arena.peak(), 4 * ARENA_ALIGN);
        let e = arena.alloc(1).unwrap_err().to_string();
        assert!(e.contains("exhausted"), "{e}");
    }
}
