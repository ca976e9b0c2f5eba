//! The cross-entropy's launches (kernels/xent.cu) and the classifier fused with it: a chunk of
//! rows' logits at a time through cuBLASLt, the soft cap and the loss (or its gradient) in one
//! row kernel.

use cudarc::driver::sys::CUdeviceptr;
use kiln_core::backend::{Accumulate, ClassifierShape};

use super::{addr, Arg::*, CudaBackend, GemmShape, Src, THREADS, V};

/// Rows of logits the classifier holds at once.
const CLASSIFIER_ROWS: usize = 8192;

impl CudaBackend {
    pub(crate) fn cross_entropy_forward_on_device(
        &self,
        losses: V,
        logsumexp: V,
        logits: V,
        targets: &[u32],
        vocab: usize,
    ) {
        assert_eq!(logits.len(), targets.len() * vocab);
        check_targets(targets, vocab);
        let rows = targets.len();
        if rows == 0 {
            return;
        }
        // The kernel caps in place; without a cap it only reads, but takes a mutable pointer.
        let t = self.upload_ids("targets", targets);
        self.launch(
            "cross_entropy_forward",
            (rows as u32, 1, 1),
            THREADS,
            0,
            &[
                self.f(losses),
                self.f(logsumexp),
                self.f(logits),
                Ptr(t),
                Int(vocab as i64),
                Float(0.0),
            ],
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cross_entropy_backward_on_device(
        &self,
        dlogits: V,
        logits: V,
        logsumexp: V,
        targets: &[u32],
        vocab: usize,
        dloss: f32,
    ) {
        assert_eq!(
            (logits.len(), dlogits.len()),
            (targets.len() * vocab, logits.len())
        );
        check_targets(targets, vocab);
        let rows = targets.len();
        if rows == 0 {
            return;
        }
        let t = self.upload_ids("targets", targets);
        self.launch(
            "cross_entropy_backward",
            (rows as u32, 1, 1),
            THREADS,
            0,
            &[
                self.f(dlogits),
                self.f(logits),
                self.f(logsumexp),
                Ptr(t),
                Int(vocab as i64),
                Float(dloss),
                Float(0.0),
            ],
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn classifier_loss_forward_on_device(
        &self,
        losses: V,
        logsumexp: V,
        _saved: V,
        inp: V,
        weight: V,
        targets: &[u32],
        s: ClassifierShape,
    ) {
        assert_eq!((inp.len(), weight.len()), (s.rows * s.dim, s.vocab * s.dim));
        assert_eq!(targets.len(), s.rows);
        check_targets(targets, s.vocab);
        let t = self.upload_ids("targets", targets);
        let cap = s.softcap.unwrap_or(0.0);
        let chunk = CLASSIFIER_ROWS.min(s.rows.max(1));
        let z = self.scratch("logits", chunk * s.vocab * 4);
        for r0 in (0..s.rows).step_by(chunk) {
            let n = chunk.min(s.rows - r0);
            self.classifier_logits(z, inp, weight, r0, n, s);
            self.launch(
                "cross_entropy_forward",
                (n as u32, 1, 1),
                THREADS,
                0,
                &[
                    Ptr(addr(losses.slice(r0, n))),
                    Ptr(addr(logsumexp.slice(r0, n))),
                    Ptr(z),
                    Ptr(t + (r0 * 4) as u64),
                    Int(s.vocab as i64),
                    Float(cap),
                ],
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn classifier_loss_backward_on_device(
        &self,
        dinp: V,
        dweight: V,
        inp: V,
        weight: V,
        (logsumexp, _saved): (V, V),
        targets: &[u32],
        s: ClassifierShape,
        dloss: f32,
        dinp_mode: Accumulate,
    ) {
        assert_eq!((inp.len(), weight.len()), (s.rows * s.dim, s.vocab * s.dim));
        assert_eq!((dinp.len(), dweight.len()), (inp.len(), weight.len()));
        check_targets(targets, s.vocab);
        let t = self.upload_ids("targets", targets);
        let cap = s.softcap.unwrap_or(0.0);
        let chunk = CLASSIFIER_ROWS.min(s.rows.max(1));
        let z = self.scratch("logits", chunk * s.vocab * 4);
        let beta = if dinp_mode == Accumulate::Add {
            1.0
        } else {
            0.0
        };
        for r0 in (0..s.rows).step_by(chunk) {
            let n = chunk.min(s.rows - r0);
            self.classifier_logits(z, inp, weight, r0, n, s);
            if let Some(c) = s.softcap {
                let len = Int((n * s.vocab) as i64);
                self.elementwise(
                    "softcap_forward",
                    n * s.vocab,
                    &[Ptr(z), Ptr(z), Float(c), len],
                );
            }
            // dz in place over z, or as bf16 for products on bf16 operands (read by both).
            let (kernel, dz) = if self.on_bf16_operands() {
                let dz = self.scratch("dlogits_bf16", chunk * s.vocab * 2);
                ("cross_entropy_backward_bf16", Src::Bf16(dz))
            } else {
                ("cross_entropy_backward", Src::F32(z))
            };
            let (Src::F32(out) | Src::Bf16(out)) = dz;
            self.launch(
                kernel,
                (n as u32, 1, 1),
                THREADS,
                0,
                &[
                    Ptr(out),
                    Ptr(z),
                    Ptr(addr(logsumexp.slice(r0, n))),
                    Ptr(t + (r0 * 4) as u64),
                    Int(s.vocab as i64),
                    Float(dloss),
                    Float(cap),
                ],
            );
            let x = addr(inp.slice(r0 * s.dim, n * s.dim));
            // dinp (n, dim) = dz (n, vocab) · weight (vocab, dim)
            self.gemm_on(
                GemmShape {
                    ta: false,
                    tb: false,
                    m: n,
                    n: s.dim,
                    k: s.vocab,
                    lda: s.vocab,
                    ldb: s.dim,
                    ldc: s.dim,
                },
                1.0,
                (dz, Src::F32(addr(weight))),
                beta,
                addr(dinp.slice(r0 * s.dim, n * s.dim)),
            );
            // dweight (vocab, dim) += dzᵀ · x
            self.gemm_on(
                GemmShape {
                    ta: true,
                    tb: false,
                    m: s.vocab,
                    n: s.dim,
                    k: n,
                    lda: s.vocab,
                    ldb: s.dim,
                    ldc: s.dim,
                },
                1.0,
                (dz, Src::F32(x)),
                1.0,
                addr(dweight),
            );
        }
    }

    /// Logits of rows `r0..r0 + n` into the scratch `z` `(n, vocab)`.
    fn classifier_logits(
        &self,
        z: CUdeviceptr,
        inp: V,
        weight: V,
        r0: usize,
        n: usize,
        s: ClassifierShape,
    ) {
        let x = addr(inp.slice(r0 * s.dim, n * s.dim));
        self.gemm(
            GemmShape {
                ta: false,
                tb: true,
                m: n,
                n: s.vocab,
                k: s.dim,
                lda: s.dim,
                ldb: s.dim,
                ldc: s.vocab,
            },
            1.0,
            x,
            addr(weight),
            0.0,
            z,
        );
    }
}

fn check_targets(targets: &[u32], vocab: usize) {
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        panic!("target {bad} out of vocabulary {vocab}");
    }
}
