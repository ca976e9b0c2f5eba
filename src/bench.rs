//! `kiln bench kernels`: the conformance suite's table of kernel cases
//! (`kiln_conformance::cases`), instantiated at a model's real shapes and timed, with each
//! case's GFLOP/s (compute-bound kernels, as a share of the hardware peak of the precision in
//! use, from `kiln bench peak`'s register-only probe) or GB/s (memory-bound ones). The same table is what the conformance suite checks, so every
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
    /// The hardware peak of the precision in use, from a register-only probe.
    pub peak_gflops: f64,
    pub peak_probe: String,
    pub kernels: Vec<Row>,
}

/// Times every benchmarked case of the table at (batch, seq) for `config`; compute-bound
/// cases are given as a share of `peak` (GFLOP/s), the hardware peak of the precision in use
/// from a register-only probe, named by `peak_probe`.
pub fn kernels<B: Backend>(
    backend: &B,
    config: &ModelConfig,
    (batch, seq): (usize, usize),
    reps: usize,
    (peak, peak_probe): (f64, &str),
) -> Result<KernelFigures> {
    println!(
        "backend {} · peak {peak:.1} GFLOP/s ({peak_probe}, probed now)",
        backend.name()
    );
    println!(
        "{:<58} {:>10} {:>14} {:>9}",
        "kernel", "ms", "rate", "of peak"
    );
    let dims = Dims::of_model(config, batch, seq);
    let mut rows = Vec::new();
    for (i, case) in cases(&dims).into_iter().filter(|c| c.bench).enumerate() {
        let inputs = case.bench_inputs(i as u64);
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
        peak_gflops: peak,
        peak_probe: peak_probe.to_string(),
        kernels: rows,
    })
}

/// One `kiln bench peak` row.
#[derive(Serialize)]
pub struct PeakRow {
    pub probe: &'static str,
    pub tier: String,
    pub per_core_gflops: f64,
    pub all_threads_gflops: f64,
    pub threads: usize,
}

/// What `kiln bench peak --json` writes besides the machine.
#[derive(Serialize)]
pub struct PeakFigures {
    pub compute: Vec<PeakRow>,
    /// Memory read bandwidth (GB/s), one core and every thread.
    pub memory_read_gbs_per_core: f64,
    pub memory_read_gbs_all_threads: f64,
}

/// `kiln bench peak`: each usable tier's arithmetic peak from a register-only probe, on one
/// core and on every thread, and the memory read bandwidth.
pub fn peak(threads: usize) -> PeakFigures {
    let compute = compute_peaks(threads);
    let (one, all) = (
        kiln_cpu::probe::memory_read_gbs(1, 512, 0.6),
        kiln_cpu::probe::memory_read_gbs(threads, 512, 0.6),
    );
    println!(
        "{:<42} {:>10.1} GB/s {:>12.1} GB/s",
        "memory read (512 MiB, AVX2 loads)", one, all
    );
    PeakFigures {
        compute,
        memory_read_gbs_per_core: one,
        memory_read_gbs_all_threads: all,
    }
}

fn compute_peaks(threads: usize) -> Vec<PeakRow> {
    use kiln_cpu::probe::{peak_gflops, Probe};
    let mut rows = Vec::new();
    println!(
        "{:<42} {:>12} {:>16}",
        "probe",
        "per core",
        format!("{threads} threads")
    );
    for probe in [Probe::FmaYmm, Probe::FmaZmm, Probe::Bf16Dot, Probe::AmxBf16] {
        let (Some(one), Some(all)) = (peak_gflops(probe, 1, 0.3), peak_gflops(probe, threads, 0.3))
        else {
            println!("{:<42} {:>12} {:>16}", probe.name(), "-", "not on this CPU");
            continue;
        };
        println!(
            "{:<42} {:>7.1} GFLOP/s {:>9.1} GFLOP/s",
            probe.name(),
            one,
            all
        );
        rows.push(PeakRow {
            probe: probe.name(),
            tier: probe.tier().to_string(),
            per_core_gflops: one,
            all_threads_gflops: all,
            threads,
        });
    }
    rows
}

/// What `kiln bench train --json` writes.
#[derive(Serialize)]
pub struct TrainFigures {
    pub machine: Machine,
    pub commit: String,
    pub backend: String,
    pub model: ModelConfig,
    pub batch: usize,
    pub seq: usize,
    pub accumulation: usize,
    pub steps: usize,
    /// Median and best milliseconds per optimizer step.
    pub ms_per_step: f64,
    pub ms_per_step_best: f64,
    pub tokens_per_s: f64,
    pub tflops: f64,
    /// The hardware peak of the precision in use, from the register-only probe.
    pub peak_gflops: f64,
    pub peak_probe: String,
    pub mfu: f64,
    /// Median milliseconds per stage of a step.
    pub ms_forward: f64,
    pub ms_backward: f64,
    pub ms_optimizer: f64,
    pub peak_rss_mib: Option<f64>,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `kiln bench train`: whole training steps (forward, backward, AdamW) of `config` at (batch,
/// seq) × `accumulation` on random tokens, after one warm-up step; ms per step, tokens/s,
/// TFLOP/s, MFU against `peak` (GFLOP/s of the precision in use), time per stage, peak RSS.
#[allow(clippy::too_many_arguments)]
pub fn train<B: Backend>(
    backend: B,
    config: &ModelConfig,
    batch: usize,
    seq: usize,
    accumulation: usize,
    steps: usize,
    peak: (f64, String),
) -> Result<TrainFigures> {
    use kiln_core::model::Model;
    use kiln_core::optim::{adamw_step, AdamW};
    let mut model = Model::new(backend, config.clone())?;
    model.init_random(1)?;
    let acts = model.loss_activations(batch, seq)?;
    let hp = AdamW {
        learning_rate: 1e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let vocab = config.vocab_size as u64;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut token = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % vocab) as u32
    };
    let (mut total, mut fwd, mut bwd, mut opt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    println!(
        "{} · {} parameters · batch {batch} × seq {seq} × accum {accumulation}",
        model.backend.name(),
        kiln_core::layout::parameter_count(config)
    );
    for step in 0..=steps {
        let (mut f, mut b) = (0.0, 0.0);
        let started = Instant::now();
        model.zero_grad();
        for _ in 0..accumulation {
            let tokens: Vec<u32> = (0..batch * seq).map(|_| token()).collect();
            let targets: Vec<u32> = (0..batch * seq).map(|_| token()).collect();
            let t = Instant::now();
            model.forward(&acts, &tokens, Some(&targets))?;
            f += t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            model.backward(&acts, &tokens, &targets, 1.0 / accumulation as f32)?;
            b += t.elapsed().as_secs_f64() * 1e3;
        }
        let t = Instant::now();
        adamw_step(&mut model, &hp, 1.0)?;
        model.backend.synchronize()?;
        let o = t.elapsed().as_secs_f64() * 1e3;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if step == 0 {
            println!("warm-up step {ms:.1} ms");
            device_profile(&model.backend, 0);
            continue;
        }
        println!("step {step}: {ms:.1} ms (forward {f:.1}, backward {b:.1}, optimizer {o:.1})");
        total.push(ms);
        fwd.push(f);
        bwd.push(b);
        opt.push(o);
    }
    device_profile(&model.backend, steps);
    let ms_per_step = median(&mut total);
    let tokens = (batch * seq * accumulation) as f64;
    let flops = config.train_flops_per_token(seq) * tokens;
    let tflops = flops / (ms_per_step / 1e3) / 1e12;
    let figures = TrainFigures {
        machine: describe(),
        commit: commit(),
        backend: model.backend.name(),
        model: config.clone(),
        batch,
        seq,
        accumulation,
        steps,
        ms_per_step,
        ms_per_step_best: total[0],
        tokens_per_s: tokens / (ms_per_step / 1e3),
        tflops,
        peak_gflops: peak.0,
        peak_probe: peak.1,
        mfu: tflops * 1e3 / peak.0,
        ms_forward: median(&mut fwd),
        ms_backward: median(&mut bwd),
        ms_optimizer: median(&mut opt),
        peak_rss_mib: crate::telemetry::memory_mib().map(|m| m.1),
    };
    println!(
        "median {:.1} ms/step (best {:.1}) · {:.0} tokens/s · {:.3} TFLOP/s · MFU {:.1}% of {:.0} GFLOP/s ({}) · forward {:.1} · backward {:.1} · optimizer {:.1} ms · peak RSS {}",
        figures.ms_per_step,
        figures.ms_per_step_best,
        figures.tokens_per_s,
        figures.tflops,
        figures.mfu * 100.0,
        figures.peak_gflops,
        figures.peak_probe,
        figures.ms_forward,
        figures.ms_backward,
        figures.ms_optimizer,
        figures.peak_rss_mib.map_or("?".into(), |m| format!("{m:.0} MiB"))
    );
    Ok(figures)
}

/// Where the backend times its launches (`KILN_CUDA_PROFILE=1` on cuda): their device time
/// since the last call, per step of `steps` (0: read and dropped, as after the warm-up step),
/// by kernel or product shape, longest first.
fn device_profile<B: Backend>(backend: &B, steps: usize) {
    let Some(rows) = backend.launch_times() else {
        return;
    };
    if steps == 0 {
        return;
    }
    let total: f64 = rows.iter().map(|r| r.ms).sum::<f64>() / steps as f64;
    println!("device time per step by launch (KILN_CUDA_PROFILE): {total:.1} ms in all");
    println!(
        "{:<52} {:>9} {:>7} {:>9}",
        "launch", "ms", "share", "per step"
    );
    for r in rows.iter().take(40) {
        let ms = r.ms / steps as f64;
        println!(
            "{:<52} {:>9.3} {:>6.1}% {:>9}",
            r.name,
            ms,
            100.0 * ms / total,
            r.launches / steps
        );
    }
    if rows.len() > 40 {
        let rest: f64 = rows[40..].iter().map(|r| r.ms).sum::<f64>() / steps as f64;
        println!("{:<52} {:>9.3}", format!("{} more", rows.len() - 40), rest);
    }
}

/// The commit kiln was built from, when run inside its checkout.
fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// What `kiln bench decode --json` writes.
#[derive(Serialize)]
pub struct DecodeFigures {
    pub machine: Machine,
    pub commit: String,
    pub backend: String,
    pub model: ModelConfig,
    pub prompt_tokens: usize,
    /// Decoded per sequence.
    pub new_tokens: usize,
    /// Sequences decoded together.
    pub samples: usize,
    /// The prompt in one batched pass ([`kiln_core::model::Model::prefill`]), after one
    /// warm-up pass.
    pub prefill_tokens_per_s: f64,
    /// Greedy decoding, one token per sequence at a time, over all sequences.
    pub decode_tokens_per_s: f64,
    /// Matrix weights read per decoded token (one read serves every sequence of a step; the
    /// embedding contributes one row).
    pub weight_bytes_per_token: f64,
    /// `weight_bytes_per_token × decode_tokens_per_s`.
    pub weight_gbs: f64,
    /// The memory read bandwidth measured in the same run (`kiln bench peak`'s probe).
    pub memory_read_gbs: f64,
}

/// `kiln bench decode`: a prompt of `prompt` tokens, then `tokens` greedily decoded ones,
/// through the KV cache; the weights each token streams (`bytes_per_weight(offset, cols)` per
/// element of the matrix starting at `offset` in the parameters, with rows of `cols`: 2 where
/// the backend reads bf16 copies, 1 and a scale per group with int8 ones, an artifact's codes
/// where it runs them, else 4), and that traffic's share of the memory bandwidth
/// `memory_gbs`.
pub fn decode<B: Backend>(
    model: &kiln_core::model::Model<B>,
    (prompt, tokens, samples): (usize, usize, usize),
    bytes_per_weight: &dyn Fn(usize, usize) -> f64,
    memory_gbs: f64,
) -> Result<DecodeFigures> {
    use kiln_core::layout::ParamKind;
    let config = &model.config;
    anyhow::ensure!(
        prompt >= 1 && prompt + tokens <= config.max_seq_len,
        "a prompt of {prompt} and {tokens} new tokens must fit the model's {} positions",
        config.max_seq_len
    );
    let vocab = config.vocab_size;
    let ids: Vec<u32> = (0..prompt)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    // One warm-up pass and step (they make the weight copies a bf16 or int8 backend keeps),
    // as peers' benches warm up too.
    let mut warm = model.kv_cache(prompt + 1)?;
    model.prefill(&mut warm, &ids)?;
    model.decode_step(&mut warm, ids[0])?;
    let mut cache = model.kv_cache_batch(samples, prompt + tokens)?;
    let started = Instant::now();
    let first = model.prefill(&mut cache, &ids)?;
    let prefill = started.elapsed().as_secs_f64();
    let mut logits: Vec<f32> = first
        .iter()
        .copied()
        .cycle()
        .take(samples * vocab)
        .collect();
    let bar = indicatif::ProgressBar::new(tokens as u64);
    let started = Instant::now();
    let mut next = vec![0u32; samples];
    for _ in 0..tokens {
        // Greedy, each sequence nudged apart by its index so they do not coincide.
        for (i, t) in next.iter_mut().enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(j, _)| j);
            *t = ((best + i) % vocab) as u32;
        }
        model.decode_batch_into(&mut cache, &next, &mut logits)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let decode = started.elapsed().as_secs_f64();
    // Every block matrix and the classifier are read whole per token.
    let layout = &model.layout;
    let classifier = [(layout.classifier, config.dim)];
    let matrices = layout
        .specs
        .iter()
        .filter(|s| matches!(s.kind, ParamKind::BlockMatrix { .. }))
        .map(|s| (s.region, *s.shape.last().expect("a matrix")))
        .chain(classifier);
    let bytes = matrices
        .map(|(region, cols)| region.len as f64 * bytes_per_weight(region.offset, cols))
        .sum::<f64>()
        / samples as f64;
    let decode_rate = (tokens * samples) as f64 / decode;
    let figures = DecodeFigures {
        machine: describe(),
        commit: commit(),
        backend: model.backend.name(),
        model: config.clone(),
        prompt_tokens: prompt,
        new_tokens: tokens,
        samples,
        prefill_tokens_per_s: prompt as f64 / prefill,
        decode_tokens_per_s: decode_rate,
        weight_bytes_per_token: bytes,
        weight_gbs: bytes * decode_rate / 1e9,
        memory_read_gbs: memory_gbs,
    };
    println!("{}", figures.backend);
    println!(
        "prefill {:.1} tokens/s ({prompt} tokens, one pass) · decode {:.1} tokens/s \
         ({tokens} tokens × {samples} sequences) · {:.1} MB of weights per token · {:.1} \
         GB/s, {:.0}% of the \
         {:.1} GB/s memory read bandwidth",
        figures.prefill_tokens_per_s,
        figures.decode_tokens_per_s,
        bytes / 1e6,
        figures.weight_gbs,
        100.0 * figures.weight_gbs / memory_gbs,
        memory_gbs
    );
    Ok(figures)
}
