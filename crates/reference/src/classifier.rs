//! The classifier fused with the softmax cross-entropy, as the composition it stands for:
//! [`matmul`](crate::matmul), the soft cap ([`activation`](crate::activation)) and
//! [`xent`](crate::xent), a block of rows at a time, so the `(rows, vocab)` logits are never
//! all held at once.
//! Accumulation rule: `dweight +=`, `dinp` per the call's mode.

use kiln_core::backend::Accumulate;

use crate::{activation, matmul, xent, Real};

/// Rows per block: 64 rows of a 32000-token vocabulary are 8 MB of f32 logits.
const ROWS: usize = 64;

/// The logits of `rows` rows of `inp`: `out` holds the raw product, `capped` the soft-capped
/// values when there is a cap; returns the logits the softmax reads.
#[allow(clippy::too_many_arguments)]
fn logits<'a, T: Real>(
    raw: &'a mut [T],
    capped: &'a mut [T],
    inp: &[T],
    weight: &[T],
    rows: usize,
    dim: usize,
    vocab: usize,
    softcap: Option<T>,
) -> &'a [T] {
    matmul::matmul_forward(raw, inp, weight, rows, dim, vocab);
    match softcap {
        Some(cap) => {
            activation::softcap_forward(capped, raw, cap);
            capped
        }
        None => raw,
    }
}

/// `losses (rows)` and `logsumexp (rows)` of `softcap(inp (rows, dim) · weight (vocab, dim)ᵀ)`
/// against `targets (rows)`.
#[allow(clippy::too_many_arguments)]
pub fn classifier_loss_forward<T: Real>(
    losses: &mut [T],
    logsumexp: &mut [T],
    inp: &[T],
    weight: &[T],
    targets: &[u32],
    dim: usize,
    vocab: usize,
    softcap: Option<T>,
) {
    let rows = targets.len();
    assert_eq!(inp.len(), rows * dim, "classifier: inp");
    assert_eq!(weight.len(), vocab * dim, "classifier: weight");
    let block = ROWS.min(rows) * vocab;
    let (mut raw, mut capped) = (vec![T::zero(); block], vec![T::zero(); block]);
    for r0 in (0..rows).step_by(ROWS) {
        let n = ROWS.min(rows - r0);
        let z = logits(
            &mut raw[..n * vocab],
            &mut capped[..n * vocab],
            &inp[r0 * dim..(r0 + n) * dim],
            weight,
            n,
            dim,
            vocab,
            softcap,
        );
        let (l, s, t) = (r0..r0 + n, r0..r0 + n, &targets[r0..r0 + n]);
        xent::cross_entropy_forward(&mut losses[l], &mut logsumexp[s], z, t, vocab);
    }
}

/// The backward of [`classifier_loss_forward`] with each loss weighted by `dloss`:
/// `dinp =/+= dlogits · weight`, `dweight += dlogitsᵀ · inp`.
#[allow(clippy::too_many_arguments)]
pub fn classifier_loss_backward<T: Real>(
    dinp: &mut [T],
    dweight: &mut [T],
    inp: &[T],
    weight: &[T],
    logsumexp: &[T],
    targets: &[u32],
    dim: usize,
    vocab: usize,
    softcap: Option<T>,
    dloss: T,
    dinp_mode: Accumulate,
) {
    let rows = targets.len();
    assert_eq!(dinp.len(), rows * dim, "classifier: dinp");
    let block = ROWS.min(rows) * vocab;
    let (mut raw, mut capped) = (vec![T::zero(); block], vec![T::zero(); block]);
    let (mut dz, mut draw) = (vec![T::zero(); block], vec![T::zero(); block]);
    for r0 in (0..rows).step_by(ROWS) {
        let n = ROWS.min(rows - r0);
        let (span, len) = (r0 * dim..(r0 + n) * dim, n * vocab);
        let x = &inp[span.clone()];
        let z = logits(
            &mut raw[..len],
            &mut capped[..len],
            x,
            weight,
            n,
            dim,
            vocab,
            softcap,
        );
        let (s, t) = (&logsumexp[r0..r0 + n], &targets[r0..r0 + n]);
        xent::cross_entropy_backward(&mut dz[..len], z, s, t, vocab, dloss);
        let dlogits = match softcap {
            Some(cap) => {
                activation::softcap_backward(&mut draw[..len], &dz[..len], z, cap);
                &draw[..len]
            }
            None => &dz[..len],
        };
        let di = &mut dinp[span];
        matmul::matmul_backward(di, dweight, dlogits, x, weight, n, dim, vocab, dinp_mode);
    }
}
