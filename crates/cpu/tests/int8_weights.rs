//! `--weights int8` through the backend, at every tier this machine has: a product of 1 to 4
//! rows reads the weight's int8 copy (`int8.rs`), held to the reference backend's product on
//! the same weights rounded through the same int8 groups (`quant::round_trip_groups` is
//! what the loader does), and the copy follows a write to the weight. Products of many rows
//! are unchanged (the tier's GEMM).
//!
//! Tolerance: the weights are the same values on both sides, so the difference is the
//! inputs' rounding to int8 codes, at most half a step (max |x_g| / 254) per value of each
//! group `g`: |Σ w·(x − x̂)| ≤ Σ_g max|x_g| / 254 · Σ_{k∈g} |w_k|. The test allows that bound
//! plus 1e-5 of Σ|w·x| for f32 summation, and checks the bound is not loose by requiring the
//! error to be nonzero somewhere (the inputs are not on the int8 grid).

use kiln_core::backend::{Backend, DType, MatmulShape, View};
use kiln_core::cpu::{self, Isa};
use kiln_cpu::{CpuBackend, Precision};
use kiln_reference::ReferenceBackend;

fn values(len: usize, seed: u32) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

/// `rows × in_dim` inputs through `w` on `be`, as host values.
fn product<B: Backend>(be: &B, w: &[f32], x: &[f32], s: MatmulShape) -> Vec<f32> {
    let weight = be.alloc(w.len(), DType::F32).unwrap();
    be.upload(View::whole(&weight), w).unwrap();
    product_on(be, View::whole(&weight), x, s)
}

fn product_on<B: Backend>(be: &B, weight: View<B>, x: &[f32], s: MatmulShape) -> Vec<f32> {
    let xm = be.alloc(x.len(), DType::F32).unwrap();
    be.upload(View::whole(&xm), x).unwrap();
    let out = be.alloc(s.rows * s.out_dim, DType::F32).unwrap();
    be.matmul_forward(View::whole(&out), View::whole(&xm), weight, s);
    let mut host = vec![0.0; s.rows * s.out_dim];
    be.download(View::whole(&out), &mut host).unwrap();
    host
}

/// The weight rounded through int8 groups as the loader rounds it (one matrix).
fn rounded(w: &[f32], cols: usize) -> Vec<f32> {
    let group = kiln_core::quant::int8_group(&[cols]).expect("a group");
    let (codes, scales) = kiln_core::quant::quantize_groups(w, group);
    codes
        .iter()
        .enumerate()
        .map(|(i, &c)| c as f32 * scales[i / group])
        .collect()
}

/// Checks `got` against the reference on the same (rounded) weights within the bound of the
/// module docs; returns the largest error.
fn check(got: &[f32], want: &[f32], w: &[f32], x: &[f32], s: MatmulShape, what: &str) -> f64 {
    let group = if s.in_dim % 64 == 0 { 64 } else { 32 };
    let k = s.in_dim;
    let mut largest = 0f64;
    for r in 0..s.rows {
        let xr = &x[r * k..(r + 1) * k];
        for j in 0..s.out_dim {
            let wj = &w[j * k..(j + 1) * k];
            let bound: f64 = xr
                .chunks(group)
                .zip(wj.chunks(group))
                .map(|(xg, wg)| {
                    let max = xg.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                    max / 254.0 * wg.iter().map(|v| v.abs() as f64).sum::<f64>()
                })
                .sum();
            let size: f64 = xr.iter().zip(wj).map(|(a, b)| (a * b).abs() as f64).sum();
            let (g, t) = (
                got[r * s.out_dim + j] as f64,
                want[r * s.out_dim + j] as f64,
            );
            let err = (g - t).abs();
            assert!(
                err <= bound + 1e-5 * size,
                "{what} [{r}, {j}]: {g} vs {t} (bound {bound:.3e})"
            );
            largest = largest.max(err);
        }
    }
    largest
}

#[test]
fn int8_decoding_products_match_the_reference_at_every_tier() {
    // Rows of 288 (groups of 32, a ragged 64-byte step, as stories15M) and 256 (groups of
    // 64); out_dim not a multiple of the kernel's 4-row blocks.
    for (in_dim, out_dim) in [(288, 70), (256, 37)] {
        let w = rounded(&values(out_dim * in_dim, 1), in_dim);
        for isa in Isa::ALL {
            if let Some(why) = cpu::features().missing(isa) {
                println!("tier {isa} skipped: {why}");
                continue;
            }
            let precision = Precision::default_for(isa);
            let be = CpuBackend::with(isa, precision, 2)
                .unwrap()
                .with_int8_weights();
            for rows in 1..=4 {
                let s = MatmulShape {
                    rows,
                    in_dim,
                    out_dim,
                };
                let x = values(rows * in_dim, 2 + rows as u32);
                let want = product(&ReferenceBackend, &w, &x, s);
                let got = product(&be, &w, &x, s);
                let what = format!("{isa} {in_dim}×{out_dim}, {rows} rows");
                let largest = check(&got, &want, &w, &x, s, &what);
                assert!(largest > 0.0, "{what}: no rounding of the inputs seen");
            }
            // The copy follows a write to the weight.
            let s = MatmulShape {
                rows: 1,
                in_dim,
                out_dim,
            };
            let x = values(in_dim, 9);
            let weight = be.alloc(w.len(), DType::F32).unwrap();
            be.upload(View::whole(&weight), &w).unwrap();
            product_on(&be, View::whole(&weight), &x, s);
            let w2 = rounded(&values(w.len(), 10), in_dim);
            be.upload(View::whole(&weight), &w2).unwrap();
            let got = product_on(&be, View::whole(&weight), &x, s);
            let want = product(&ReferenceBackend, &w2, &x, s);
            check(&got, &want, &w2, &x, s, &format!("{isa} after an upload"));
        }
    }
}
