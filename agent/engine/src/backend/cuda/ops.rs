//! The `Backend` implementation: loading, and every operation as kernel
//! launches and GEMMs, and the step
//! driver that captures and replays decode steps as CUDA graphs. Shapes
//! and dtypes are checked here, before anything is launched.

use super::device::{Arg, Gemm};
use super::plan::{self, Launch};
use super::{
    CapturedStep, CudaBackend, CudaBatch, CudaKvCache, CudaRope, CudaTensor, CudaWeight, DType,
    host, meta,
};
use crate::backend::{
    AttentionShape, Backend, BatchLayout, KvCacheShape, RopeTable, SampleResults,
};
use crate::error::{EngineError, Result};
use crate::sampler::BatchRow;
use crate::weights::TensorView;

fn check(ok: bool, op: &str, detail: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(EngineError::Backend(format!("{op}: {}", detail())))
    }
}

fn int(n: usize) -> Arg {
    Arg::I32(i32::try_from(n).unwrap_or(i32::MAX))
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type KvCache = CudaKvCache;
    type Batch = CudaBatch;
    type Rope = CudaRope;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn load_weight(&self, view: &TensorView<'_>) -> Result<CudaWeight> {
        let (rows, cols) = crate::backend::matrix_shape(&view.shape)?;
        let bits = host::weight_to_bf16(view);
        let buf = self.gpu.alloc_zeroed(bits.len() * 2)?;
        self.gpu.upload(buf.ptr, &bits, buf.bytes)?;
        // The host copy is freed on return; make sure the upload is done.
        self.gpu.synchronize()?;
        *self.weight_bytes.borrow_mut() += buf.bytes;
        Ok(CudaWeight {
            rows,
            cols,
            ptr: buf.ptr,
            _buf: buf,
        })
    }

    fn load_rope(&self, table: &RopeTable) -> Result<CudaRope> {
        let cos = self.gpu.alloc_zeroed(table.cos.len() * 4)?;
        let sin = self.gpu.alloc_zeroed(table.sin.len() * 4)?;
        self.gpu.upload(cos.ptr, &table.cos, cos.bytes)?;
        self.gpu.upload(sin.ptr, &table.sin, sin.bytes)?;
        self.gpu.synchronize()?;
        self.rope_positions.set(table.max_positions);
        Ok(CudaRope {
            cos,
            sin,
            max_positions: table.max_positions,
            half_dim: table.half_dim,
        })
    }

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<CudaKvCache> {
        let limits = self.options.limits;
        if shape.block_size != limits.block_size {
            return Err(EngineError::Backend(format!(
                "KV block size {} differs from the backend's {}",
                shape.block_size, limits.block_size
            )));
        }
        let slot = shape.num_kv_heads * shape.head_dim * 2;
        let layer_bytes = (shape.num_blocks + 1) * shape.block_size * slot;
        let buf = self.gpu.alloc_zeroed(2 * shape.num_layers * layer_bytes)?;
        self.pad_block.set(Some(shape.num_blocks));
        Ok(CudaKvCache {
            shape,
            buf,
            layer_bytes,
        })
    }

    fn prepare(&self, layout: &BatchLayout) -> Result<CudaBatch> {
        self.gpu.bind()?;
        let limits = self.options.limits;
        let pad_block = self.pad_block()?;
        if let Some(&p) = layout
            .positions
            .iter()
            .find(|&&p| p as usize >= self.rope_positions.get())
        {
            return Err(EngineError::Backend(format!(
                "rope: position {p} ≥ {}",
                self.rope_positions.get()
            )));
        }
        // The previous upload may still be reading the staging buffer.
        self.staging_read.wait()?;
        let mut staging = self.staging.borrow_mut();
        let words = staging.words_mut();
        let shape = meta::pack(layout, &limits, pad_block, self.options.graphs, words)?;
        if let Some(&id) = layout
            .token_ids
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(EngineError::Backend(format!(
                "embed: token {id} ≥ vocab {}",
                self.config.vocab_size
            )));
        }
        self.gpu
            .upload(self.meta.ptr, &words[..shape.upload_words], self.meta.bytes)?;
        Ok(CudaBatch { shape })
    }

    fn embed(&self, table: &CudaWeight, batch: &CudaBatch) -> Result<CudaTensor> {
        let rows = batch.shape.rows;
        let out = self.tensor(rows, table.cols, DType::F32)?;
        self.launch(
            "embed_rows",
            Launch::per_row(rows, plan::ROW_THREADS),
            &[
                Arg::Ptr(out.ptr),
                Arg::Ptr(table.ptr),
                Arg::Ptr(self.meta_ptrs.token_ids),
                int(rows),
                int(table.cols),
                int(table.rows),
            ],
        )?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaWeight, eps: f32) -> Result<CudaTensor> {
        check(
            x.dtype == DType::F32 && w.cols == x.cols,
            "rms_norm",
            || format!("{:?} x of width {}, weight {}", x.dtype, x.cols, w.cols),
        )?;
        let mut out = self.tensor(x.rows, x.cols, DType::BF16)?;
        out.valid_rows = x.valid_rows;
        self.launch(
            "rms_norm",
            Launch::per_row(x.rows, plan::ROW_THREADS),
            &[
                Arg::Ptr(out.ptr),
                Arg::Ptr(x.ptr),
                Arg::Ptr(w.ptr),
                int(x.cols),
                Arg::F32(eps),
            ],
        )?;
        Ok(out)
    }

    fn add_rms_norm(
        &self,
        x: &mut CudaTensor,
        delta: &CudaTensor,
        w: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor> {
        check(
            x.dtype == DType::F32
                && delta.dtype == DType::BF16
                && delta.rows == x.rows
                && delta.cols == x.cols
                && w.cols == x.cols,
            "add_rms_norm",
            || {
                format!(
                    "x {}x{}, delta {}x{}",
                    x.rows, x.cols, delta.rows, delta.cols
                )
            },
        )?;
        let out = self.tensor(x.rows, x.cols, DType::BF16)?;
        self.launch(
            "add_rms_norm",
            Launch::per_row(x.rows, plan::ROW_THREADS),
            &[
                Arg::Ptr(x.ptr),
                Arg::Ptr(delta.ptr),
                Arg::Ptr(out.ptr),
                Arg::Ptr(w.ptr),
                int(x.cols),
                Arg::F32(eps),
            ],
        )?;
        Ok(out)
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaTensor> {
        self.gemm_out(x, w, bias, DType::BF16)
    }

    fn logits(&self, x: &CudaTensor, w: &CudaWeight) -> Result<CudaTensor> {
        self.gemm_out(x, w, None, DType::F32)
    }

    fn rope(
        &self,
        x: &mut CudaTensor,
        rope: &CudaRope,
        batch: &CudaBatch,
        num_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        check(
            x.dtype == DType::BF16
                && head_dim / 2 == rope.half_dim
                && x.cols == num_heads * head_dim
                && x.rows == batch.shape.rows,
            "rope",
            || format!("head_dim {head_dim}, cols {}", x.cols),
        )?;
        self.launch(
            "rope_rotate",
            Launch::per_row(x.rows, plan::SMALL_ROW_THREADS),
            &[
                Arg::Ptr(x.ptr),
                Arg::Ptr(rope.cos.ptr),
                Arg::Ptr(rope.sin.ptr),
                Arg::Ptr(self.meta_ptrs.positions),
                int(x.rows),
                int(num_heads),
                int(head_dim),
                int(rope.max_positions),
            ],
        )
    }

    fn write_kv(
        &self,
        cache: &mut CudaKvCache,
        layer: usize,
        k: &CudaTensor,
        v: &CudaTensor,
        batch: &CudaBatch,
    ) -> Result<()> {
        let width = cache.shape.num_kv_heads * cache.shape.head_dim;
        check(
            layer < cache.shape.num_layers
                && k.cols == width
                && v.cols == width
                && k.rows == batch.shape.rows
                && v.rows == k.rows,
            "write_kv",
            || format!("layer {layer}, {} cols, slot width {width}", k.cols),
        )?;
        self.launch(
            "write_kv",
            Launch::per_row(k.rows, plan::SMALL_ROW_THREADS),
            &[
                Arg::Ptr(cache.k(layer)),
                Arg::Ptr(cache.v(layer)),
                Arg::Ptr(k.ptr),
                Arg::Ptr(v.ptr),
                Arg::Ptr(self.meta_ptrs.slots),
                int(k.rows),
                int(width),
                Arg::U32(cache.num_slots() as u32),
            ],
        )
    }

    fn attention(
        &self,
        q: &CudaTensor,
        cache: &CudaKvCache,
        layer: usize,
        batch: &CudaBatch,
        shape: AttentionShape,
    ) -> Result<CudaTensor> {
        let AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
        } = shape;
        check(
            layer < cache.shape.num_layers
                && q.cols == num_heads * head_dim
                && q.rows == batch.shape.rows
                && num_kv_heads == cache.shape.num_kv_heads,
            "attention",
            || format!("q {}x{}, {num_heads} heads of {head_dim}", q.rows, q.cols),
        )?;
        let out = self.tensor(q.rows, q.cols, DType::BF16)?;
        let limits = self.options.limits;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let common = [
            Arg::Ptr(cache.k(layer)),
            Arg::Ptr(cache.v(layer)),
            Arg::Ptr(self.meta_ptrs.block_tables),
        ];
        if batch.shape.decode {
            let seqs = batch.shape.seqs;
            let parts = plan::decode_parts(limits.max_context);
            let n = seqs * num_heads * parts;
            let acc = self.tensor(n, head_dim, DType::F32)?;
            let max = self.tensor(n, 1, DType::F32)?;
            let sum = self.tensor(n, 1, DType::F32)?;
            let mut args = vec![
                Arg::Ptr(acc.ptr),
                Arg::Ptr(max.ptr),
                Arg::Ptr(sum.ptr),
                Arg::Ptr(q.ptr),
            ];
            args.extend(common);
            args.extend([
                Arg::Ptr(self.meta_ptrs.context_lens),
                int(limits.max_blocks_per_seq()),
                int(num_heads),
                int(num_kv_heads),
                int(head_dim),
                int(limits.block_size),
                int(plan::DECODE_PARTITION),
                int(parts),
                Arg::F32(scale),
            ]);
            self.launch(
                "attention_decode_partial",
                Launch::decode_partial(num_kv_heads, seqs, parts),
                &args,
            )?;
            self.launch(
                "attention_decode_reduce",
                Launch::decode_reduce(num_heads, seqs),
                &[
                    Arg::Ptr(out.ptr),
                    Arg::Ptr(acc.ptr),
                    Arg::Ptr(max.ptr),
                    Arg::Ptr(sum.ptr),
                    Arg::Ptr(self.meta_ptrs.context_lens),
                    int(num_heads),
                    int(head_dim),
                    int(plan::DECODE_PARTITION),
                    int(parts),
                ],
            )?;
        } else {
            let mut args = vec![Arg::Ptr(out.ptr), Arg::Ptr(q.ptr)];
            args.extend(common);
            args.extend(self.meta_ptrs.tile.map(Arg::Ptr));
            args.extend([
                int(limits.max_blocks_per_seq()),
                int(num_heads),
                int(num_kv_heads),
                int(head_dim),
                int(limits.block_size),
                Arg::F32(scale),
            ]);
            self.launch(
                "attention_prefill",
                Launch::prefill(batch.shape.tiles, num_kv_heads),
                &args,
            )?;
        }
        Ok(out)
    }

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        check(
            gate.dtype == DType::BF16 && up.dtype == DType::BF16 && gate.len() == up.len(),
            "silu_mul",
            || format!("{} vs {}", gate.len(), up.len()),
        )?;
        let out = self.tensor(gate.rows, gate.cols, DType::BF16)?;
        self.launch(
            "silu_mul",
            Launch::elementwise(gate.len()),
            &[
                Arg::Ptr(out.ptr),
                Arg::Ptr(gate.ptr),
                Arg::Ptr(up.ptr),
                Arg::I64(gate.len() as i64),
            ],
        )?;
        Ok(out)
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        check(
            x.dtype == DType::F32 && x.len() == y.len(),
            "add_assign",
            || format!("{} vs {}", x.len(), y.len()),
        )?;
        let kernel = match y.dtype {
            DType::BF16 => "add_bf16_to_f32",
            DType::F32 => "add_f32",
        };
        self.launch(
            kernel,
            Launch::elementwise(x.len()),
            &[Arg::Ptr(x.ptr), Arg::Ptr(y.ptr), Arg::I64(x.len() as i64)],
        )
    }

    fn gather_logits_rows(&self, x: &CudaTensor, batch: &CudaBatch) -> Result<CudaTensor> {
        check(x.dtype == DType::F32, "gather_logits_rows", || {
            format!("{:?} input", x.dtype)
        })?;
        let n = batch.shape.logits;
        let mut out = self.tensor(n, x.cols, DType::F32)?;
        out.valid_rows = batch.shape.real_logits;
        self.launch(
            "gather_rows_f32",
            Launch::per_row(n, plan::ROW_THREADS),
            &[
                Arg::Ptr(out.ptr),
                Arg::Ptr(x.ptr),
                Arg::Ptr(self.meta_ptrs.logits_rows),
                int(n),
                int(x.cols),
                int(x.rows),
            ],
        )?;
        Ok(out)
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        let n = x.valid_rows * x.cols;
        match x.dtype {
            DType::F32 => {
                let mut out = vec![0f32; n];
                self.gpu.download(&mut out, x.ptr)?;
                Ok(out)
            }
            DType::BF16 => {
                let mut bits = vec![0u16; n];
                self.gpu.download(&mut bits, x.ptr)?;
                Ok(bits.into_iter().map(super::host::bf16_to_f32).collect())
            }
        }
    }

    /// Runs a step: replays the bucket's graph, or captures it first, or
    /// runs eagerly when the step is not a graphable decode step.
    fn run_step<F>(&self, batch: &CudaBatch, mut forward: F) -> Result<CudaTensor>
    where
        F: FnMut() -> Result<CudaTensor>,
    {
        let Some(bucket) = batch.shape.bucket else {
            return forward();
        };
        if self.no_graph.borrow().contains(&bucket) {
            return forward();
        }
        let real = batch.shape.real_logits;
        if let Some(step) = self.graphs.borrow().get(&bucket) {
            self.gpu.replay(&step.graph)?;
            return Ok(CudaTensor {
                rows: step.rows,
                cols: step.cols,
                dtype: DType::F32,
                ptr: step.logits.ptr,
                valid_rows: real,
                _lease: None,
            });
        }
        // Allocated before the capture: nothing may allocate during one.
        let cols = self.config.vocab_size;
        let logits = self.gpu.alloc_zeroed(bucket * cols * 4)?;
        self.gpu.begin_capture()?;
        let captured = forward().and_then(|out| {
            if out.dtype != DType::F32 || out.rows != bucket || out.cols != cols {
                return Err(EngineError::Backend(format!(
                    "a captured step returned {}x{} {:?}, not {bucket}x{cols} logits",
                    out.rows, out.cols, out.dtype
                )));
            }
            self.gpu.copy(logits.ptr, out.ptr, logits.bytes)
        });
        let graph = self.gpu.end_capture();
        let graph = match (captured, graph) {
            (Ok(()), Ok(graph)) => graph,
            // The captured work never ran: run the step eagerly, and keep
            // this bucket out of graphs from now on.
            (Err(e), _) | (Ok(()), Err(e)) => {
                tracing::warn!(bucket, error = %e, "CUDA graph capture failed; this batch size runs without graphs");
                self.no_graph.borrow_mut().push(bucket);
                return forward();
            }
        };
        self.gpu.replay(&graph)?;
        let out = CudaTensor {
            rows: bucket,
            cols,
            dtype: DType::F32,
            ptr: logits.ptr,
            valid_rows: real,
            _lease: None,
        };
        self.graphs.borrow_mut().insert(
            bucket,
            CapturedStep {
                graph,
                logits,
                rows: bucket,
                cols,
            },
        );
        Ok(out)
    }

    fn sample(&self, logits: CudaTensor, rows: &mut [BatchRow<'_>]) -> Result<SampleResults> {
        self.sample_rows(logits, rows)
    }
}

impl CudaBackend {
    /// The KV block padding rows write to: the one after the pool's blocks
    /// (known once the cache is allocated).
    fn pad_block(&self) -> Result<u32> {
        self.pad_block
            .get()
            .map(|b| b as u32)
            .ok_or_else(|| EngineError::Backend("no KV cache is allocated".into()))
    }

    fn gemm_out(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        out_type: DType,
    ) -> Result<CudaTensor> {
        check(x.dtype == DType::BF16 && x.cols == w.cols, "linear", || {
            format!(
                "{:?} x has {} cols, w is {}x{}",
                x.dtype, x.cols, w.rows, w.cols
            )
        })?;
        let mut out = self.tensor(x.rows, w.rows, out_type)?;
        out.valid_rows = x.valid_rows;
        let gemm = Gemm {
            a: x.ptr,
            b: w.ptr,
            c: out.ptr,
            m: x.rows,
            n: w.rows,
            k: x.cols,
            c_f32: out_type == DType::F32,
            accumulate: false,
        };
        self.gpu.gemm(gemm)?;
        if let Some(bias) = bias {
            check(bias.cols == w.rows, "linear bias", || {
                format!("{} values for {} outputs", bias.cols, w.rows)
            })?;
            // out += ones[rows × 1] · bias[1 × n]: the bias broadcast over
            // rows as a rank-1 GEMM, so no extra kernel is needed.
            self.gpu.gemm(Gemm {
                a: self.ones.ptr,
                b: bias.ptr,
                m: x.rows,
                n: w.rows,
                k: 1,
                accumulate: true,
                ..gemm
            })?;
        }
        Ok(out)
    }
}
