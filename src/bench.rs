//! `kiln bench kernels`: each kernel of one training step timed on a model's real shapes,
//! with its achieved GFLOP/s (compute-bound kernels) or GB/s (memory-bound ones), beside the
//! matmul peak measured in the same run. Release builds only give meaningful figures.
//!
//! Figures are printed and, with `--json`, written with the machine's description (CPU model,
//! features, cores) and kiln's version, so results from different machines can be compared.

use std::time::Instant;

use anyhow::Result;
use serde_json::{json, Value};

use crate::backend::{Accumulate, AdamWStep, Backend, View};
use crate::config::ModelConfig;
use crate::telemetry::measure_matmul_peak;

/// CPU model, the SIMD/matrix features kiln cares about, and core count.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    let wanted = [
        "avx2",
        "fma",
        "avx512f",
        "avx512_bf16",
        "avx512_fp16",
        "amx_bf16",
        "amx_int8",
        "amx_tile",
    ];
    let features: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|f| flags.contains(f))
        .collect();
    json!({"cpu": model, "features": features, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
           "kiln_version": env!("CARGO_PKG_VERSION")})
}

/// One timed kernel.
struct Row {
    name: String,
    ms: f64,
    /// Work done: FLOPs (compute-bound) or bytes moved (memory-bound).
    work: f64,
    bytes: bool,
}

/// The whole of an allocation as a view.
fn w<B: Backend>(m: &B::Memory, len: usize) -> View<'_, B> {
    View::whole(m, len)
}

/// Best of `reps` runs of `f`, in milliseconds.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// Times every kernel of one layer and the head at (batch, seq) for `config`.
pub fn kernels<B: Backend>(
    backend: &B,
    config: &ModelConfig,
    batch: usize,
    seq: usize,
    reps: usize,
) -> Result<Value> {
    let n = batch * seq;
    let (c, f, v, hd) = (
        config.dim,
        config.hidden_dim,
        config.vocab_size,
        config.head_dim,
    );
    let (h, kvh) = (config.n_heads, config.n_kv_heads);
    let (q, kv) = (config.q_dim(), config.kv_dim());
    let mem = |len: usize| {
        let m = backend.alloc(len);
        backend.upload(
            View::whole(&m, len),
            &(0..len)
                .map(|i| ((i % 97) as f32 - 48.0) * 1e-3)
                .collect::<Vec<_>>(),
        );
        m
    };
    let mut rows = Vec::new();
    let mut add = |name: &str, ms: f64, work: f64, bytes: bool| {
        rows.push(Row {
            name: name.into(),
            ms,
            work,
            bytes,
        })
    };

    // Matmuls of one block, forward and backward, plus the classifier.
    for (name, out_dim, in_dim) in [
        ("q_proj", q, c),
        ("k_proj", kv, c),
        ("o_proj", c, q),
        ("gate_proj", f, c),
        ("down_proj", c, f),
        ("classifier", v, c),
    ] {
        let (x, wt, y) = (mem(n * in_dim), mem(out_dim * in_dim), mem(n * out_dim));
        let (dx, dw) = (mem(n * in_dim), mem(out_dim * in_dim));
        let flops = 2.0 * (n * in_dim * out_dim) as f64;
        add(
            &format!("matmul {name} forward ({n}×{in_dim} · {in_dim}×{out_dim})"),
            time(reps, || {
                backend.matmul_forward(
                    w::<B>(&y, n * out_dim),
                    w::<B>(&x, n * in_dim),
                    w::<B>(&wt, out_dim * in_dim),
                    n,
                    in_dim,
                    out_dim,
                )
            }),
            flops,
            false,
        );
        add(
            &format!("matmul {name} backward"),
            time(reps, || {
                backend.matmul_backward(
                    w::<B>(&dx, n * in_dim),
                    w::<B>(&dw, out_dim * in_dim),
                    w::<B>(&y, n * out_dim),
                    w::<B>(&x, n * in_dim),
                    w::<B>(&wt, out_dim * in_dim),
                    n,
                    in_dim,
                    out_dim,
                    Accumulate::Overwrite,
                )
            }),
            2.0 * flops,
            false,
        );
    }
    // Attention.
    let (qm, km, vm, om) = (mem(n * q), mem(n * kv), mem(n * kv), mem(n * q));
    let saved_len = backend.attention_saved_len(batch, seq, h);
    let saved = mem(saved_len);
    let (dq, dk, dv) = (mem(n * q), mem(n * kv), mem(n * kv));
    // Causal: half of the T×T scores, two products (QKᵀ, PV) of 2·D FLOPs each.
    let attn_flops = (batch * h * seq * seq * hd * 2) as f64;
    add(
        &format!("attention forward (B{batch} H{h}/{kvh} T{seq} D{hd})"),
        time(reps, || {
            backend.attention_forward(
                w::<B>(&om, n * q),
                w::<B>(&saved, saved_len),
                w::<B>(&qm, n * q),
                w::<B>(&km, n * kv),
                w::<B>(&vm, n * kv),
                batch,
                seq,
                h,
                kvh,
                hd,
            )
        }),
        attn_flops,
        false,
    );
    add(
        "attention backward",
        time(reps, || {
            backend.attention_backward(
                w::<B>(&dq, n * q),
                w::<B>(&dk, n * kv),
                w::<B>(&dv, n * kv),
                w::<B>(&om, n * q),
                w::<B>(&qm, n * q),
                w::<B>(&km, n * kv),
                w::<B>(&vm, n * kv),
                w::<B>(&saved, saved_len),
                batch,
                seq,
                h,
                kvh,
                hd,
            )
        }),
        2.0 * attn_flops,
        false,
    );
    // Memory-bound kernels: bytes read + written.
    let (x, g, y, r, dx, dg) = (mem(n * c), mem(c), mem(n * c), mem(n), mem(n * c), mem(c));
    add(
        &format!("rmsnorm forward ({n}×{c})"),
        time(reps, || {
            backend.rmsnorm_forward(
                w::<B>(&y, n * c),
                w::<B>(&r, n),
                w::<B>(&x, n * c),
                w::<B>(&g, c),
                n,
                c,
                1e-5,
            )
        }),
        (8 * n * c) as f64,
        true,
    );
    add(
        "rmsnorm backward",
        time(reps, || {
            backend.rmsnorm_backward(
                w::<B>(&dx, n * c),
                w::<B>(&dg, c),
                w::<B>(&y, n * c),
                w::<B>(&x, n * c),
                w::<B>(&g, c),
                w::<B>(&r, n),
                n,
                c,
                Accumulate::Add,
            )
        }),
        (16 * n * c) as f64,
        true,
    );
    add(
        &format!("rope forward (q, {n}×{q})"),
        time(reps, || {
            backend.rope_forward(
                w::<B>(&om, n * q),
                w::<B>(&qm, n * q),
                batch,
                seq,
                h,
                hd,
                hd,
                config.rope_theta as f32,
                0,
            )
        }),
        (8 * n * q) as f64,
        true,
    );
    let (a, b, o, da, db) = (mem(n * f), mem(n * f), mem(n * f), mem(n * f), mem(n * f));
    add(
        &format!("swiglu forward ({n}×{f})"),
        time(reps, || {
            backend.swiglu_forward(
                w::<B>(&o, n * f),
                w::<B>(&a, n * f),
                w::<B>(&b, n * f),
                n * f,
            )
        }),
        (12 * n * f) as f64,
        true,
    );
    add(
        "swiglu backward",
        time(reps, || {
            backend.swiglu_backward(
                w::<B>(&da, n * f),
                w::<B>(&db, n * f),
                w::<B>(&o, n * f),
                w::<B>(&a, n * f),
                w::<B>(&b, n * f),
                n * f,
            )
        }),
        (20 * n * f) as f64,
        true,
    );
    let (logits, losses, lse, dlogits) = (mem(n * v), mem(n), mem(n), mem(n * v));
    let targets: Vec<u32> = (0..n as u32).map(|i| i % v as u32).collect();
    add(
        &format!("cross-entropy forward ({n}×{v})"),
        time(reps, || {
            backend.cross_entropy_forward(
                w::<B>(&losses, n),
                w::<B>(&lse, n),
                w::<B>(&logits, n * v),
                &targets,
                v,
            )
        }),
        (4 * n * v) as f64,
        true,
    );
    add(
        "cross-entropy backward",
        time(reps, || {
            backend.cross_entropy_backward(
                w::<B>(&dlogits, n * v),
                w::<B>(&logits, n * v),
                w::<B>(&lse, n),
                &targets,
                v,
                1.0 / n as f32,
            )
        }),
        (8 * n * v) as f64,
        true,
    );
    // AdamW over every parameter: reads p, g, m, v and writes p, m, v.
    let p = config.parameter_count();
    let (pm, gm, mm, vm2) = (mem(p), mem(p), mem(p), mem(p));
    let hp = AdamWStep {
        learning_rate: 1e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 10,
        grad_scale: 1.0,
    };
    add(
        &format!("adamw ({p} parameters)"),
        time(reps.min(3), || {
            backend.adamw_step(
                w::<B>(&pm, p),
                w::<B>(&gm, p),
                w::<B>(&mm, p),
                w::<B>(&vm2, p),
                &hp,
            )
        }),
        (28 * p) as f64,
        true,
    );

    let peak = measure_matmul_peak(backend, 512);
    println!(
        "backend {} · matmul peak (512³, measured now) {peak:.1} GFLOP/s",
        backend.name()
    );
    println!(
        "{:<58} {:>10} {:>14} {:>9}",
        "kernel", "ms", "rate", "of peak"
    );
    let mut out = Vec::new();
    for r in &rows {
        let rate = r.work / (r.ms / 1e3) / 1e9;
        let (rate_text, share) = if r.bytes {
            (format!("{rate:.1} GB/s"), String::new())
        } else {
            (
                format!("{rate:.1} GFLOP/s"),
                format!("{:.0}%", 100.0 * rate / peak),
            )
        };
        println!(
            "{:<58} {:>10.3} {:>14} {:>9}",
            r.name, r.ms, rate_text, share
        );
        out.push(json!({"kernel": r.name, "ms": r.ms, if r.bytes { "gb_per_s" } else { "gflops" }: rate}));
    }
    Ok(
        json!({"machine": machine(), "backend": backend.name(), "model": config, "batch": batch, "seq": seq,
              "matmul_peak_gflops": peak, "kernels": out}),
    )
}
