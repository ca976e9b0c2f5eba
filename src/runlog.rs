//! Reading a run's `telemetry.jsonl`: the one interface between the trainer and whatever
//! watches it (the dashboard, `kiln report`). Reads incrementally, so a live run can be
//! followed by polling; a line still being written is left for the next poll.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

/// Milliseconds per stage of one step.
#[derive(Clone, Copy, Debug, Default)]
pub struct StageMs {
    pub data: f64,
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
    pub eval: f64,
    pub checkpoint: f64,
}

impl StageMs {
    pub const NAMES: [&'static str; 6] = [
        "data",
        "forward",
        "backward",
        "optimizer",
        "eval",
        "checkpoint",
    ];

    pub fn get(&self, name: &str) -> f64 {
        match name {
            "data" => self.data,
            "forward" => self.forward,
            "backward" => self.backward,
            "optimizer" => self.optimizer,
            "eval" => self.eval,
            _ => self.checkpoint,
        }
    }
}

/// One `step` line.
#[derive(Clone, Debug, Default)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub ms_per_step: f64,
    pub tflops: f64,
    pub mfu: f64,
    pub rss_mib: Option<f64>,
    pub elapsed_s: f64,
    pub progress: f64,
    pub skipped: bool,
    pub ms: StageMs,
}

/// One `eval` line.
#[derive(Clone, Debug, Default)]
pub struct EvalRecord {
    pub step: u64,
    pub val_loss: f64,
    pub val_bpb: f64,
}

/// A run's telemetry so far.
#[derive(Default)]
pub struct RunLog {
    pub dir: PathBuf,
    /// The `start` line (configs, parameter count, measured peak, budgets).
    pub start: Option<Value>,
    pub steps: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
    /// `(step, text)` of each `sample` line.
    pub samples: Vec<(u64, String)>,
    pub report: Option<Value>,
    /// Why the run stopped early, if it did.
    pub stopped: Option<Value>,
    offset: u64,
    pending: String,
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

impl RunLog {
    /// A reader for `run_dir/telemetry.jsonl` (which may not exist yet).
    pub fn new(run_dir: &Path) -> Self {
        RunLog {
            dir: run_dir.to_path_buf(),
            ..Default::default()
        }
    }

    /// Reads a whole run's telemetry.
    pub fn load(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join("telemetry.jsonl");
        anyhow::ensure!(
            path.exists(),
            "{} has no telemetry.jsonl: not a kiln run directory",
            run_dir.display()
        );
        let mut log = Self::new(run_dir);
        log.poll()?;
        Ok(log)
    }

    /// The run's name: its directory's last component.
    pub fn name(&self) -> String {
        self.dir.file_name().map_or_else(
            || self.dir.display().to_string(),
            |n| n.to_string_lossy().into(),
        )
    }

    /// Reads lines appended since the last poll; returns whether any arrived.
    pub fn poll(&mut self) -> Result<bool> {
        let path = self.dir.join("telemetry.jsonl");
        let Ok(mut file) = File::open(&path) else {
            return Ok(false);
        };
        let len = file.metadata()?.len();
        if len < self.offset {
            // The file was replaced (a new run in the same place): start over.
            *self = Self::new(&self.dir);
        }
        if len == self.offset {
            return Ok(false);
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut text = String::new();
        file.read_to_string(&mut text)
            .with_context(|| format!("cannot read {}", path.display()))?;
        self.offset += text.len() as u64;
        self.pending.push_str(&text);
        let mut any = false;
        while let Some(end) = self.pending.find('\n') {
            let line: String = self.pending.drain(..=end).collect();
            if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
                self.ingest(v);
                any = true;
            }
        }
        Ok(any)
    }

    fn ingest(&mut self, v: Value) {
        match v["type"].as_str() {
            Some("start") => {
                if self.start.is_none() {
                    self.start = Some(v);
                }
            }
            Some("step") => {
                let ms = &v["ms"];
                self.steps.push(StepRecord {
                    step: v["step"].as_u64().unwrap_or(0),
                    loss: f(&v, "loss"),
                    lr: f(&v, "lr"),
                    grad_norm: f(&v, "grad_norm"),
                    tokens: v["tokens"].as_u64().unwrap_or(0),
                    tokens_per_s: f(&v, "tokens_per_s"),
                    ms_per_step: f(&v, "ms_per_step"),
                    tflops: f(&v, "tflops"),
                    mfu: f(&v, "mfu"),
                    rss_mib: v["rss_mib"].as_f64(),
                    elapsed_s: f(&v, "elapsed_s"),
                    progress: f(&v, "progress"),
                    skipped: v["skipped"].as_bool().unwrap_or(false),
                    ms: StageMs {
                        data: f(ms, "data"),
                        forward: f(ms, "forward"),
                        backward: f(ms, "backward"),
                        optimizer: f(ms, "optimizer"),
                        eval: f(ms, "eval"),
                        checkpoint: f(ms, "checkpoint"),
                    },
                });
            }
            Some("eval") => self.evals.push(EvalRecord {
                step: v["step"].as_u64().unwrap_or(0),
                val_loss: f(&v, "val_loss"),
                val_bpb: f(&v, "val_bpb"),
            }),
            Some("sample") => self.samples.push((
                v["step"].as_u64().unwrap_or(0),
                v["text"].as_str().unwrap_or("").to_string(),
            )),
            Some("report") => self.report = Some(v),
            Some("stopped") => self.stopped = Some(v),
            _ => {}
        }
    }

    /// Tokens per optimizer step, from the start line.
    pub fn tokens_per_step(&self) -> u64 {
        self.start
            .as_ref()
            .and_then(|s| s["tokens_per_step"].as_u64())
            .unwrap_or(0)
    }

    /// The step record at `step`, if logged.
    pub fn step_at(&self, step: u64) -> Option<&StepRecord> {
        self.steps.iter().rev().find(|s| s.step == step)
    }

    /// Seconds per stage summed over all steps, in [`StageMs::NAMES`] order.
    pub fn stage_totals(&self) -> [f64; 6] {
        let mut totals = [0.0; 6];
        for s in &self.steps {
            for (t, name) in totals.iter_mut().zip(StageMs::NAMES) {
                let ms = s.ms.get(name);
                if ms.is_finite() {
                    *t += ms / 1e3;
                }
            }
        }
        totals
    }

    /// Whether the run has ended (a report or a stop was logged).
    pub fn finished(&self) -> bool {
        self.report.is_some() || self.stopped.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn polling_follows_a_growing_file_and_waits_for_whole_lines() {
        let dir = std::env::temp_dir().join(format!("kiln-runlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("telemetry.jsonl");
        let mut file = File::create(&path).unwrap();
        writeln!(file, r#"{{"type":"start","tokens_per_step":64}}"#).unwrap();
        writeln!(
            file,
            r#"{{"type":"step","step":1,"loss":5.0,"ms":{{"forward":3.0}}}}"#
        )
        .unwrap();
        write!(file, r#"{{"type":"step","step":2,"lo"#).unwrap();
        file.flush().unwrap();
        let mut log = RunLog::new(&dir);
        assert!(log.poll().unwrap());
        assert_eq!(log.steps.len(), 1);
        assert_eq!(log.tokens_per_step(), 64);
        writeln!(file, r#"ss":4.5,"ms":{{}}}}"#).unwrap();
        writeln!(
            file,
            r#"{{"type":"eval","step":2,"val_loss":4.7,"val_bpb":2.1}}"#
        )
        .unwrap();
        file.flush().unwrap();
        assert!(log.poll().unwrap());
        assert_eq!(
            log.steps.iter().map(|s| s.loss).collect::<Vec<_>>(),
            [5.0, 4.5]
        );
        assert_eq!(log.evals[0].val_bpb, 2.1);
        assert!(!log.poll().unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
