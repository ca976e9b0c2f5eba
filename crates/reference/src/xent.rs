//! Softmax cross-entropy over the vocabulary, one row per position.

use rayon::prelude::*;

use crate::Real;

/// `losses[r] = logsumexp(logits[r]) − logits[r][target[r]]`; saves the logsumexp.
pub fn cross_entropy_forward<T: Real>(
    losses: &mut [T],
    logsumexp: &mut [T],
    logits: &[T],
    targets: &[u32],
    vocab: usize,
) {
    assert_eq!(logits.len(), targets.len() * vocab);
    losses
        .par_iter_mut()
        .zip(logsumexp.par_iter_mut())
        .zip(logits.par_chunks(vocab).zip(targets.par_iter()))
        .for_each(|((loss, lse), (row, &target))| {
            assert!(
                (target as usize) < vocab,
                "target {target} out of vocabulary {vocab}"
            );
            let max = row.iter().copied().fold(T::neg_infinity(), T::max);
            let sum = row
                .iter()
                .map(|&z| (z - max).exp())
                .fold(T::zero(), |a, b| a + b);
            *lse = max + sum.ln();
            *loss = *lse - row[target as usize];
        });
}

/// `dlogits[r] = (softmax(logits[r]) − onehot(target[r])) · dloss`.
pub fn cross_entropy_backward<T: Real>(
    dlogits: &mut [T],
    logits: &[T],
    logsumexp: &[T],
    targets: &[u32],
    vocab: usize,
    dloss: T,
) {
    dlogits
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(logsumexp.par_iter().zip(targets.par_iter()))
        .for_each(|((dz, z), (&lse, &target))| {
            for (d, &z) in dz.iter_mut().zip(z) {
                *d = (z - lse).exp() * dloss;
            }
            dz[target as usize] -= dloss;
        });
}
