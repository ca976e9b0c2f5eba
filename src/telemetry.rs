//! Machine-readable telemetry (`telemetry.jsonl`: one JSON object per line, each with a
//! `"type"`), the only interface between the trainer and anything that watches it; plus the
//! machine facts it reports (resident memory, the measured matmul peak for MFU).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::backend::{Backend, View};

/// Appends JSON lines to a run's telemetry file, flushing each so a reader sees it at once.
pub struct Telemetry {
    file: File,
    /// Also write TensorBoard scalars (step and eval lines).
    tensorboard: Option<crate::tensorboard::EventWriter>,
}

impl Telemetry {
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Telemetry {
            file,
            tensorboard: None,
        })
    }

    /// Mirrors step and eval metrics into TensorBoard event files under `dir`.
    pub fn enable_tensorboard(&mut self, dir: &Path) -> Result<()> {
        self.tensorboard = Some(crate::tensorboard::EventWriter::create(dir)?);
        Ok(())
    }

    /// Writes `{"type": kind, …fields}`.
    pub fn emit(&mut self, kind: &str, mut fields: Value) -> Result<()> {
        fields["type"] = kind.into();
        fields["time"] = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
            .into();
        writeln!(self.file, "{fields}")?;
        self.file.flush()?;
        if let Some(tb) = &mut self.tensorboard {
            let step = fields["step"].as_u64().unwrap_or(0);
            let tags: &[(&str, &str)] = match kind {
                "step" => &[
                    ("train/loss", "loss"),
                    ("train/learning_rate", "lr"),
                    ("train/grad_norm", "grad_norm"),
                    ("perf/tokens_per_s", "tokens_per_s"),
                    ("perf/ms_per_step", "ms_per_step"),
                    ("perf/tflops", "tflops"),
                    ("perf/mfu", "mfu"),
                ],
                "eval" => &[("val/loss", "val_loss"), ("val/bits_per_byte", "val_bpb")],
                _ => &[],
            };
            let scalars: Vec<(&str, f32)> = tags
                .iter()
                .filter_map(|(tag, key)| fields[*key].as_f64().map(|v| (*tag, v as f32)))
                .collect();
            if !scalars.is_empty() {
                tb.scalars(step, &scalars)?;
            }
        }
        Ok(())
    }
}

/// Resident and peak resident memory of this process, in MiB (Linux; `None` elsewhere).
pub fn memory_mib() -> Option<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The backend's measured matmul throughput (GFLOP/s) on a square product of `size`: the
/// peak that MFU is reported against, measured in the same run rather than taken from a
/// datasheet. Best of five.
pub fn measure_matmul_peak<B: Backend>(backend: &B, size: usize) -> f64 {
    let n = size * size;
    let a = backend.alloc(n);
    let b = backend.alloc(n);
    let c = backend.alloc(n);
    backend.upload(View::whole(&a, n), &vec![0.5; n]);
    backend.upload(View::whole(&b, n), &vec![0.25; n]);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        backend.matmul_forward(
            View::whole(&c, n),
            View::whole(&a, n),
            View::whole(&b, n),
            size,
            size,
            size,
        );
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (size as f64).powi(3) / best / 1e9
}
