//! One step's metadata, packed for a single host-to-device copy.
//!
//! Every array sits at a word offset fixed by the engine's [`StepLimits`],
//! never by the batch, so a CUDA graph captured once keeps pointing at the
//! right places when later steps write new contents. The per-row and
//! per-sequence arrays and the prefill tiles come first and the block
//! tables last, so the upload is one copy of a prefix of the buffer.
//!
//! A decode batch that fits a graph bucket is padded to the bucket's size
//! with rows that write their (ignored) keys and values into a padding KV
//! block the scheduler never hands out, and read one position of it.

use super::plan::{SeqRows, StepLimits, buckets_for, graph_bucket, prefill_tiles};
use crate::backend::BatchLayout;
use crate::error::{EngineError, Result};

/// Word offsets of each array in the metadata buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaOffsets {
    /// Token id per row.
    pub token_ids: usize,
    /// Position per row.
    pub positions: usize,
    /// KV slot per row.
    pub slots: usize,
    /// Rows whose logits are computed.
    pub logits_rows: usize,
    /// Context length per sequence.
    pub context_lens: usize,
    /// Prefill tiles: sequence, first row, rows, first position (four
    /// arrays of `max_tiles`).
    pub tiles: usize,
    /// Block table per sequence, `max_blocks_per_seq` words each.
    pub block_tables: usize,
    /// Words in all.
    pub total: usize,
}

impl MetaOffsets {
    /// The layout for `limits`.
    pub fn new(limits: &StepLimits) -> Self {
        let (rows, seqs, tiles) = (
            limits.padded_rows(),
            limits.padded_seqs(),
            limits.max_tiles(),
        );
        let block_tables = 4 * rows + seqs + 4 * tiles;
        Self {
            token_ids: 0,
            positions: rows,
            slots: 2 * rows,
            logits_rows: 3 * rows,
            context_lens: 4 * rows,
            tiles: 4 * rows + seqs,
            block_tables,
            total: block_tables + seqs * limits.max_blocks_per_seq(),
        }
    }

    /// Offset of tile array `i` (0 sequence, 1 row, 2 length, 3 position).
    pub fn tile_array(&self, i: usize, limits: &StepLimits) -> usize {
        self.tiles + i * limits.max_tiles()
    }
}

/// What a packed step holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepShape {
    /// Rows computed (padded to the bucket in graph mode).
    pub rows: usize,
    /// Rows of real tokens.
    pub real_rows: usize,
    /// Sequences (padded in graph mode).
    pub seqs: usize,
    /// Logits rows computed.
    pub logits: usize,
    /// Logits rows the caller asked for (the first `real_logits`).
    pub real_logits: usize,
    /// Prefill tiles (0 in decode mode).
    pub tiles: usize,
    /// Every sequence decodes one token: the split-K decode kernel runs.
    pub decode: bool,
    /// The CUDA graph bucket, for a decode step that fits one.
    pub bucket: Option<usize>,
    /// Words to upload (a prefix of the buffer).
    pub upload_words: usize,
}

/// Whether `layout` is a pure decode step: every sequence computes one
/// row and asks for that row's logits, in order.
fn is_decode(layout: &BatchLayout) -> bool {
    !layout.seqs.is_empty()
        && layout.logits_rows.len() == layout.seqs.len()
        && layout
            .seqs
            .iter()
            .zip(&layout.logits_rows)
            .all(|(s, &r)| s.query_len == 1 && s.query_start == r as usize)
}

/// Packs `layout` into `words` (at least `MetaOffsets::new(limits).total`
/// long). `pad_block` is the KV block padding rows use; `graphs` allows
/// padding decode steps to a bucket.
pub fn pack(
    layout: &BatchLayout,
    limits: &StepLimits,
    pad_block: u32,
    graphs: bool,
    words: &mut [u32],
) -> Result<StepShape> {
    let off = MetaOffsets::new(limits);
    let bad = |m: String| Err(EngineError::Backend(format!("step metadata: {m}")));
    if words.len() < off.total {
        return bad(format!("buffer of {} words < {}", words.len(), off.total));
    }
    let real_rows = layout.num_rows();
    let mb = limits.max_blocks_per_seq();
    if real_rows > limits.padded_rows() || layout.seqs.len() > limits.padded_seqs() {
        return bad(format!(
            "{real_rows} rows / {} sequences exceed the engine's limits",
            layout.seqs.len()
        ));
    }
    if layout.positions.len() != real_rows || layout.slot_mapping.len() != real_rows {
        return bad("positions or slots do not match the rows".into());
    }
    let decode = is_decode(layout);
    let largest = buckets_for(limits.max_seqs).last().copied().unwrap_or(1);
    let bucket = if decode && graphs {
        graph_bucket(layout.seqs.len(), largest)
    } else {
        None
    };
    let rows = bucket.unwrap_or(real_rows);
    let seqs = bucket.unwrap_or(layout.seqs.len());
    let pad_slot = pad_block * limits.block_size as u32;
    for r in 0..rows {
        let real = r < real_rows;
        words[off.token_ids + r] = if real { layout.token_ids[r] } else { 0 };
        words[off.positions + r] = if real { layout.positions[r] } else { 0 };
        words[off.slots + r] = if real {
            layout.slot_mapping[r]
        } else {
            pad_slot
        };
    }
    let logits = if bucket.is_some() {
        rows
    } else {
        layout.logits_rows.len()
    };
    for i in 0..logits {
        words[off.logits_rows + i] = layout.logits_rows.get(i).copied().unwrap_or(i as u32);
    }
    for s in 0..seqs {
        let table_at = off.block_tables + s * mb;
        match layout.seqs.get(s) {
            Some(seq) => {
                if seq.block_table.len() > mb || seq.context_len > limits.max_context {
                    return bad(format!(
                        "sequence {s}: context {} over {} blocks exceeds {} positions",
                        seq.context_len,
                        seq.block_table.len(),
                        limits.max_context
                    ));
                }
                if seq.block_table.len() * limits.block_size < seq.context_len {
                    return bad(format!("sequence {s} has too few blocks"));
                }
                words[off.context_lens + s] = seq.context_len as u32;
                let table = &mut words[table_at..][..mb];
                table[..seq.block_table.len()].copy_from_slice(&seq.block_table);
                table[seq.block_table.len()..].fill(pad_block);
            }
            None => {
                words[off.context_lens + s] = 1;
                words[table_at..][..mb].fill(pad_block);
            }
        }
    }
    let tiles = if decode {
        0
    } else {
        let rows_of: Vec<SeqRows> = layout
            .seqs
            .iter()
            .map(|s| SeqRows {
                row: s.query_start,
                len: s.query_len,
                pos: s.context_len - s.query_len,
            })
            .collect();
        let tiles = prefill_tiles(&rows_of);
        if tiles.len() > limits.max_tiles() {
            return bad(format!("{} tiles > {}", tiles.len(), limits.max_tiles()));
        }
        for (i, t) in tiles.iter().enumerate() {
            words[off.tile_array(0, limits) + i] = t.seq;
            words[off.tile_array(1, limits) + i] = t.row;
            words[off.tile_array(2, limits) + i] = t.len;
            words[off.tile_array(3, limits) + i] = t.pos;
        }
        tiles.len()
    };
    Ok(StepShape {
        rows,
        real_rows,
        seqs,
        logits,
        real_logits: layout.logits_rows.len(),
        tiles,
        decode,
        bucket,
        upload_words: off.block_tables + seqs * mb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> StepLimits {
        StepLimits {
            max_rows: 64,
            max_seqs: 6,
            max_context: 64,
            block_size: 4,
        }
    }

    #[test]
    fn offsets_do_not_overlap_and_block_tables_come_last() {
        let l = limits();
        let o = MetaOffsets::new(&l);
        assert_eq!(l.padded_seqs(), 8, "the bucket that holds 6");
        let ends = [
            (o.token_ids, l.padded_rows()),
            (o.positions, l.padded_rows()),
            (o.slots, l.padded_rows()),
            (o.logits_rows, l.padded_rows()),
            (o.context_lens, l.padded_seqs()),
            (o.tiles, 4 * l.max_tiles()),
            (o.block_tables, l.padded_seqs() * l.max_blocks_per_seq()),
        ];
        for w in ends.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0);
        }
        assert_eq!(o.block_tables + l.padded_seqs() * 16, o.total);
        assert_eq!(o.total, l.metadata_words());
    }

    #[test]
    fn decode_steps_pad_to_their_bucket() {
        let l = limits();
        let mut layout = BatchLayout::default();
        layout.push_seq(&[7], 5, &[3, 9], 4, true);
        layout.push_seq(&[8], 0, &[2], 4, true);
        layout.push_seq(&[9], 12, &[1, 4, 5, 6], 4, true);
        let mut words = vec![u32::MAX; MetaOffsets::new(&l).total];
        let shape = pack(&layout, &l, 99, true, &mut words).unwrap();
        assert!(shape.decode);
        assert_eq!(shape.bucket, Some(4));
        assert_eq!((shape.rows, shape.seqs, shape.logits), (4, 4, 4));
        assert_eq!((shape.real_rows, shape.real_logits), (3, 3));
        let o = MetaOffsets::new(&l);
        assert_eq!(&words[o.token_ids..o.token_ids + 4], &[7, 8, 9, 0]);
        assert_eq!(&words[o.positions..o.positions + 4], &[5, 0, 12, 0]);
        assert_eq!(
            &words[o.slots..o.slots + 4],
            &[9 * 4 + 1, 2 * 4, 6 * 4, 99 * 4]
        );
        assert_eq!(&words[o.logits_rows..o.logits_rows + 4], &[0, 1, 2, 3]);
        assert_eq!(&words[o.context_lens..o.context_lens + 4], &[6, 1, 13, 1]);
        let mb = l.max_blocks_per_seq();
        assert_eq!(&words[o.block_tables..o.block_tables + 3], &[3, 9, 99]);
        assert!(
            words[o.block_tables + 3 * mb..][..mb]
                .iter()
                .all(|&b| b == 99)
        );
        assert_eq!(shape.upload_words, o.block_tables + 4 * mb);
        // Without graphs the same step is not padded.
        let plain = pack(&layout, &l, 99, false, &mut words).unwrap();
        assert_eq!((plain.rows, plain.bucket, plain.decode), (3, None, true));
    }

    #[test]
    fn prefill_steps_are_tiled() {
        let l = limits();
        let mut layout = BatchLayout::default();
        let prompt: Vec<u32> = (0..20).collect();
        layout.push_seq(&prompt, 0, &[0, 1, 2, 3, 4], 4, true);
        layout.push_seq(&[5], 7, &[6, 7], 4, true);
        let mut words = vec![0; MetaOffsets::new(&l).total];
        let shape = pack(&layout, &l, 99, true, &mut words).unwrap();
        assert!(!shape.decode);
        assert_eq!(shape.bucket, None);
        assert_eq!(
            (shape.rows, shape.seqs, shape.logits, shape.tiles),
            (21, 2, 2, 2)
        );
        let o = MetaOffsets::new(&l);
        let t = |i| &words[o.tile_array(i, &l)..][..2];
        assert_eq!(t(0), &[0, 1]);
        assert_eq!(t(1), &[0, 20]);
        assert_eq!(t(2), &[20, 1]);
        assert_eq!(t(3), &[0, 7]);
        assert_eq!(&words[o.logits_rows..o.logits_rows + 2], &[19, 20]);
    }

    #[test]
    fn bad_layouts_are_errors() {
        let l = limits();
        let mut words = vec![0; MetaOffsets::new(&l).total];
        let mut layout = BatchLayout::default();
        layout.push_seq(&[1], 70, &[0; 18], 4, true);
        assert!(
            pack(&layout, &l, 99, true, &mut words).is_err(),
            "context too long"
        );
        let mut layout = BatchLayout::default();
        layout.push_seq(&[1, 2], 0, &[0], 4, true);
        layout.seqs[0].context_len = 9;
        assert!(
            pack(&layout, &l, 99, true, &mut words).is_err(),
            "too few blocks"
        );
        let mut short = vec![0; 3];
        let mut layout = BatchLayout::default();
        layout.push_seq(&[1], 0, &[0], 4, true);
        assert!(pack(&layout, &l, 99, true, &mut short).is_err());
    }
}
