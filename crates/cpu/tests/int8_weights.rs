//! `--weights int8` through the backend, at every tier this machine has: products of 1 to 4
//! rows (`int8.rs`) and of many (`int8_gemm.rs`) read the weight's int8 copy, held to the
//! reference backend's product on the same weights rounded through the same int8 groups
//! (`quant::round_trip_groups` is what the loader does), and the copy follows a write to the
//! weight.
//!
//! Tolerance: the weights are the same values on both sides, so the difference is the
//! inputs' rounding to int8 codes, at most half a step (max |x_g| / 254) per value of each
//! group `g`: |Σ w·(x − x̂)| ≤ Σ_g max|x_g| / 254 · Σ_{k∈g} |w_k|. The test allows that bound
//! plus 1e-5 of Σ|w·x| for f32 summation, and checks the bound is not loose by requiring the
//! error to be nonzero somewhere (the inputs are not on the int8 grid).

use kiln_conformance::test_values as values;
use kiln_core::backend::{Backend, DType, MatmulShape, View};
use kiln_core::cpu::{self, Isa};
use kiln_cpu::{CpuBackend, Precision};
use kiln_reference::ReferenceBackend;

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
    let group = if s.in_dim.is_multiple_of(64) { 64 } else { 32 };
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
            for rows in [1, 2, 3, 4, 37, 100] {
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
            // The copy (and the many rows' panels made from it) follows a write to the
            // weight.
            for rows in [1, 37] {
                let s = MatmulShape {
                    rows,
                    in_dim,
                    out_dim,
                };
                let x = values(rows * in_dim, 9);
                let weight = be.alloc(w.len(), DType::F32).unwrap();
                be.upload(View::whole(&weight), &w).unwrap();
                product_on(&be, View::whole(&weight), &x, s);
                let w2 = rounded(&values(w.len(), 10), in_dim);
                be.upload(View::whole(&weight), &w2).unwrap();
                let got = product_on(&be, View::whole(&weight), &x, s);
                let want = product(&ReferenceBackend, &w2, &x, s);
                let what = format!("{isa} {rows} rows after an upload");
                check(&got, &want, &w2, &x, s, &what);
            }
        }
    }
}

/// A packed artifact's codes given to the backend (`take_int_codes`: ternary in groups of 128,
/// int6 with a scale per row) are what products of few rows and of many read: the product matches the reference's on
/// the values the codes stand for (the bound above), even though the backend's own int8
/// groups of the same values would differ (int6 codes re-quantized to int8 are not exact).
/// Codes the kernels cannot run are declined.
#[test]
fn given_codes_are_decoded_as_given() {
    use kiln_core::backend::IntCodes;
    let (in_dim, out_dim) = (256, 37);
    let ternary: Vec<i8> = (0..out_dim * in_dim)
        .map(|i| (i * 7 % 3) as i8 - 1)
        .collect();
    let int6: Vec<i8> = (0..out_dim * in_dim)
        .map(|i| (i * 13 % 63) as i8 - 31)
        .collect();
    let cases = [
        (
            "ternary",
            &ternary,
            128,
            (0..out_dim * 2)
                .map(|g| 0.01 + g as f32 * 1e-3)
                .collect::<Vec<_>>(),
        ),
        (
            "int6",
            &int6,
            in_dim,
            (0..out_dim).map(|r| 0.002 + r as f32 * 1e-4).collect(),
        ),
    ];
    for isa in Isa::ALL {
        if cpu::features().missing(isa).is_some() {
            continue;
        }
        let be = CpuBackend::with(isa, Precision::default_for(isa), 2)
            .unwrap()
            .with_int8_weights();
        for (name, codes, group, scales) in &cases {
            let w: Vec<f32> = codes
                .iter()
                .enumerate()
                .map(|(i, &c)| c as f32 * scales[i / group])
                .collect();
            let weight = be.alloc(w.len(), DType::F32).unwrap();
            be.upload(View::whole(&weight), &w).unwrap();
            let offer = IntCodes {
                rows: out_dim,
                cols: in_dim,
                group: *group,
                codes,
                scales,
            };
            assert!(be.take_int_codes(View::whole(&weight), &offer), "{name}");
            // Decoding's few rows and evaluation's many.
            for rows in [2, 37] {
                let s = MatmulShape {
                    rows,
                    in_dim,
                    out_dim,
                };
                let x = values(rows * in_dim, 21);
                let got = product_on(&be, View::whole(&weight), &x, s);
                let want = product(&ReferenceBackend, &w, &x, s);
                check(&got, &want, &w, &x, s, &format!("{isa} {name} {rows} rows"));
                // int6: the backend's own groups of 64 would round these values differently,
                // so matching within the bound alone does not show the codes were used; the
                // exact int8 formula on the given codes does.
                let exact = product_of_codes(codes, scales, *group, &x, s);
                let off = got
                    .iter()
                    .zip(&exact)
                    .map(|(g, e)| (g - e).abs() as f64)
                    .fold(0.0, f64::max);
                let size = exact.iter().map(|e| e.abs() as f64).fold(0.0, f64::max);
                assert!(
                    off <= 1e-5 * size,
                    "{isa} {name} {rows} rows: {off} from the given codes' product"
                );
            }
        }
        let weight = be.alloc(64, DType::F32).unwrap();
        let declined = IntCodes {
            rows: 1,
            cols: 64,
            group: 48,
            codes: &[0; 64],
            scales: &[1.0],
        };
        assert!(!be.take_int_codes(View::whole(&weight), &declined));
    }
}

/// runq.c's formula on given codes: the inputs quantized in groups of 64 (32 for groups not a
/// multiple of 64), integer sums per 32 values, scaled by both scales.
fn product_of_codes(
    codes: &[i8],
    scales: &[f32],
    group: usize,
    x: &[f32],
    s: MatmulShape,
) -> Vec<f32> {
    let k = s.in_dim;
    let xg = if group.is_multiple_of(64) { 64 } else { 32 };
    let mut out = vec![0f32; s.rows * s.out_dim];
    for r in 0..s.rows {
        let xr = &x[r * k..(r + 1) * k];
        let mut xq = vec![0i32; k];
        let mut xs = vec![0f32; k / xg];
        for (g, chunk) in xr.chunks(xg).enumerate() {
            let max = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            xs[g] = max / 127.0;
            for (i, &v) in chunk.iter().enumerate() {
                xq[g * xg + i] = if max > 0.0 {
                    (v / xs[g]).round() as i32
                } else {
                    0
                };
            }
        }
        for j in 0..s.out_dim {
            let mut sum = 0f64;
            for h in 0..k / 32 {
                let dot: i32 = (h * 32..(h + 1) * 32)
                    .map(|p| xq[p] * codes[j * k + p] as i32)
                    .sum();
                let ws = scales[(j * k + h * 32) / group];
                sum += dot as f64 * ws as f64 * xs[h * 32 / xg] as f64;
            }
            out[r * s.out_dim + j] = sum as f32;
        }
    }
    out
}
