//! SwiGLU gate: `silu(gate) · up`, with `silu(x) = x · σ(x)`.

use rayon::prelude::*;

use crate::Real;

fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

pub fn swiglu_forward<T: Real>(out: &mut [T], gate: &[T], up: &[T]) {
    out.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(y, (&g, &u))| *y = g * sigmoid(g) * u);
}

/// `dup = dout · silu(g)`, `dgate = dout · u · σ(g) · (1 + g · (1 − σ(g)))`.
pub fn swiglu_backward<T: Real>(dgate: &mut [T], dup: &mut [T], dout: &[T], gate: &[T], up: &[T]) {
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .zip(dout.par_iter().zip(gate.par_iter().zip(up.par_iter())))
        .for_each(|((dg, du), (&dy, (&g, &u)))| {
            let s = sigmoid(g);
            *du = dy * g * s;
            *dg = dy * u * s * (T::one() + g * (T::one() - s));
        });
}

/// `out = a + b` (the residual add; its backward is the identity, see the backend docs).
pub fn residual_forward<T: Real>(out: &mut [T], a: &[T], b: &[T]) {
    out.par_iter_mut()
        .zip(a.par_iter().zip(b.par_iter()))
        .for_each(|(y, (&a, &b))| *y = a + b);
}

/// `out += inp`.
pub fn accumulate<T: Real>(out: &mut [T], inp: &[T]) {
    out.par_iter_mut()
        .zip(inp.par_iter())
        .for_each(|(y, &x)| *y += x);
}
