//! Host-side planning for the CUDA backend, with no device and no `unsafe`:
//! how many KV blocks fit, how big the activation workspace is, which CUDA
//! graph bucket a decode batch uses, the launch geometry of every kernel and
//! how prefill rows are cut into attention tiles. Everything here is pure
//! and unit-tested in CI, where there is no GPU.

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};

/// Batch sizes decode steps are captured at; a decode batch runs in the
/// graph of the smallest bucket that holds it (padded with dummy rows).
pub const GRAPH_BUCKETS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/// Rows of one prefill attention tile (the kernel's `tile_len` bound).
pub const PREFILL_TILE_ROWS: usize = 64;

/// Threads of the row-wise kernels (norms, embedding, gathers).
pub const ROW_THREADS: u32 = 256;
/// Threads of the grid-stride element-wise kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;
/// Most blocks of a grid-stride element-wise launch.
pub const ELEMENTWISE_MAX_BLOCKS: u64 = 4096;
/// Threads of the RoPE and KV-write kernels.
pub const SMALL_ROW_THREADS: u32 = 128;
/// Threads of the attention kernels.
pub const ATTENTION_THREADS: u32 = 128;
/// Threads of the sampling kernel (one block per row).
pub const SAMPLING_THREADS: u32 = 1024;
/// Largest GQA group (query heads per KV head) the attention kernels take.
pub const MAX_GQA_GROUP: usize = 16;
/// Widest head the attention kernels take.
pub const MAX_HEAD_DIM: usize = 256;
/// Context positions one decode attention block covers before the
/// partitions are reduced (split-K over the context).
pub const DECODE_PARTITION: usize = 512;
/// cuBLAS workspace, set explicitly so that GEMMs allocate nothing while a
/// graph is captured.
pub const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;
/// Alignment of every workspace allocation (vector loads, cuBLAS).
pub const ARENA_ALIGN: usize = 256;

/// A kernel launch: grid and block dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
}

fn dim(n: usize) -> u32 {
    u32::try_from(n.max(1)).unwrap_or(u32::MAX)
}

impl Launch {
    /// One block of `threads` per row.
    pub fn per_row(rows: usize, threads: u32) -> Self {
        Self {
            grid: (dim(rows), 1, 1),
            block: (threads, 1, 1),
        }
    }

    /// A grid-stride launch over `n` elements.
    pub fn elementwise(n: usize) -> Self {
        let blocks = (n as u64)
            .div_ceil(u64::from(ELEMENTWISE_THREADS))
            .clamp(1, ELEMENTWISE_MAX_BLOCKS);
        Self {
            grid: (blocks as u32, 1, 1),
            block: (ELEMENTWISE_THREADS, 1, 1),
        }
    }

    /// Decode attention partials: one block per (KV head, sequence,
    /// context partition).
    pub fn decode_partial(num_kv_heads: usize, num_seqs: usize, max_parts: usize) -> Self {
        Self {
            grid: (dim(num_kv_heads), dim(num_seqs), dim(max_parts)),
            block: (ATTENTION_THREADS, 1, 1),
        }
    }

    /// Decode attention reduction: one block per (query head, sequence).
    pub fn decode_reduce(num_heads: usize, num_seqs: usize) -> Self {
        Self {
            grid: (dim(num_heads), dim(num_seqs), 1),
            block: (ATTENTION_THREADS, 1, 1),
        }
    }

    /// Prefill attention: one block per (tile, KV head).
    pub fn prefill(num_tiles: usize, num_kv_heads: usize) -> Self {
        Self {
            grid: (dim(num_tiles), dim(num_kv_heads), 1),
            block: (ATTENTION_THREADS, 1, 1),
        }
    }
}

/// Context partitions a decode step over contexts of up to `max_context`
/// positions needs. Fixed per engine (not per batch) so captured graphs
/// stay valid for every context length.
pub fn decode_parts(max_context: usize) -> usize {
    max_context.div_ceil(DECODE_PARTITION).max(1)
}

/// The graph bucket for a decode batch of `rows` sequences, if one is at
/// most `max_bucket`.
pub fn graph_bucket(rows: usize, max_bucket: usize) -> Option<usize> {
    GRAPH_BUCKETS
        .iter()
        .copied()
        .find(|&b| b >= rows && b <= max_bucket)
        .filter(|_| rows > 0)
}

/// The buckets captured for an engine that runs at most `max_num_seqs`
/// sequences per step: every bucket up to the first that holds them all.
pub fn buckets_for(max_num_seqs: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for b in GRAPH_BUCKETS {
        out.push(b);
        if b >= max_num_seqs {
            break;
        }
    }
    out
}

/// Rows of one sequence in a step, as the prefill tiler sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqRows {
    /// First batch row.
    pub row: usize,
    /// Rows this step.
    pub len: usize,
    /// Position of the first row.
    pub pos: usize,
}

/// One prefill attention tile: consecutive rows of one sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    /// Sequence index in the batch.
    pub seq: u32,
    /// First batch row.
    pub row: u32,
    /// Rows, `1..=PREFILL_TILE_ROWS`.
    pub len: u32,
    /// Position of the first row.
    pub pos: u32,
}

/// Cuts every sequence's rows into tiles of at most [`PREFILL_TILE_ROWS`].
pub fn prefill_tiles(seqs: &[SeqRows]) -> Vec<Tile> {
    let mut tiles = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        let mut done = 0;
        while done < seq.len {
            let len = (seq.len - done).min(PREFILL_TILE_ROWS);
            tiles.push(Tile {
                seq: s as u32,
                row: (seq.row + done) as u32,
                len: len as u32,
                pos: (seq.pos + done) as u32,
            });
            done += len;
        }
    }
    tiles
}

/// Checks that the attention kernels can run a model of this shape.
pub fn check_attention_shape(config: &ModelConfig) -> Result<()> {
    let group = config.num_heads / config.num_kv_heads.max(1);
    let hd = config.head_dim;
    let problem = if hd == 0 || !hd.is_multiple_of(8) || hd > MAX_HEAD_DIM {
        Some(format!(
            "head_dim {hd} is not a multiple of 8 up to {MAX_HEAD_DIM}"
        ))
    } else if group == 0
        || group > MAX_GQA_GROUP
        || !config.num_heads.is_multiple_of(config.num_kv_heads)
    {
        Some(format!(
            "{} query heads over {} KV heads (groups up to {MAX_GQA_GROUP})",
            config.num_heads, config.num_kv_heads
        ))
    } else {
        None
    };
    match problem {
        Some(p) => Err(EngineError::Backend(format!(
            "the CUDA attention kernels do not support this model: {p}"
        ))),
        None => Ok(()),
    }
}

/// Bytes one KV block takes over every layer (K and V, bf16).
pub fn kv_block_bytes(config: &ModelConfig, block_size: usize) -> usize {
    2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * 2
}

/// What the device memory must hold, for [`MemoryPlan::kv_blocks`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryPlan {
    /// Free device memory before the engine loaded anything.
    pub free_bytes: usize,
    /// Share of it the engine may take (`gpuMemoryUtilization`).
    pub utilization: f64,
    /// Weights, as loaded.
    pub weight_bytes: usize,
    /// Activation workspace, metadata and cuBLAS workspace.
    pub workspace_bytes: usize,
    /// Bytes of one KV block over every layer.
    pub block_bytes: usize,
    /// Blocks the engine needs at least (one full context plus the padding
    /// block).
    pub min_blocks: usize,
}

impl MemoryPlan {
    /// Memory kept back for what is not counted above (CUDA graphs, module
    /// images, allocator slack): 2 % of the budget, at least 256 MiB.
    pub fn reserve_bytes(&self) -> usize {
        let budget = self.budget_bytes();
        (budget / 50).max(256 << 20).min(budget)
    }

    /// `free × utilization`.
    pub fn budget_bytes(&self) -> usize {
        (self.free_bytes as f64 * self.utilization.clamp(0.0, 1.0)) as usize
    }

    /// KV blocks that fit in what the budget leaves after weights,
    /// workspace and the reserve; an error naming the shortfall when fewer
    /// than `min_blocks` do.
    pub fn kv_blocks(&self) -> Result<usize> {
        let used = self.weight_bytes + self.workspace_bytes + self.reserve_bytes();
        let left = self.budget_bytes().saturating_sub(used);
        let blocks = left / self.block_bytes.max(1);
        if blocks < self.min_blocks {
            let mib = |b: usize| b >> 20;
            return Err(EngineError::Backend(format!(
                "out of GPU memory: {} MiB free × gpuMemoryUtilization {} = {} MiB, \
                 weights take {} MiB and the workspace {} MiB, which leaves room for {blocks} \
                 KV blocks of {} KiB; at least {} are needed (one full context)",
                mib(self.free_bytes),
                self.utilization,
                mib(self.budget_bytes()),
                mib(self.weight_bytes),
                mib(self.workspace_bytes),
                self.block_bytes >> 10,
                self.min_blocks
            )));
        }
        Ok(blocks)
    }
}

/// Limits of one engine step, which size the workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepLimits {
    /// Most rows (tokens) in one step.
    pub max_rows: usize,
    /// Most sequences in one step.
    pub max_seqs: usize,
    /// Longest context.
    pub max_context: usize,
    /// Tokens per KV block.
    pub block_size: usize,
}

impl StepLimits {
    /// Block-table width: blocks of the longest context.
    pub fn max_blocks_per_seq(&self) -> usize {
        self.max_context.div_ceil(self.block_size.max(1))
    }

    /// Rows a step is laid out for: at least the largest graph bucket used.
    pub fn padded_rows(&self) -> usize {
        let bucket = buckets_for(self.max_seqs).last().copied().unwrap_or(1);
        self.max_rows.max(bucket)
    }

    /// Sequences a step is laid out for.
    pub fn padded_seqs(&self) -> usize {
        let bucket = buckets_for(self.max_seqs).last().copied().unwrap_or(1);
        self.max_seqs.max(bucket)
    }

    /// Prefill tiles a step can have: one per sequence plus one per full
    /// tile of rows.
    pub fn max_tiles(&self) -> usize {
        self.padded_seqs() + self.padded_rows().div_ceil(PREFILL_TILE_ROWS)
    }

    /// Words (u32) of the per-step metadata buffer: token ids, positions,
    /// slots and logits rows per row; context length and block table per
    /// sequence; four words per tile.
    pub fn metadata_words(&self) -> usize {
        let (rows, seqs) = (self.padded_rows(), self.padded_seqs());
        4 * rows + seqs * (1 + self.max_blocks_per_seq()) + 4 * self.max_tiles()
    }
}

fn align(n: usize) -> usize {
    n.div_ceil(ARENA_ALIGN) * ARENA_ALIGN
}

/// Bytes of the activation workspace for one step of `config` under
/// `limits`: the most that is live at once during a forward pass (the f32
/// residual, a normed copy, q/k/v, the attention output and partials, the
/// MLP's gate, up and product, and the f32 logits), each rounded up to the
/// arena alignment, plus one alignment of slack per allocation. Sampling
/// outputs are included.
pub fn workspace_bytes(config: &ModelConfig, limits: &StepLimits) -> usize {
    let rows = limits.padded_rows();
    let seqs = limits.padded_seqs();
    let (h, inter, vocab) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let qd = config.num_heads * config.head_dim;
    let kvd = config.num_kv_heads * config.head_dim;
    let parts = decode_parts(limits.max_context);
    let partials = seqs * config.num_heads * parts;
    let sizes = [
        rows * h * 4,                   // residual (f32)
        rows * h * 2,                   // normed
        rows * qd * 2,                  // q
        rows * kvd * 2,                 // k
        rows * kvd * 2,                 // v
        partials * config.head_dim * 4, // decode partial sums
        partials * 4,                   // partial maxima
        partials * 4,                   // partial sums
        rows * qd * 2,                  // attention output
        rows * h * 2,                   // o projection / mlp out
        rows * inter * 2,               // gate
        rows * inter * 2,               // up
        rows * inter * 2,               // silu(gate) * up
        seqs * h * 4,                   // gathered last rows
        seqs * h * 2,                   // final norm
        seqs * vocab * 4,               // logits (f32)
        seqs * 8 + seqs * 48,           // sampled tokens, logprobs, params
    ];
    sizes.iter().map(|&s| align(s) + ARENA_ALIGN).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Architecture, RopeScaling};

    fn config(h: usize, heads: usize, kv: usize, layers: usize) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            hidden_size: h,
            intermediate_size: h * 4,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: h / heads,
            vocab_size: 128_256,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn buckets_cover_every_batch_up_to_the_largest() {
        assert_eq!(graph_bucket(0, 256), None);
        assert_eq!(graph_bucket(1, 256), Some(1));
        assert_eq!(graph_bucket(3, 256), Some(4));
        assert_eq!(graph_bucket(33, 256), Some(64));
        assert_eq!(graph_bucket(256, 256), Some(256));
        assert_eq!(graph_bucket(257, 256), None);
        assert_eq!(
            graph_bucket(20, 16),
            None,
            "above the largest captured bucket"
        );
        for rows in 1..=256 {
            let b = graph_bucket(rows, 256).unwrap();
            assert!(b >= rows && b < rows * 2, "{rows} -> {b}");
        }
        assert_eq!(buckets_for(1), vec![1]);
        assert_eq!(buckets_for(24), vec![1, 2, 4, 8, 16, 32]);
        assert_eq!(buckets_for(1000), GRAPH_BUCKETS.to_vec());
    }

    #[test]
    fn launch_geometry() {
        assert_eq!(Launch::per_row(7, ROW_THREADS).grid, (7, 1, 1));
        assert_eq!(Launch::per_row(0, ROW_THREADS).grid, (1, 1, 1));
        assert_eq!(Launch::elementwise(1).grid, (1, 1, 1));
        assert_eq!(Launch::elementwise(257).grid, (2, 1, 1));
        assert_eq!(
            Launch::elementwise(1 << 40).grid.0 as u64,
            ELEMENTWISE_MAX_BLOCKS
        );
        let d = Launch::decode_partial(8, 32, 16);
        assert_eq!(d.grid, (8, 32, 16));
        assert_eq!(d.block, (ATTENTION_THREADS, 1, 1));
        assert_eq!(Launch::decode_reduce(32, 4).grid, (32, 4, 1));
        assert_eq!(Launch::prefill(10, 8).grid, (10, 8, 1));
        assert_eq!(decode_parts(1), 1);
        assert_eq!(decode_parts(512), 1);
        assert_eq!(decode_parts(513), 2);
        assert_eq!(decode_parts(131_072), 256);
    }

    #[test]
    fn tiles_cover_each_row_once_within_its_sequence() {
        let seqs = [
            SeqRows {
                row: 0,
                len: 1,
                pos: 40,
            },
            SeqRows {
                row: 1,
                len: 130,
                pos: 0,
            },
            SeqRows {
                row: 131,
                len: 64,
                pos: 64,
            },
            SeqRows {
                row: 195,
                len: 0,
                pos: 3,
            },
        ];
        let tiles = prefill_tiles(&seqs);
        let mut seen = vec![0; 195];
        for t in &tiles {
            assert!((1..=PREFILL_TILE_ROWS as u32).contains(&t.len));
            let s = seqs[t.seq as usize];
            assert!(t.row as usize >= s.row && (t.row + t.len) as usize <= s.row + s.len);
            assert_eq!(t.pos as usize - s.pos, t.row as usize - s.row);
            for r in t.row..t.row + t.len {
                seen[r as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
        assert_eq!(tiles.len(), 1 + 3 + 1);
        let limits = StepLimits {
            max_rows: 195,
            max_seqs: 4,
            max_context: 4096,
            block_size: 16,
        };
        assert!(tiles.len() <= limits.max_tiles());
    }

    #[test]
    fn attention_shape_limits() {
        assert!(check_attention_shape(&config(2048, 32, 8, 16)).is_ok());
        assert!(check_attention_shape(&config(64, 4, 2, 2)).is_ok());
        let mut c = config(2048, 32, 8, 16);
        c.head_dim = 12;
        assert!(check_attention_shape(&c).is_err());
        c.head_dim = 512;
        assert!(check_attention_shape(&c).is_err());
        let c = config(4096, 64, 2, 2);
        let e = check_attention_shape(&c).unwrap_err().to_string();
        assert!(e.contains("64 query heads over 2 KV heads"), "{e}");
    }

    #[test]
    fn kv_blocks_fill_what_weights_and_workspace_leave() {
        let c = config(4096, 32, 8, 32);
        // Llama-3-8B: 2 × 32 layers × 16 tokens × 8 heads × 128 × 2 bytes.
        assert_eq!(kv_block_bytes(&c, 16), 2 << 20);
        let plan = MemoryPlan {
            free_bytes: 140 << 30,
            utilization: 0.9,
            weight_bytes: 16 << 30,
            workspace_bytes: 2 << 30,
            block_bytes: 2 << 20,
            min_blocks: 513,
        };
        let budget = plan.budget_bytes();
        let blocks = plan.kv_blocks().unwrap();
        let used = plan.weight_bytes + plan.workspace_bytes + plan.reserve_bytes();
        assert!(used + blocks * plan.block_bytes <= budget);
        assert!(used + (blocks + 1) * plan.block_bytes > budget);
        // Less utilization, fewer blocks; too little memory is an error
        // that says what took it.
        let half = MemoryPlan {
            utilization: 0.45,
            ..plan
        };
        assert!(half.kv_blocks().unwrap() < blocks);
        let small = MemoryPlan {
            free_bytes: 17 << 30,
            ..plan
        };
        let e = small.kv_blocks().unwrap_err().to_string();
        assert!(
            e.contains("out of GPU memory") && e.contains("weights take 16384 MiB"),
            "{e}"
        );
        let silly = MemoryPlan {
            utilization: 7.0,
            ..plan
        };
        assert_eq!(
            silly.budget_bytes(),
            plan.free_bytes,
            "utilization is clamped"
        );
    }

    #[test]
    fn workspace_grows_with_rows_and_holds_the_logits() {
        let c = config(2048, 32, 8, 16);
        let limits = StepLimits {
            max_rows: 2048,
            max_seqs: 128,
            max_context: 8192,
            block_size: 16,
        };
        let ws = workspace_bytes(&c, &limits);
        assert!(ws >= 128 * c.vocab_size * 4 + 2048 * c.hidden_size * 4);
        let more = StepLimits {
            max_rows: 4096,
            ..limits
        };
        assert!(workspace_bytes(&c, &more) > ws);
        // A decode-only engine is still laid out for its largest bucket.
        let tiny = StepLimits {
            max_rows: 1,
            max_seqs: 3,
            max_context: 64,
            block_size: 16,
        };
        assert_eq!(tiny.padded_rows(), 4);
        assert_eq!(tiny.padded_seqs(), 4);
        assert_eq!(tiny.max_blocks_per_seq(), 4);
        assert_eq!(tiny.metadata_words(), 4 * 4 + 4 * 5 + 4 * (4 + 1));
    }
}
