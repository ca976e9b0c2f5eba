//! The optimizer's memory-bound kernels on the pool, each loop compiled per tier (`tiered!`):
//! AdamW, the EMA of the weights and the sum of squares for the gradient norm. The reference
//! backend's `adamw.rs` is the arithmetic, operation for operation and in its order (Rust
//! never fuses a multiply and an add on its own), so AdamW and the EMA give the reference's
//! bits: only the width of the registers differs. The sum of squares keeps the reference's
//! fixed chunks summed in order (the norm feeds clipping, and resume must be bit-exact), with
//! each chunk summed in f64 lanes.

use kiln_core::backend::{AdamWStep, FakeQuant};
use kiln_core::cpu::Isa;

use crate::gemm::{Microkernel, Packed};
use crate::pool::ThreadPool;
use crate::shared::SharedMut;

/// Parameters per task (128 KiB per f32 stream).
const CHUNK: usize = 1 << 15;

/// One AdamW update of `params` from `grads` with moments `m`, `v` (all the same length).
pub fn adamw(
    isa: Isa,
    pool: &ThreadPool,
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hp: &AdamWStep,
) {
    let n = params.len();
    assert!(
        grads.len() == n && m.len() == n && v.len() == n,
        "adamw: lengths"
    );
    let k = Adam::new(hp);
    let (p_ptr, m_ptr, v_ptr) = (SharedMut::new(params), SharedMut::new(m), SharedMut::new(v));
    pool.run(n.div_ceil(CHUNK), &|c| {
        let (start, len) = (c * CHUNK, CHUNK.min(n - c * CHUNK));
        // SAFETY: chunk c of each buffer is this task's alone.
        let (p, m, v) = unsafe {
            (
                p_ptr.slice(start, len),
                m_ptr.slice(start, len),
                v_ptr.slice(start, len),
            )
        };
        adamw_span(isa, p, &grads[start..start + len], m, v, &k);
    });
}

/// [`adamw`] of a weight matrix `params (out, in)` fused with packing it as the forward
/// product's operand into `packed` (for `kernel`): each group of the micro-kernel's NR rows
/// is updated and packed by one task while it is in cache, instead of the whole matrix
/// being read again to pack it.
pub fn adamw_packing(
    isa: Isa,
    pool: &ThreadPool,
    (params, grads, m, v): (&mut [f32], &[f32], &mut [f32], &mut [f32]),
    hp: &AdamWStep,
    (packed, kernel): (&mut Packed, Microkernel),
    (out_dim, in_dim): (usize, usize),
) {
    let n = params.len();
    assert!(
        grads.len() == n && m.len() == n && v.len() == n,
        "adamw: lengths"
    );
    assert_eq!(n, out_dim * in_dim, "adamw: shape");
    let k = Adam::new(hp);
    let (p_ptr, m_ptr, v_ptr) = (SharedMut::new(params), SharedMut::new(m), SharedMut::new(v));
    let update = |row: usize, rows: usize| {
        let (start, len) = (row * in_dim, rows * in_dim);
        // SAFETY: these rows are this task's alone (one group per task).
        let (p, m, v) = unsafe {
            (
                p_ptr.slice(start, len),
                m_ptr.slice(start, len),
                v_ptr.slice(start, len),
            )
        };
        adamw_span(isa, p, &grads[start..start + len], m, v, &k);
    };
    // SAFETY: `params` is this call's unique borrow; `update` writes only the rows it gets.
    unsafe {
        packed.pack_rows_after(pool, kernel, p_ptr.get(), (out_dim, in_dim), &update);
    }
}

/// The constants of one AdamW step, in the reference's terms.
struct Adam {
    beta1: f32,
    beta2: f32,
    one_m_b1: f32,
    one_m_b2: f32,
    eps: f32,
    scale: f32,
    decay: f32,
    step_size: f32,
    bias2_sqrt: f32,
}

impl Adam {
    fn new(hp: &AdamWStep) -> Self {
        let (lr, beta1, beta2) = (hp.learning_rate, hp.beta1, hp.beta2);
        let bias1 = 1.0 - beta1.powi(hp.step as i32);
        Adam {
            beta1,
            beta2,
            one_m_b1: 1.0 - beta1,
            one_m_b2: 1.0 - beta2,
            eps: hp.eps,
            scale: hp.grad_scale,
            decay: 1.0 - lr * hp.weight_decay,
            step_size: lr / bias1,
            bias2_sqrt: (1.0 - beta2.powi(hp.step as i32)).sqrt(),
        }
    }
}

tiered!(
    fn adamw_span(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &Adam) {
        let n = p.len();
        let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
        for i in 0..n {
            let g = g[i] * k.scale;
            m[i] = k.beta1 * m[i] + k.one_m_b1 * g;
            v[i] = k.beta2 * v[i] + k.one_m_b2 * g * g;
            p[i] = p[i] * k.decay - k.step_size * m[i] / (v[i].sqrt() / k.bias2_sqrt + k.eps);
        }
    }
);

/// `ema ← decay·ema + (1 − decay)·params`.
pub fn ema(isa: Isa, pool: &ThreadPool, ema: &mut [f32], params: &[f32], decay: f32) {
    let n = ema.len();
    assert_eq!(params.len(), n, "ema: lengths");
    let keep = 1.0 - decay;
    let e_ptr = SharedMut::new(ema);
    pool.run(n.div_ceil(CHUNK), &|c| {
        let (start, len) = (c * CHUNK, CHUNK.min(n - c * CHUNK));
        // SAFETY: chunk c of `ema` is this task's alone.
        let e = unsafe { e_ptr.slice(start, len) };
        ema_span(isa, e, &params[start..start + len], decay, keep);
    });
}

tiered!(
    fn ema_span(e: &mut [f32], p: &[f32], decay: f32, keep: f32) {
        for (e, &p) in e.iter_mut().zip(p) {
            *e = decay * *e + keep * p;
        }
    }
);

/// `dst = dequantize(quantize(src))` (quantization-aware training's weights): `kiln_core`'s
/// `quant::round_trip` on blocks of whole groups (ternary) or rows (int) over the pool, so
/// every value is the one the export's quantizer gives. A rotation's blocks (powers of two,
/// dividing the rows) stay whole too: the unit is the larger of a group and a block.
pub fn fake_quantize(
    pool: &ThreadPool,
    dst: &mut [f32],
    src: &[f32],
    q: FakeQuant,
    rotation: Option<usize>,
) {
    assert_eq!(dst.len(), src.len(), "fake_quantize: lengths");
    // Values per unit that must stay whole, and units per task (about 16K values).
    let unit = match q {
        FakeQuant::Ternary { group } => group.max(rotation.unwrap_or(1)),
        FakeQuant::Int { cols, .. } => cols,
        FakeQuant::F16 => 1,
    }
    .max(1);
    let span = unit * (CHUNK / 2 / unit).max(1);
    let n = src.len();
    let out = SharedMut::new(dst);
    pool.run(n.div_ceil(span), &|t| {
        let (start, len) = (t * span, span.min(n - t * span));
        // SAFETY: span t of `dst` is this task's alone.
        let d = unsafe { out.slice(start, len) };
        kiln_core::quant::round_trip(q, rotation, &src[start..start + len], d);
    });
}

/// The reference's chunk of the sum of squares.
const SUM_CHUNK: usize = 1 << 14;

/// Σ x² in f64: fixed chunks, each summed in eight f64 lanes, the chunks' sums added in order.
pub fn sum_squares(isa: Isa, pool: &ThreadPool, x: &[f32]) -> f64 {
    let chunks = x.len().div_ceil(SUM_CHUNK);
    let mut partial = vec![0f64; chunks];
    let out = SharedMut::new(&mut partial);
    pool.run(chunks, &|c| {
        let part = &x[c * SUM_CHUNK..((c + 1) * SUM_CHUNK).min(x.len())];
        let mut sum = 0.0;
        squares_span(isa, part, &mut sum);
        // SAFETY: element c is this task's alone.
        unsafe { out.set(c, sum) };
    });
    partial.iter().sum()
}

tiered!(
    /// `sum = Σ x²` in eight f64 lanes.
    fn squares_span(x: &[f32], sum: &mut f64) {
        let mut lanes = [0f64; 8];
        let mut blocks = x.chunks_exact(8);
        for block in &mut blocks {
            for (acc, &v) in lanes.iter_mut().zip(block) {
                *acc += v as f64 * v as f64;
            }
        }
        for (acc, &v) in lanes.iter_mut().zip(blocks.remainder()) {
            *acc += v as f64 * v as f64;
        }
        *sum = lanes.iter().sum();
    }
);

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_conformance::test_values as values;
    use kiln_reference::adamw as reference;

    fn tiers() -> Vec<Isa> {
        let f = kiln_core::cpu::features();
        [Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&i| f.supports(i))
            .collect()
    }

    /// Several chunks and a ragged end. AdamW and the EMA run the reference's operations in
    /// its order, so they must give its bits exactly (tolerance zero); the sum of squares
    /// sums in another order, so it is held to 1e-12 relative (f64 sums of 50,001 terms).
    #[test]
    fn optimizer_kernels_match_the_reference() {
        let pool = ThreadPool::new(2);
        let n = 50_001;
        let (p0, g) = (values(n, 1), values(n, 2));
        let m0 = values(n, 3);
        let v0: Vec<f32> = values(n, 4).iter().map(|x| x * x).collect();
        let hp = AdamWStep {
            learning_rate: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 3,
            grad_scale: 0.7,
        };
        let (mut wp, mut wm, mut wv) = (p0.clone(), m0.clone(), v0.clone());
        reference::adamw_step(&mut wp, &g, &mut wm, &mut wv, &hp);
        let mut want_ema = m0.clone();
        reference::ema_update(&mut want_ema, &p0, 0.99);
        let want_sum = reference::sum_squares(&g);
        for isa in tiers() {
            let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
            adamw(isa, &pool, &mut p, &g, &mut m, &mut v, &hp);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&p), bits(&wp), "{isa}: adamw params");
            assert_eq!(bits(&m), bits(&wm), "{isa}: adamw m");
            assert_eq!(bits(&v), bits(&wv), "{isa}: adamw v");
            let mut e = m0.clone();
            ema(isa, &pool, &mut e, &p0, 0.99);
            assert_eq!(bits(&e), bits(&want_ema), "{isa}: ema");
            let sum = sum_squares(isa, &pool, &g);
            assert!(
                (sum - want_sum).abs() <= 1e-12 * want_sum,
                "{isa}: sum of squares {sum} vs {want_sum}"
            );
        }
    }
}
