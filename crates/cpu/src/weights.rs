//! Weight matrices kept packed for the micro-kernel. A linear layer's products read `W (out,
//! in)` in two orientations: as the forward's B (`k = in`, `n = out`, for X·Wᵀ) and as the
//! input gradient's B (`k = out`, `n = in`, for dY·W). With bf16 matmuls the forward
//! orientation is kept: the bf16 copy of the master weight, rounded once per optimizer step
//! instead of once per product, read by the forward, by the fused classifier's forward and by
//! its recomputation in the backward. The input gradient's orientation is packed per product:
//! keeping it too measured no faster (Zen 5: stories15m 181–194 against 180–184
//! ms/step; Qwen3-0.6B 2.63–2.68 against 2.30–2.48 s, its repacking doubling the optimizer
//! step) and cost 2 more bytes per parameter, which put Qwen3-0.6B's peak memory above
//! PyTorch's (12.1 GiB against 11.9; 11.1 GiB without it).
//!
//! A copy lives with the weight's memory ([`HostMemory::with_derived`]), so it is dropped with
//! it, and any write to the weight's window (an upload, a copy, the EMA swap, QAT's
//! re-quantization, Muon) marks it stale; the next product repacks it. AdamW packs each group
//! of rows as soon as it has updated them, while they are in cache ([`adamw_step`]), so the
//! optimizer step itself writes the copies, as llm.c's bf16 master-weight copies are
//! written.
//!
//! Only the bf16 precision keeps copies: f32 copies would double the weights' memory for a
//! packing pass that costs a few percent of a step.

use kiln_core::backend::{AdamWStep, MatmulShape};
use kiln_core::cpu::Isa;

use crate::gemm::{Mat, Microkernel, Packed};
use crate::optim;
use crate::pool::ThreadPool;
use crate::HostMemory;

/// One weight's packed copy (see the module docs).
#[derive(Default)]
pub struct PackedWeight {
    kernel: Option<Microkernel>,
    out_dim: usize,
    in_dim: usize,
    /// W as the forward's B: `k = in_dim`, `n = out_dim`.
    forward: Option<Packed>,
}

impl PackedWeight {
    /// The forward copy, packed from `w` if missing, stale, or made for another kernel or
    /// shape.
    pub fn forward(
        &mut self,
        pool: &ThreadPool,
        kernel: Microkernel,
        w: &[f32],
        s: MatmulShape,
        stale: bool,
    ) -> &Packed {
        let same =
            self.kernel == Some(kernel) && (self.out_dim, self.in_dim) == (s.out_dim, s.in_dim);
        if stale || !same {
            *self = PackedWeight {
                kernel: Some(kernel),
                out_dim: s.out_dim,
                in_dim: s.in_dim,
                forward: None,
            };
        }
        self.forward.get_or_insert_with(|| {
            // B (k, j) = W[j, k].
            let b = Mat {
                data: w,
                rs: 1,
                cs: s.in_dim,
            };
            let mut packed = Packed::default();
            packed.pack_b(pool, kernel, b, s.in_dim, s.out_dim);
            packed
        })
    }

    /// AdamW on the weight, repacking the forward copy group by group as it goes; `false`
    /// (and the copy dropped, to be packed again on next use) when there is none to fuse
    /// with.
    fn adamw(
        &mut self,
        isa: Isa,
        pool: &ThreadPool,
        bufs: (&mut [f32], &[f32], &mut [f32], &mut [f32]),
        hp: &AdamWStep,
    ) -> bool {
        let shape = (self.out_dim, self.in_dim);
        match (self.kernel, self.forward.as_mut()) {
            (Some(kernel), Some(forward)) if bufs.0.len() == shape.0 * shape.1 => {
                optim::adamw_packing(isa, pool, bufs, hp, (forward, kernel), shape);
                true
            }
            _ => {
                *self = PackedWeight::default();
                false
            }
        }
    }
}

/// One AdamW step of the weight at `offset..offset + len` of `memory` (`bufs`: its params,
/// gradients and two moments): fused with repacking its copy ([`optim::adamw_packing`]) when
/// products keep one, else the plain update.
pub fn adamw_step(
    isa: Isa,
    pool: &ThreadPool,
    memory: &HostMemory,
    offset: usize,
    (p, g, m, v): (&mut [f32], &[f32], &mut [f32], &mut [f32]),
    hp: &AdamWStep,
) {
    let fused = memory.update_derived(offset, p.len(), |copy: &mut PackedWeight| {
        copy.adamw(isa, pool, (&mut *p, g, &mut *m, &mut *v), hp)
    });
    if fused != Some(true) {
        optim::adamw(isa, pool, p, g, m, v, hp);
    }
}
