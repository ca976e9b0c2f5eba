//! Rotary position embedding, half-split pairing (Hugging Face `rotate_half`): dimension `i`
//! of a head rotates with dimension `i + D/2` by angle `t · θ^(−2i/D)`. llama2.c pairs
//! neighbours (`2i`, `2i+1`) instead; its q/k weights are permuted on import and export.
//!
//! Partial RoPE rotates only the first `R` (`rot_dims`) dimensions of each head, as a head of
//! width `R` (pairs `i`, `i + R/2`, angle `t · θ^(−2i/R)`); dimensions `R..D` pass through.

use rayon::prelude::*;

use crate::Real;

/// `(cos, sin)` tables of shape `(seq, D/2)` for positions `start_pos..start_pos + seq`,
/// computed in f64.
fn tables<T: Real>(start_pos: usize, seq: usize, rot_dims: usize, theta: f64) -> (Vec<T>, Vec<T>) {
    let half = rot_dims / 2;
    let mut cos = Vec::with_capacity(seq * half);
    let mut sin = Vec::with_capacity(seq * half);
    for t in start_pos..start_pos + seq {
        for i in 0..half {
            let inv_freq = 1.0 / theta.powf((2 * i) as f64 / rot_dims as f64);
            let angle = t as f64 * inv_freq;
            cos.push(T::from_f64(angle.cos()).unwrap());
            sin.push(T::from_f64(angle.sin()).unwrap());
        }
    }
    (cos, sin)
}

/// Rotates `inp (B, T, heads, D)` into `out`; `direction` +1 is the forward rotation, −1 its
/// inverse (the backward, since the rotation is orthogonal).
#[allow(clippy::too_many_arguments)]
fn rotate<T: Real>(
    out: &mut [T],
    inp: &[T],
    start_pos: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    rot_dims: usize,
    theta: f64,
    direction: T,
) {
    assert_eq!(out.len(), inp.len());
    assert!(
        rot_dims <= head_dim && rot_dims % 2 == 0,
        "rope: bad rot_dims {rot_dims}"
    );
    let half = rot_dims / 2;
    let (cos, sin) = tables::<T>(start_pos, seq, rot_dims, theta);
    let row = heads * head_dim;
    out.par_chunks_mut(row)
        .zip(inp.par_chunks(row))
        .enumerate()
        .for_each(|(bt, (y, x))| {
            let t = bt % seq;
            for h in 0..heads {
                let base = h * head_dim;
                for i in 0..half {
                    let c = cos[t * half + i];
                    let s = sin[t * half + i] * direction;
                    let a = x[base + i];
                    let b = x[base + i + half];
                    y[base + i] = a * c - b * s;
                    y[base + i + half] = b * c + a * s;
                }
                y[base + rot_dims..base + head_dim]
                    .copy_from_slice(&x[base + rot_dims..base + head_dim]);
            }
        });
}

pub fn rope_forward<T: Real>(
    out: &mut [T],
    inp: &[T],
    start_pos: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    rot_dims: usize,
    theta: f64,
) {
    rotate(
        out,
        inp,
        start_pos,
        seq,
        heads,
        head_dim,
        rot_dims,
        theta,
        T::one(),
    );
}

pub fn rope_backward<T: Real>(
    dinp: &mut [T],
    dout: &[T],
    seq: usize,
    heads: usize,
    head_dim: usize,
    rot_dims: usize,
    theta: f64,
) {
    rotate(
        dinp,
        dout,
        0,
        seq,
        heads,
        head_dim,
        rot_dims,
        theta,
        -T::one(),
    );
}
