//! Weight matrices kept packed for the micro-kernel, in the two orientations a linear layer's
//! products read: `W (out, in)` as the forward's B (`k = in`, `n = out`, for X·Wᵀ) and as the
//! input gradient's B (`k = out`, `n = in`, for dY·W). With bf16 matmuls these are the bf16
//! copies of the master weights, rounded once per optimizer step instead of once per product.
//!
//! A copy lives with the weight's memory ([`HostMemory::with_derived`]), so it is dropped with
//! it, and any write to the weight's window (an upload, a copy, the EMA swap, QAT's
//! re-quantization, Muon) marks it stale; the next product repacks it. AdamW repacks the
//! orientations in use right after its update ([`refresh`]), so the optimizer step itself
//! writes them, as PyTorch's autocast cache and llm.c's bf16 master-weight copies do.
//!
//! Only the bf16 precision keeps copies: f32 copies would double the weights' memory twice
//! over for a packing pass that costs a few percent of a step.

use kiln_core::backend::MatmulShape;

use crate::gemm::{Mat, Microkernel, Packed};
use crate::pool::ThreadPool;
use crate::HostMemory;

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

    /// Both copies (see [`PackedWeight::get`]).
    pub fn both(
        &mut self,
        pool: &ThreadPool,
        kernel: Microkernel,
        w: &[f32],
        s: MatmulShape,
        stale: bool,
    ) -> (&Packed, &Packed) {
        self.get(pool, kernel, w, s, Orientation::Forward, stale);
        self.get(pool, kernel, w, s, Orientation::Backward, false);
        match (&self.forward, &self.backward) {
            (Some(f), Some(b)) => (f, b),
            _ => unreachable!("both orientations were just packed"),
        }
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
