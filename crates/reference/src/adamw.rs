//! AdamW (Loshchilov & Hutter), written to match `torch.optim.AdamW` operation for operation:
//! `p ← p·(1 − lr·wd)`, then `p ← p − lr/bc1 · m / (sqrt(v)/sqrt(bc2) + eps)`.

use rayon::prelude::*;

use crate::Real;
use kiln_core::backend::AdamWStep;

pub fn adamw_step<T: Real>(
    params: &mut [T],
    grads: &[T],
    m: &mut [T],
    v: &mut [T],
    hp: &AdamWStep,
) {
    let f = |x: f32| T::from_f32(x).unwrap();
    let (lr, beta1, beta2, eps, wd, scale) = (
        f(hp.learning_rate),
        f(hp.beta1),
        f(hp.beta2),
        f(hp.eps),
        f(hp.weight_decay),
        f(hp.grad_scale),
    );
    let bias1 = T::one() - beta1.powi(hp.step as i32);
    let bias2_sqrt = (T::one() - beta2.powi(hp.step as i32)).sqrt();
    let decay = T::one() - lr * wd;
    params
        .par_iter_mut()
        .zip(grads.par_iter())
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .for_each(|((p, &g), (m, v))| {
            let g = g * scale;
            *m = beta1 * *m + (T::one() - beta1) * g;
            *v = beta2 * *v + (T::one() - beta2) * g * g;
            *p = *p * decay - lr / bias1 * *m / (v.sqrt() / bias2_sqrt + eps);
        });
}

/// Σ x², accumulated in f64 over fixed chunks summed in order, so the result does not depend
/// on how rayon splits the work (the norm feeds clipping; resume must be bit-exact).
pub fn sum_squares<T: Real>(x: &[T]) -> f64 {
    const CHUNK: usize = 1 << 14;
    let partial: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| v.to_f64().unwrap().powi(2)).sum())
        .collect();
    partial.iter().sum()
}

/// `ema ← decay·ema + (1 − decay)·params`, as `torch.lerp(ema, params, 1 − decay)`.
pub fn ema_update<T: Real>(ema: &mut [T], params: &[T], decay: f32) {
    let d = T::from_f32(decay).unwrap();
    ema.par_iter_mut()
        .zip(params.par_iter())
        .for_each(|(e, &p)| *e = d * *e + (T::one() - d) * p);
}
