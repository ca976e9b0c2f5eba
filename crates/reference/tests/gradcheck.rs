//! Finite-difference gradient checks, in f64, of every reference kernel's backward.
//!
//! For a kernel `y = f(x)` and a fixed random cotangent `r`, the scalar `L = Σ r·y` has
//! `dL/dx = backward(dout = r)`. Each input element is nudged by ±h and the central difference
//! `(L(x+h) − L(x−h)) / 2h` compared with the analytic value.
//!
//! Tolerance `|analytic − numeric| <= 1e-7 + 1e-6·|numeric|`: with h = 1e-5 in f64 the
//! truncation error is O(h²) ≈ 1e-10 and the rounding error ≈ 1e-16·|L|/h ≈ 1e-10, so a
//! correct backward passes by three orders of magnitude and a wrong term fails by many.
//! The residual add has no backward kernel (its gradient is the identity, realised by the
//! model's accumulation into the residual-stream gradient), so it has no check here.

use kiln_core::backend::Accumulate;
use kiln_reference::activation::{
    gate_backward, gate_forward, relu2_backward, relu2_forward, softcap_backward, softcap_forward,
};
use kiln_reference::attention::{attention_backward, attention_forward, AttentionShape};
use kiln_reference::embed::{embedding_backward, embedding_forward};
use kiln_reference::matmul::{matmul_backward, matmul_forward};
use kiln_reference::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use kiln_reference::rope::{rope_backward, rope_forward};
use kiln_reference::scale::{scale_backward, scale_forward};
use kiln_reference::swiglu::{swiglu_backward, swiglu_forward};
use kiln_reference::xent::{cross_entropy_backward, cross_entropy_forward};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const H: f64 = 1e-5;

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compares `analytic` with central differences of `loss` with respect to `x`.
fn check(what: &str, x: &[f64], analytic: &[f64], loss: impl Fn(&[f64]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let mut nudged = x.to_vec();
    for i in 0..x.len() {
        nudged[i] = x[i] + H;
        let up = loss(&nudged);
        nudged[i] = x[i] - H;
        let down = loss(&nudged);
        nudged[i] = x[i];
        let numeric = (up - down) / (2.0 * H);
        let diff = (analytic[i] - numeric).abs();
        assert!(
            diff <= 1e-7 + 1e-6 * numeric.abs(),
            "{what}[{i}]: analytic {} vs finite difference {numeric} (|diff| {diff:.2e})",
            analytic[i]
        );
    }
}

#[test]
fn matmul_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (rows, in_dim, out_dim) = (3, 5, 4);
    let inp = random(&mut rng, rows * in_dim);
    let weight = random(&mut rng, out_dim * in_dim);
    let r = random(&mut rng, rows * out_dim);
    let loss = |inp: &[f64], weight: &[f64]| {
        let mut out = vec![0.0; rows * out_dim];
        matmul_forward(&mut out, inp, weight, rows, in_dim, out_dim);
        dot(&out, &r)
    };
    let (mut dinp, mut dweight) = (vec![0.0; inp.len()], vec![0.0; weight.len()]);
    matmul_backward(
        &mut dinp,
        &mut dweight,
        &r,
        &inp,
        &weight,
        rows,
        in_dim,
        out_dim,
        Accumulate::Overwrite,
    );
    check("matmul dinp", &inp, &dinp, |x| loss(x, &weight));
    check("matmul dweight", &weight, &dweight, |w| loss(&inp, w));
}

#[test]
fn embedding_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (vocab, dim) = (6, 4);
    let tokens = [1u32, 4, 1, 0]; // a repeated id: its rows' gradients must add
    let table = random(&mut rng, vocab * dim);
    let r = random(&mut rng, tokens.len() * dim);
    let mut dtable = vec![0.0; table.len()];
    embedding_backward(&mut dtable, &r, &tokens, dim);
    check("embedding dtable", &table, &dtable, |t| {
        let mut out = vec![0.0; tokens.len() * dim];
        embedding_forward(&mut out, t, &tokens, dim);
        dot(&out, &r)
    });
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (rows, dim, eps) = (3, 7, 1e-5);
    let inp = random(&mut rng, rows * dim);
    let weight = random(&mut rng, dim);
    let r = random(&mut rng, rows * dim);
    let loss = |inp: &[f64], weight: &[f64]| {
        let (mut out, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
        rmsnorm_forward(&mut out, &mut rstd, inp, weight, dim, eps);
        dot(&out, &r)
    };
    let (mut out, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
    rmsnorm_forward(&mut out, &mut rstd, &inp, &weight, dim, eps);
    let (mut dinp, mut dweight) = (vec![0.0; inp.len()], vec![0.0; dim]);
    rmsnorm_backward(
        &mut dinp,
        &mut dweight,
        &r,
        &inp,
        &weight,
        &rstd,
        dim,
        Accumulate::Overwrite,
    );
    check("rmsnorm dinp", &inp, &dinp, |x| loss(x, &weight));
    check("rmsnorm dweight", &weight, &dweight, |w| loss(&inp, w));
}

#[test]
fn rope_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (batch, seq, heads, head_dim, theta) = (2, 5, 2, 6, 10000.0);
    let inp = random(&mut rng, batch * seq * heads * head_dim);
    let r = random(&mut rng, inp.len());
    let mut dinp = vec![0.0; inp.len()];
    // Whole heads, and partial RoPE rotating only the first 4 of 6 dimensions.
    for rot in [head_dim, 4] {
        rope_backward(&mut dinp, &r, seq, heads, head_dim, rot, theta);
        check(&format!("rope dinp rot {rot}"), &inp, &dinp, |x| {
            let mut out = vec![0.0; x.len()];
            rope_forward(&mut out, x, 0, seq, heads, head_dim, rot, theta);
            dot(&out, &r)
        });
    }
}

#[test]
fn partial_rope_leaves_the_unrotated_dimensions_alone() {
    let (seq, heads, head_dim, rot) = (3, 2, 8, 4);
    let inp: Vec<f64> = (0..seq * heads * head_dim)
        .map(|i| i as f64 + 1.0)
        .collect();
    let mut out = vec![0.0; inp.len()];
    rope_forward(&mut out, &inp, 5, seq, heads, head_dim, rot, 10000.0);
    for (row_out, row_in) in out.chunks(head_dim).zip(inp.chunks(head_dim)) {
        assert_eq!(row_out[rot..], row_in[rot..]);
        assert_ne!(row_out[..rot], row_in[..rot]);
    }
}

/// Exclusive self attention, with respect to the attention output and the values, at a GQA
/// shape (three query heads per kv head).
#[test]
fn xsa_backward_matches_finite_differences() {
    use kiln_reference::xsa::{xsa_backward, xsa_forward};
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let (rows, heads, kv, d) = (4, 6, 2, 5);
    let dims = (heads, kv, d);
    let (y, v) = (
        random(&mut rng, rows * heads * d),
        random(&mut rng, rows * kv * d),
    );
    let r = random(&mut rng, rows * heads * d);
    let (mut dy, mut dv) = (vec![0.0; y.len()], vec![0.0; v.len()]);
    xsa_backward(&mut dy, &mut dv, &r, &y, &v, dims);
    let loss = |y: &[f64], v: &[f64]| {
        let mut out = vec![0.0; y.len()];
        xsa_forward(&mut out, y, v, dims);
        dot(&out, &r)
    };
    check("xsa, attention output", &y, &dy, |x| loss(x, &v));
    check("xsa, values", &v, &dv, |x| loss(&y, x));
}

/// EngramHash's gate, with respect to each of its two inputs.
#[test]
fn gate_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let (rows, dim, scale) = (5, 8, 1.0 / 8f64.sqrt());
    let (a, b) = (random(&mut rng, rows * dim), random(&mut rng, rows * dim));
    let a: Vec<f64> = a.iter().map(|x| x * 2.0).collect();
    let r = random(&mut rng, rows);
    let mut out = vec![0.0; rows];
    gate_forward(&mut out, &a, &b, dim, scale);
    let (mut da, mut db) = (vec![0.0; rows * dim], vec![0.0; rows * dim]);
    gate_backward(&mut da, &mut db, &r, &out, &a, &b, dim, scale);
    let loss = |x: &[f64], y: &[f64]| {
        let mut out = vec![0.0; rows];
        gate_forward(&mut out, x, y, dim, scale);
        dot(&out, &r)
    };
    check("gate, first input", &a, &da, |x| loss(x, &b));
    check("gate, second input", &b, &db, |y| loss(&a, y));
}

#[test]
fn relu2_and_softcap_backward_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let n = 40;
    let inp: Vec<f64> = random(&mut rng, n).iter().map(|x| x * 3.0).collect();
    let r = random(&mut rng, n);
    for slope in [0.0, 0.5] {
        let mut dinp = vec![0.0; n];
        relu2_backward(&mut dinp, &r, &inp, slope);
        check(&format!("relu2 slope {slope}"), &inp, &dinp, |x| {
            let mut out = vec![0.0; n];
            relu2_forward(&mut out, x, slope);
            dot(&out, &r)
        });
    }
    let cap = 2.0;
    let mut out = vec![0.0; n];
    softcap_forward(&mut out, &inp, cap);
    let mut dinp = vec![0.0; n];
    softcap_backward(&mut dinp, &r, &out, cap);
    check("softcap", &inp, &dinp, |x| {
        let mut out = vec![0.0; n];
        softcap_forward(&mut out, x, cap);
        dot(&out, &r)
    });
}

#[test]
fn scale_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for (rows, groups, inner) in [(4, 3, 1), (3, 2, 5)] {
        let inp = random(&mut rng, rows * groups * inner);
        let s = random(&mut rng, groups);
        let r = random(&mut rng, inp.len());
        let (mut dinp, mut ds) = (vec![0.0; inp.len()], vec![0.0; groups]);
        scale_backward(
            &mut dinp,
            &mut ds,
            &r,
            &inp,
            &s,
            inner,
            Accumulate::Overwrite,
        );
        let loss = |x: &[f64], s: &[f64]| {
            let mut out = vec![0.0; x.len()];
            scale_forward(&mut out, x, s, inner, Accumulate::Overwrite);
            dot(&out, &r)
        };
        check("scale dinp", &inp, &dinp, |x| loss(x, &s));
        check("scale ds", &s, &ds, |s| loss(&inp, s));
    }
}

#[test]
fn rope_pairs_dimension_i_with_i_plus_half() {
    // The documented convention (Hugging Face rotate_half): at position 1, a vector that is
    // 1 in dimension 0 rotates into dimension D/2, not dimension 1 (llama2.c's pairing).
    let (seq, heads, head_dim) = (2, 1, 8);
    let mut inp = vec![0.0; seq * head_dim];
    inp[head_dim] = 1.0; // position 1, dimension 0
    let mut out = vec![0.0; inp.len()];
    rope_forward(&mut out, &inp, 0, seq, heads, head_dim, head_dim, 10000.0);
    let angle: f64 = 1.0; // position 1 × frequency θ⁰
    assert!((out[head_dim] - angle.cos()).abs() < 1e-12);
    assert!((out[head_dim + head_dim / 2] - angle.sin()).abs() < 1e-12);
    assert_eq!(out[head_dim + 1], 0.0);
}

#[test]
fn attention_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let shape = AttentionShape {
        batch: 2,
        seq: 4,
        heads: 4,
        kv_heads: 2,
        head_dim: 3,
    };
    let n = shape.batch * shape.seq;
    let q = random(&mut rng, n * shape.heads * shape.head_dim);
    let k = random(&mut rng, n * shape.kv_heads * shape.head_dim);
    let v = random(&mut rng, n * shape.kv_heads * shape.head_dim);
    let r = random(&mut rng, q.len());
    let probs_len = shape.batch * shape.heads * shape.seq * shape.seq;
    let loss = |q: &[f64], k: &[f64], v: &[f64]| {
        let (mut out, mut probs) = (vec![0.0; q.len()], vec![0.0; probs_len]);
        attention_forward(&mut out, &mut probs, q, k, v, shape);
        dot(&out, &r)
    };
    let (mut out, mut probs) = (vec![0.0; q.len()], vec![0.0; probs_len]);
    attention_forward(&mut out, &mut probs, &q, &k, &v, shape);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    attention_backward(&mut dq, &mut dk, &mut dv, &r, &q, &k, &v, &probs, shape);
    check("attention dq", &q, &dq, |x| loss(x, &k, &v));
    check("attention dk", &k, &dk, |x| loss(&q, x, &v));
    check("attention dv", &v, &dv, |x| loss(&q, &k, x));
}

#[test]
fn attention_is_causal() {
    // Changing the last position's key and value must leave every earlier output unchanged.
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let shape = AttentionShape {
        batch: 1,
        seq: 5,
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
    };
    let q = random(&mut rng, 5 * 2 * 4);
    let mut k = random(&mut rng, 5 * 4);
    let mut v = random(&mut rng, 5 * 4);
    let run = |k: &[f64], v: &[f64]| {
        let (mut out, mut probs) = (vec![0.0; q.len()], vec![0.0; 2 * 25]);
        attention_forward(&mut out, &mut probs, &q, k, v, shape);
        out
    };
    let before = run(&k, &v);
    k[16..].iter_mut().for_each(|x| *x += 1.0);
    v[16..].iter_mut().for_each(|x| *x -= 1.0);
    let after = run(&k, &v);
    assert_eq!(before[..4 * 2 * 4], after[..4 * 2 * 4]);
    assert_ne!(before[4 * 2 * 4..], after[4 * 2 * 4..]);
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let n = 9;
    let gate: Vec<f64> = random(&mut rng, n).iter().map(|x| 4.0 * x).collect();
    let up = random(&mut rng, n);
    let r = random(&mut rng, n);
    let loss = |g: &[f64], u: &[f64]| {
        let mut out = vec![0.0; n];
        swiglu_forward(&mut out, g, u);
        dot(&out, &r)
    };
    let (mut dgate, mut dup) = (vec![0.0; n], vec![0.0; n]);
    swiglu_backward(&mut dgate, &mut dup, &r, &gate, &up);
    check("swiglu dgate", &gate, &dgate, |x| loss(x, &up));
    check("swiglu dup", &up, &dup, |x| loss(&gate, x));
}

#[test]
fn cross_entropy_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (rows, vocab, dloss) = (3, 7, 0.37);
    let targets = [2u32, 6, 0];
    let logits: Vec<f64> = random(&mut rng, rows * vocab)
        .iter()
        .map(|x| 3.0 * x)
        .collect();
    let loss = |z: &[f64]| {
        let (mut losses, mut lse) = (vec![0.0; rows], vec![0.0; rows]);
        cross_entropy_forward(&mut losses, &mut lse, z, &targets, vocab);
        dloss * losses.iter().sum::<f64>()
    };
    let (mut losses, mut lse) = (vec![0.0; rows], vec![0.0; rows]);
    cross_entropy_forward(&mut losses, &mut lse, &logits, &targets, vocab);
    let mut dlogits = vec![0.0; logits.len()];
    cross_entropy_backward(&mut dlogits, &logits, &lse, &targets, vocab, dloss);
    check("cross_entropy dlogits", &logits, &dlogits, loss);
}
