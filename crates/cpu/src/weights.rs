//! Weight matrices kept packed for the micro-kernel. A linear layer's products read `W (out,
//! in)` in two orientations: as the forward's B (`k = in`, `n = out`, for X·Wᵀ) and as the
//! input gradient's B (`k = out`, `n = in`, for dY·W). With bf16 matmuls the forward
//! orientation is kept: the bf16 copy of the master weight, rounded once per optimizer step
//! instead of once per product, read by the forward, by the fused classifier's forward and by
//! its recomputation in the backward. The input gradient's orientation is packed per product
//! ([`KEPT`]): keeping it too measured no faster (Zen 5: stories15m 181–194 against 180–184
//! ms/step; Qwen3-0.6B 2.63–2.68 against 2.30–2.48 s, its repacking doubling the optimizer
//! step) and cost 2 more bytes per parameter, which put Qwen3-0.6B's peak memory above
//! PyTorch's (12.1 GiB against 11.9; 11.1 GiB without it).
//!
//! A copy lives with the weight's memory ([`HostMemory::with_derived`]), so it is dropped with
//! it, and any write to the weight's window (an upload, a copy, the EMA swap, QAT's
//! re-quantization, Muon) marks it stale; the next product repacks it. AdamW repacks the
//! copies right after its update ([`refresh`]), so the optimizer step itself writes them,
//! as PyTorch's autocast cache and llm.c's bf16 master-weight copies do.
//!
//! Only the bf16 precision keeps copies: f32 copies would double the weights' memory for a
//! packing pass that costs a few percent of a step.

use kiln_core::backend::MatmulShape;

use crate::gemm::{Mat, Microkernel, Packed};
use crate::pool::ThreadPool;
use crate::HostMemory;

/// The orientations kept packed (see the module docs).
pub const KEPT: [Orientation; 1] = [Orientation::Forward];

/// One weight's packed copies (see the module docs).
#[derive(Default)]
pub struct PackedWeight {
    kernel: Option<Microkernel>,
    out_dim: usize,
    in_dim: usize,
    /// W as the forward's B: `k = in_dim`, `n = out_dim`.
    forward: Option<Packed>,
    /// W as the input gradient's B: `k = out_dim`, `n = in_dim`.
    backward: Option<Packed>,
}

/// Which product reads the copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Orientation {
    /// `X · Wᵀ`.
    Forward,
    /// `dY · W`.
    Backward,
}

impl PackedWeight {
    /// The copy for `orientation`, packed from `w` if missing, stale, or made for another
    /// kernel or shape.
    pub fn get(
        &mut self,
        pool: &ThreadPool,
        kernel: Microkernel,
        w: &[f32],
        s: MatmulShape,
        orientation: Orientation,
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
                backward: None,
            };
        }
        let (out_dim, in_dim) = (s.out_dim, s.in_dim);
        let slot = match orientation {
            Orientation::Forward => &mut self.forward,
            Orientation::Backward => &mut self.backward,
        };
        slot.get_or_insert_with(|| pack(pool, kernel, w, out_dim, in_dim, orientation))
    }

    /// Repacks the copies in use from `w`.
    fn repack(&mut self, pool: &ThreadPool, w: &[f32]) {
        let Some(kernel) = self.kernel else { return };
        let (out_dim, in_dim) = (self.out_dim, self.in_dim);
        if w.len() != out_dim * in_dim {
            *self = PackedWeight::default();
            return;
        }
        if self.forward.is_some() {
            self.forward = Some(pack(pool, kernel, w, out_dim, in_dim, Orientation::Forward));
        }
        if self.backward.is_some() {
            self.backward = Some(pack(
                pool,
                kernel,
                w,
                out_dim,
                in_dim,
                Orientation::Backward,
            ));
        }
    }
}

fn pack(
    pool: &ThreadPool,
    kernel: Microkernel,
    w: &[f32],
    out_dim: usize,
    in_dim: usize,
    orientation: Orientation,
) -> Packed {
    let mut packed = Packed::default();
    match orientation {
        // B (k, j) = W[j, k].
        Orientation::Forward => {
            let b = Mat {
                data: w,
                rs: 1,
                cs: in_dim,
            };
            packed.pack_b(pool, kernel, b, in_dim, out_dim);
        }
        // B (k, j) = W[k, j].
        Orientation::Backward => {
            let b = Mat {
                data: w,
                rs: in_dim,
                cs: 1,
            };
            packed.pack_b(pool, kernel, b, out_dim, in_dim);
        }
    }
    packed
}

/// After the optimizer wrote `w`, the window `offset..offset + w.len()` of `memory`: repacks
/// the copies of that window that products use (none are made for windows that never fed a
/// product).
pub fn refresh(pool: &ThreadPool, memory: &HostMemory, offset: usize, w: &[f32]) {
    memory.update_derived(offset, w.len(), |copy: &mut PackedWeight| {
        copy.repack(pool, w)
    });
}
