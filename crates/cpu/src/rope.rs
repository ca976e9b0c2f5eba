//! Rotary position embedding, vectorized (the reference backend's `rope.rs` is the formula:
//! half-split pairs `i`, `i + R/2` of the first R = `rot_dims` dimensions of each head, angle
//! `t · θ^(−2i/R)`, the rest copied). The cos/sin tables are computed in f64 as the
//! reference computes them, once per shape, and kept; rows go out over the thread pool in blocks.
//! The backward is the inverse rotation. Accumulation rule: the output is overwritten.

use std::sync::Mutex;

use kiln_core::backend::RopeShape;
use kiln_core::cpu::Isa;

use crate::pool::ThreadPool;
use crate::shared::SharedMut;

/// cos/sin tables `(seq, R/2)` for one (start position, length, R, θ).
pub struct Tables {
    key: (usize, usize, usize, u32),
    cos: Vec<f32>,
    sin: Vec<f32>,
}

fn tables(s: &RopeShape) -> Tables {
    let half = s.rot_dims / 2;
    let theta = s.theta as f64;
    let (mut cos, mut sin) = (
        Vec::with_capacity(s.seq * half),
        Vec::with_capacity(s.seq * half),
    );
    for t in s.start_pos..s.start_pos + s.seq {
        for i in 0..half {
            let inv_freq = 1.0 / theta.powf((2 * i) as f64 / s.rot_dims as f64);
            let angle = t as f64 * inv_freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Tables {
        key: (s.start_pos, s.seq, s.rot_dims, s.theta.to_bits()),
        cos,
        sin,
    }
}

/// Rotates `inp (B, T, heads, D)` into `out`; `direction` 1 is the forward, −1 the inverse.
pub fn rotate(
    isa: Isa,
    pool: &ThreadPool,
    cache: &Mutex<Option<Tables>>,
    out: &mut [f32],
    inp: &[f32],
    s: RopeShape,
    direction: f32,
) {
    let row = s.heads * s.head_dim;
    assert_eq!(inp.len(), s.batch * s.seq * row, "rope: inp");
    assert_eq!(out.len(), inp.len(), "rope: out");
    assert!(
        s.rot_dims <= s.head_dim && s.rot_dims.is_multiple_of(2),
        "rope: rot_dims"
    );
    let mut cached = cache.lock().unwrap_or_else(|e| e.into_inner());
    let key = (s.start_pos, s.seq, s.rot_dims, s.theta.to_bits());
    if cached.as_ref().is_none_or(|t| t.key != key) {
        *cached = Some(tables(&s));
    }
    let t = cached.as_ref().expect("tables just made");
    let o = SharedMut::new(out);
    let rows = s.batch * s.seq;
    pool.run(rows.div_ceil(ROWS), &|block| {
        for bt in block * ROWS..((block + 1) * ROWS).min(rows) {
            // SAFETY: row bt of `out` is this task's alone; the tier was checked at start-up.
            unsafe {
                let y = o.slice(bt * row, row);
                let x = &inp[bt * row..(bt + 1) * row];
                let (pos, dir) = (bt % s.seq, direction);
                let job = RowJob {
                    y,
                    x,
                    t,
                    s,
                    pos,
                    dir,
                };
                match isa {
                    Isa::Avx2 => rotate_row_avx2(job),
                    _ => rotate_row_avx512(job),
                }
            }
        }
    });
}

/// Rows (positions) per task: one row of a small model is a few hundred values, too little
/// work to hand out alone.
const ROWS: usize = 16;

/// One row's rotation: the output and input row, the tables, the shape, the position and
/// the direction.
struct RowJob<'a> {
    y: &'a mut [f32],
    x: &'a [f32],
    t: &'a Tables,
    s: RopeShape,
    pos: usize,
    dir: f32,
}

#[target_feature(enable = "avx512f,avx512vl,fma")]
unsafe fn rotate_row_avx512(job: RowJob) {
    rotate_row(job)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn rotate_row_avx2(job: RowJob) {
    rotate_row(job)
}

/// One (batch, position) row of every head; inlined into the tier's wrapper, whose target
/// features let the pair loop vectorize.
#[inline(always)]
fn rotate_row(
    RowJob {
        y,
        x,
        t,
        s,
        pos,
        dir,
    }: RowJob,
) {
    let half = s.rot_dims / 2;
    let (cos, sin) = (&t.cos[pos * half..][..half], &t.sin[pos * half..][..half]);
    for (yh, xh) in y
        .chunks_exact_mut(s.head_dim)
        .zip(x.chunks_exact(s.head_dim))
    {
        let (ya, rest) = yh.split_at_mut(half);
        let (yb, ypass) = rest.split_at_mut(half);
        let (xa, xb) = (&xh[..half], &xh[half..s.rot_dims]);
        for i in 0..half {
            let (c, sn) = (cos[i], sin[i] * dir);
            ya[i] = xa[i] * c - xb[i] * sn;
            yb[i] = xb[i] * c + xa[i] * sn;
        }
        ypass.copy_from_slice(&xh[s.rot_dims..]);
    }
}
