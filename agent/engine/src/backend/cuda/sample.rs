//! Sampling on the device: each row's parameters and its one uniform draw
//! (from the request's own seeded generator, exactly as the CPU sampler
//! takes it) go up with the penalty history; the kernel applies the
//! penalties and picks the token; only token ids and log probabilities
//! come back. Requests the kernel does not handle (`logit_bias`,
//! `allowed_token_ids`, top-n log probabilities) send the step's logits to
//! the CPU sampler instead.

use super::device::{Arg, DeviceBuffer, Gpu};
use super::host::{SamplePack, device_can_sample};
use super::plan::{Launch, SAMPLING_THREADS, StepLimits};
use super::{CudaBackend, CudaTensor, DType};
use crate::backend::{Backend, SampleResults};
use crate::error::{EngineError, Result};
use crate::sampler::{BatchRow, SampleOutput, Sampler, SamplerError};
use std::cell::RefCell;

/// Token id the kernel writes when a row has no candidate.
const NO_CANDIDATE: u32 = u32::MAX;

/// Device buffers of the sampler, sized at start for the largest step.
pub struct SampleBuffers {
    params: DeviceBuffer,
    pen_tokens: DeviceBuffer,
    pen_generated: DeviceBuffer,
    /// Token ids, then log probabilities, `rows` each.
    out: DeviceBuffer,
    pen_capacity: usize,
    pack: RefCell<SamplePack>,
}

impl SampleBuffers {
    /// Buffers for up to `padded_seqs` rows and a penalty history of up to
    /// the whole context per row.
    pub fn new(gpu: &Gpu, limits: &StepLimits) -> Result<Self> {
        let rows = limits.padded_seqs();
        let pen_capacity = rows * limits.max_context.max(1);
        Ok(Self {
            params: gpu.alloc_zeroed(rows * 48)?,
            pen_tokens: gpu.alloc_zeroed(pen_capacity * 4)?,
            pen_generated: gpu.alloc_zeroed(pen_capacity * 4)?,
            out: gpu.alloc_zeroed(rows * 8)?,
            pen_capacity,
            pack: RefCell::new(SamplePack::default()),
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.params.bytes + self.pen_tokens.bytes + self.pen_generated.bytes + self.out.bytes
    }
}

impl CudaBackend {
    pub(super) fn sample_rows(
        &self,
        logits: CudaTensor,
        rows: &mut [BatchRow<'_>],
    ) -> Result<SampleResults> {
        if logits.dtype != DType::F32 || logits.valid_rows != rows.len() {
            return Err(EngineError::Backend(format!(
                "sample: {} logits rows for {} requests",
                logits.valid_rows,
                rows.len()
            )));
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // Grammar masks are applied by the CPU sampler.
        if !rows
            .iter()
            .all(|r| r.mask.is_none() && device_can_sample(r.params))
        {
            return self.sample_on_host(&logits, rows);
        }
        let vocab = logits.cols;
        let mut results: Vec<Option<std::result::Result<SampleOutput, SamplerError>>> =
            Vec::with_capacity(rows.len());
        let buffers = &self.sampling;
        let mut pack = buffers.pack.borrow_mut();
        pack.clear();
        for row in rows.iter_mut() {
            // Refused parameters are answered per row, as the CPU sampler
            // does; the row is still sampled (greedily) to keep the launch
            // aligned, and its result is discarded.
            let invalid = row.params.validate().err();
            let uniform = if row.params.is_greedy() || invalid.is_some() {
                0.0
            } else {
                row.rng.next_unit()
            };
            pack.push(row.params, row.history, uniform);
            results.push(invalid.map(Err));
        }
        // History tokens outside the vocabulary are skipped by the kernel.
        if pack.pen_tokens.len() > buffers.pen_capacity {
            return self.sample_on_host(&logits, rows);
        }
        let n = rows.len();
        self.gpu
            .upload(buffers.params.ptr, &pack.rows, buffers.params.bytes)?;
        if !pack.pen_tokens.is_empty() {
            self.gpu.upload(
                buffers.pen_tokens.ptr,
                &pack.pen_tokens,
                buffers.pen_tokens.bytes,
            )?;
            self.gpu.upload(
                buffers.pen_generated.ptr,
                &pack.pen_generated,
                buffers.pen_generated.bytes,
            )?;
        }
        let out_logprobs = buffers.out.ptr + (n * 4) as u64;
        self.launch(
            "sample_rows",
            Launch::per_row(n, SAMPLING_THREADS),
            &[
                Arg::Ptr(buffers.out.ptr),
                Arg::Ptr(out_logprobs),
                Arg::Ptr(logits.ptr),
                Arg::Ptr(buffers.params.ptr),
                Arg::Ptr(buffers.pen_tokens.ptr),
                Arg::Ptr(buffers.pen_generated.ptr),
                Arg::I32(vocab as i32),
            ],
        )?;
        let mut words = vec![0u32; 2 * n];
        // The one host sync of the step: token ids and log probabilities.
        self.gpu.download(&mut words, buffers.out.ptr)?;
        Ok(results
            .into_iter()
            .zip(rows.iter())
            .enumerate()
            .map(|(i, (refused, row))| {
                if let Some(refused) = refused {
                    return refused;
                }
                let token = words[i];
                if token == NO_CANDIDATE || token as usize >= vocab {
                    return Err(SamplerError::NoCandidates);
                }
                Ok(SampleOutput {
                    token,
                    logprob: row.params.logprobs.map(|_| f32::from_bits(words[n + i])),
                    top_logprobs: Vec::new(),
                })
            })
            .collect())
    }

    /// The CPU sampler over the step's logits, copied to the host.
    fn sample_on_host(
        &self,
        logits: &CudaTensor,
        rows: &mut [BatchRow<'_>],
    ) -> Result<SampleResults> {
        let mut data = Backend::to_host(self, logits)?;
        let sampler =
            Sampler::new(logits.cols).map_err(|e| EngineError::Backend(format!("sample: {e}")))?;
        sampler
            .sample_batch(&mut data, rows)
            .map_err(|e| EngineError::Backend(format!("sample: {e}")))
    }
}
