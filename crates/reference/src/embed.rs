//! Token embedding lookup and its scatter-add backward.

use crate::Real;

/// `out (N, dim) = table (V, dim)[tokens]`.
pub fn embedding_forward<T: Real>(out: &mut [T], table: &[T], tokens: &[u32], dim: usize) {
    assert_eq!(out.len(), tokens.len() * dim);
    let vocab = table.len() / dim;
    for (row, &token) in out.chunks_exact_mut(dim).zip(tokens) {
        let token = token as usize;
        assert!(token < vocab, "token id {token} out of vocabulary {vocab}");
        row.copy_from_slice(&table[token * dim..(token + 1) * dim]);
    }
}

/// `dtable[tokens[i]] += dout[i]` (serial: the same token may repeat).
pub fn embedding_backward<T: Real>(dtable: &mut [T], dout: &[T], tokens: &[u32], dim: usize) {
    assert_eq!(dout.len(), tokens.len() * dim);
    for (row, &token) in dout.chunks_exact(dim).zip(tokens) {
        let token = token as usize;
        for (d, &g) in dtable[token * dim..(token + 1) * dim].iter_mut().zip(row) {
            *d += g;
        }
    }
}
