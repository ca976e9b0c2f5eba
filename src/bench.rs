//! `kiln bench kernels`: the conformance suite's table of kernel cases
//! (`kiln_conformance::cases`), instantiated at a model's real shapes and timed, with each
//! case's GFLOP/s (compute-bound kernels) or GB/s (memory-bound ones) beside the matmul peak
//! measured in the same run. The same table is what the conformance suite checks, so every
//! timed kernel is a validated one. Release builds only give meaningful figures.
//!
//! Figures are printed and, with `--json`, written with the machine's description (CPU model,
//! features, tier, cores) and kiln's version, so results from different machines can be
//! compared.

use std::time::Instant;

use anyhow::Result;
use kiln_conformance::{cases, Dims, Placed, Work};
use kiln_core::backend::{Backend, DType, MatmulShape, View};
use kiln_core::config::ModelConfig;
use serde::Serialize;

use crate::machine::{describe, Machine};

/// Best of `reps` runs of `f` after one warm-up run, in milliseconds.
fn time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

/// The backend's measured matmul throughput (GFLOP/s) on a square product of `size`: the
/// peak that MFU is reported against, measured in the same run rather than taken from a
/// datasheet. Best of five.
pub fn measure_matmul_peak<B: Backend>(backend: &B, size: usize) -> Result<f64> {
    let n = size * size;
    let (a, b, c) = (
        backend.alloc(n, DType::F32)?,
        backend.alloc(n, DType::F32)?,
        backend.alloc(n, DType::F32)?,
    );
    backend.upload(View::whole(&a), &vec![0.5; n])?;
    backend.upload(View::whole(&b), &vec![0.25; n])?;
    let shape = MatmulShape {
        rows: size,
        in_dim: size,
        out_dim: size,
    };
    let ms = time(4, || {
        backend.matmul_forward(View::whole(&c), View::whole(&a), View::whole(&b), shape);
        Ok(backend.synchronize()?)
    })?;
    Ok(2.0 * (size as f64).powi(3) / (ms / 1e3) / 1e9)
}

/// One timed case.
#[derive(Serialize)]
pub struct Row {
    pub kernel: String,
    pub ms: f64,
    pub gflops: Option<f64>,
    pub gb_per_s: Option<f64>,
}

/// What `kiln bench kernels --json` writes.
#[derive(Serialize)]
pub struct KernelFigures {
    pub machine: Machine,
    pub backend: String,
    pub model: ModelConfig,
    pub batch: usize,
    pub seq: usize,
    pub matmul_peak_gflops: f64,
    pub kernels: Vec<Row>,
}

/// Times every benchmarked case of the table at (batch, seq) for `config`.
pub fn kernels<B: Backend>(
    backend: &B,
    config: &ModelConfig,
    batch: usize,
    seq: usize,
    reps: usize,
) -> Result<KernelFigures> {
    let peak = measure_matmul_peak(backend, 512)?;
    println!(
        "backend {} · matmul peak (512³, measured now) {peak:.1} GFLOP/s",
        backend.name()
    );
    println!(
        "{:<58} {:>10} {:>14} {:>9}",
        "kernel", "ms", "rate", "of peak"
    );
    let dims = Dims::of_model(config, batch, seq);
    let mut rows = Vec::new();
    for (i, case) in cases(&dims).into_iter().filter(|c| c.bench).enumerate() {
        let inputs = case.inputs(i as u64);
        let placed = Placed::new(backend, &case, &inputs)?;
        drop(inputs);
        let views = placed.views();
        case.prepare(backend, &views);
        // Optimizer updates over every parameter are slow and change nothing about the rate.
        let reps = if case.kernel == kiln_core::backend::Kernel::AdamW {
            reps.min(3)
        } else {
            reps
        };
        let ms = time(reps, || {
            case.run(backend, &views)?;
            Ok(backend.synchronize()?)
        })?;
        let (rate_text, share, row) = match case.work {
            Work::Flops(flops) => {
                let rate = flops / (ms / 1e3) / 1e9;
                let share = format!("{:.0}%", 100.0 * rate / peak);
                (format!("{rate:.1} GFLOP/s"), share, (Some(rate), None))
            }
            Work::Bytes(bytes) => {
                let rate = bytes / (ms / 1e3) / 1e9;
                (format!("{rate:.1} GB/s"), String::new(), (None, Some(rate)))
            }
        };
        println!(
            "{:<58} {:>10.3} {:>14} {:>9}",
            case.name, ms, rate_text, share
        );
        rows.push(Row {
            kernel: case.name.clone(),
            ms,
            gflops: row.0,
            gb_per_s: row.1,
        });
    }
    Ok(KernelFigures {
        machine: describe(),
        backend: backend.name(),
        model: config.clone(),
        batch,
        seq,
        matmul_peak_gflops: peak,
        kernels: rows,
    })
}
