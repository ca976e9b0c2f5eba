//! The optimizer's launches (kernels/optim.cu): the sum of squares, AdamW, the EMA, and Muon
//! (its momentum on the device, Newton–Schulz through cuBLASLt).

use kiln_core::backend::{AdamWStep, MatrixShape, MuonStep};

use super::{Arg::*, CudaBackend, GemmShape, THREADS, V};

impl CudaBackend {
    pub(crate) fn sum_squares_on_device(&self, x: V) -> f64 {
        let out = self.scratch("sum_squares", 8);
        self.bind();
        self.written();
        // SAFETY: the scratch holds one f64; the memset is ordered before the kernel.
        unsafe { cudarc::driver::result::memset_d8_async(out, 0, 8, std::ptr::null_mut()) }
            .unwrap_or_else(|e| panic!("cuda: {e:?}"));
        let n = x.len();
        if n > 0 {
            let blocks = n.div_ceil(THREADS as usize).min(1024) as u32;
            self.launch(
                "sum_squares",
                (blocks, 1, 1),
                THREADS,
                0,
                &[Ptr(out), self.f(x), Int(n as i64)],
            );
        }
        let mut host = [0f64];
        // SAFETY: one f64 from the scratch, after the kernel (synchronous copy).
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut host, out) }
            .unwrap_or_else(|e| panic!("cuda: {e:?}"));
        host[0]
    }

    pub(crate) fn adamw_step_on_device(&self, params: V, grads: V, m: V, v: V, hp: &AdamWStep) {
        let n = params.len();
        assert_eq!((grads.len(), m.len(), v.len()), (n, n, n));
        // As the reference: bias corrections and decay in f32 on the host.
        let bias1 = 1.0 - hp.beta1.powi(hp.step as i32);
        let bias2_sqrt = (1.0 - hp.beta2.powi(hp.step as i32)).sqrt();
        let decay = 1.0 - hp.learning_rate * hp.weight_decay;
        let args = [
            self.f(params),
            self.f(grads),
            self.f(m),
            self.f(v),
            Float(hp.learning_rate),
            Float(bias1),
            Float(bias2_sqrt),
            Float(hp.beta1),
            Float(hp.beta2),
            Float(hp.eps),
            Float(decay),
            Float(hp.grad_scale),
            Int(n as i64),
        ];
        self.elementwise("adamw_step", n, &args);
    }

    pub(crate) fn ema_update_on_device(&self, ema: V, params: V, decay: f32) {
        assert_eq!(ema.len(), params.len());
        let args = [
            self.f(ema),
            self.f(params),
            Float(decay),
            Int(ema.len() as i64),
        ];
        self.elementwise("ema_update", ema.len(), &args);
    }

    pub(crate) fn muon_step_on_device(
        &self,
        params: V,
        grads: V,
        momentum: V,
        s: MatrixShape,
        hp: &MuonStep,
    ) {
        let n = s.rows * s.cols;
        assert_eq!((params.len(), grads.len(), momentum.len()), (n, n, n));
        if n == 0 {
            return;
        }
        let update = self.scratch("muon_update", n * 4);
        self.elementwise(
            "muon_momentum",
            n,
            &[
                Ptr(update),
                self.f(momentum),
                self.f(grads),
                Float(hp.momentum),
                Float(hp.grad_scale),
                Int(hp.nesterov as i64),
                Int(n as i64),
            ],
        );
        if hp.row_normalize {
            self.launch(
                "normalize_rows",
                (s.rows as u32, 1, 1),
                THREADS,
                0,
                &[Ptr(update), Int(s.cols as i64)],
            );
        }
        // Newton–Schulz (reference: muon.rs) on x (r, k), r ≤ k.
        let transposed = s.rows > s.cols;
        let (r, k) = if transposed {
            (s.cols, s.rows)
        } else {
            (s.rows, s.cols)
        };
        let norm = self.scratch("muon_norm", 8);
        self.bind();
        self.written();
        // SAFETY: one f64 of scratch, zeroed in stream order.
        unsafe { cudarc::driver::result::memset_d8_async(norm, 0, 8, std::ptr::null_mut()) }
            .unwrap_or_else(|e| panic!("cuda: {e:?}"));
        let blocks = n.div_ceil(THREADS as usize).min(1024) as u32;
        self.launch(
            "sum_squares",
            (blocks, 1, 1),
            THREADS,
            0,
            &[Ptr(norm), Ptr(update), Int(n as i64)],
        );
        let mut x = self.scratch("muon_x", n * 4);
        let mut next = self.scratch("muon_next", n * 4);
        let gram = self.scratch("muon_gram", r * r * 4);
        let poly = self.scratch("muon_poly", r * r * 4);
        self.elementwise(
            "newton_schulz_start",
            n,
            &[
                Ptr(x),
                Ptr(update),
                Ptr(norm),
                Int(s.rows as i64),
                Int(s.cols as i64),
                Int(transposed as i64),
            ],
        );
        let (a, b, c) = ns_coefficients();
        let sq = |m, kk, ta, tb, ld_a, ld_b| GemmShape {
            ta,
            tb,
            m,
            n: m,
            k: kk,
            lda: ld_a,
            ldb: ld_b,
            ldc: m,
        };
        for _ in 0..hp.ns_steps {
            // gram (r, r) = x xᵀ
            self.gemm(sq(r, k, false, true, k, k), 1.0, x, x, 0.0, gram);
            // poly = c·gram·gram + b·gram
            self.copy_raw(poly, gram, r * r);
            self.gemm(sq(r, r, false, false, r, r), c, gram, gram, b, poly);
            // next = poly·x + a·x
            self.copy_raw(next, x, n);
            let shape = GemmShape {
                ta: false,
                tb: false,
                m: r,
                n: k,
                k: r,
                lda: r,
                ldb: k,
                ldc: k,
            };
            self.gemm(shape, 1.0, poly, x, a, next);
            std::mem::swap(&mut x, &mut next);
        }
        let aspect = (s.rows as f64 / s.cols as f64).max(1.0).sqrt();
        let step = hp.learning_rate * aspect as f32;
        let decay = 1.0 - hp.learning_rate * hp.weight_decay;
        self.elementwise(
            "muon_apply",
            n,
            &[
                self.f(params),
                Ptr(x),
                Float(decay),
                Float(step),
                Int(s.rows as i64),
                Int(s.cols as i64),
                Int(transposed as i64),
            ],
        );
    }
}

/// Newton–Schulz's quintic coefficients, Keller Jordan's (the reference's
/// `kiln_reference::muon::NS_COEFFICIENTS`, in f32).
fn ns_coefficients() -> (f32, f32, f32) {
    (3.4445, -4.7750, 2.0315)
}
