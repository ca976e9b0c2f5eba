//! Exclusive self attention (XSA): each attention output row, per query head, loses its
//! component along its own token's value vector (of the head's kv group), as the
//! parameter-golf records' `_xsa_efficient` computes it: `z = y − (y·v̂) v̂` with
//! `v̂ = v / max(‖v‖, 1e-12)` (`F.normalize`).

use rayon::prelude::*;

use crate::Real;

/// The normalized value and its norm's inverse (0 for a value whose norm is at the floor,
/// whose direction then carries no gradient).
fn unit<T: Real>(v: &[T]) -> (Vec<T>, T) {
    let norm = v.iter().fold(T::zero(), |s, &x| s + x * x).sqrt();
    let floor = T::from_f64(1e-12).unwrap();
    let inv = T::one() / norm.max(floor);
    let active = if norm > floor { inv } else { T::zero() };
    (v.iter().map(|&x| x * inv).collect(), active)
}

/// `out (rows, heads·d) = y − (y·v̂) v̂` per row and head, `v (rows, kv_heads·d)`; query head
/// h reads kv head `h / (heads / kv_heads)`.
pub fn xsa_forward<T: Real>(
    out: &mut [T],
    y: &[T],
    v: &[T],
    (heads, kv_heads, d): (usize, usize, usize),
) {
    let group = heads / kv_heads;
    out.par_chunks_mut(heads * d)
        .zip(y.par_chunks(heads * d).zip(v.par_chunks(kv_heads * d)))
        .for_each(|(out, (y, v))| {
            for kv in 0..kv_heads {
                let (u, _) = unit(&v[kv * d..(kv + 1) * d]);
                for h in kv * group..(kv + 1) * group {
                    let (yh, oh) = (&y[h * d..(h + 1) * d], &mut out[h * d..(h + 1) * d]);
                    let p = yh.iter().zip(&u).fold(T::zero(), |s, (&a, &b)| s + a * b);
                    for i in 0..d {
                        oh[i] = yh[i] - p * u[i];
                    }
                }
            }
        });
}

/// The backward of [`xsa_forward`]: `dy = dz − (dz·v̂) v̂` (overwritten), and
/// `dv = (g − v̂ (v̂·g)) / ‖v‖` with `g = −Σ_heads ((dz·v̂) y + (y·v̂) dz)` (overwritten).
pub fn xsa_backward<T: Real>(
    dy: &mut [T],
    dv: &mut [T],
    dz: &[T],
    y: &[T],
    v: &[T],
    (heads, kv_heads, d): (usize, usize, usize),
) {
    let group = heads / kv_heads;
    dy.par_chunks_mut(heads * d)
        .zip(dv.par_chunks_mut(kv_heads * d))
        .zip(dz.par_chunks(heads * d).zip(y.par_chunks(heads * d)))
        .zip(v.par_chunks(kv_heads * d))
        .for_each(|(((dy, dv), (dz, y)), v)| {
            for kv in 0..kv_heads {
                let (u, inv) = unit(&v[kv * d..(kv + 1) * d]);
                let mut g = vec![T::zero(); d];
                for h in kv * group..(kv + 1) * group {
                    let (yh, dzh) = (&y[h * d..(h + 1) * d], &dz[h * d..(h + 1) * d]);
                    let p = yh.iter().zip(&u).fold(T::zero(), |s, (&a, &b)| s + a * b);
                    let q = dzh.iter().zip(&u).fold(T::zero(), |s, (&a, &b)| s + a * b);
                    for i in 0..d {
                        dy[h * d + i] = dzh[i] - q * u[i];
                        g[i] -= q * yh[i] + p * dzh[i];
                    }
                }
                let r = g.iter().zip(&u).fold(T::zero(), |s, (&a, &b)| s + a * b);
                for i in 0..d {
                    dv[kv * d + i] = (g[i] - r * u[i]) * inv;
                }
            }
        });
}
