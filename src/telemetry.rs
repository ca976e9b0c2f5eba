//! Machine-readable telemetry (`telemetry.jsonl`): one JSON object per line, each an
//! [`Event`] with its `"type"` and the wall-clock `"time"` it was written. It is the only
//! interface between the trainer and whatever watches it: the trainer writes these types, and
//! the dashboard, `kiln report` and the TensorBoard mirror read the very same types (never a
//! JSON value by string key).
//!
//! Non-finite numbers (a skipped step's loss) are written as `null` and read back as NaN.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use kiln_core::config::ModelConfig;
use kiln_core::eval::EvalResult;
use kiln_formats::tensorboard::EventWriter;
use serde::{Deserialize, Serialize};

use crate::run_config::TrainConfig;

/// The stages a step's time is split into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Data,
    Forward,
    Backward,
    /// Summing gradients (and the step's few agreed numbers) across data-parallel processes.
    Allreduce,
    Optimizer,
    Eval,
    Checkpoint,
}

impl Stage {
    pub const ALL: [Stage; 7] = [
        Stage::Data,
        Stage::Forward,
        Stage::Backward,
        Stage::Allreduce,
        Stage::Optimizer,
        Stage::Eval,
        Stage::Checkpoint,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Data => "data",
            Stage::Forward => "forward",
            Stage::Backward => "backward",
            Stage::Allreduce => "all-reduce",
            Stage::Optimizer => "optimizer",
            Stage::Eval => "eval",
            Stage::Checkpoint => "checkpoint",
        }
    }
}

/// A time per stage (milliseconds in a step line, seconds in the report). A stage name the
/// reader does not know is an error, never mapped to another stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerStage {
    pub data: f64,
    pub forward: f64,
    pub backward: f64,
    /// Absent from runs of one process before data parallelism was measured: zero.
    #[serde(default)]
    pub allreduce: f64,
    pub optimizer: f64,
    pub eval: f64,
    pub checkpoint: f64,
}

impl PerStage {
    pub fn get(&self, stage: Stage) -> f64 {
        match stage {
            Stage::Data => self.data,
            Stage::Forward => self.forward,
            Stage::Backward => self.backward,
            Stage::Allreduce => self.allreduce,
            Stage::Optimizer => self.optimizer,
            Stage::Eval => self.eval,
            Stage::Checkpoint => self.checkpoint,
        }
    }

    pub fn get_mut(&mut self, stage: Stage) -> &mut f64 {
        match stage {
            Stage::Data => &mut self.data,
            Stage::Forward => &mut self.forward,
            Stage::Backward => &mut self.backward,
            Stage::Allreduce => &mut self.allreduce,
            Stage::Optimizer => &mut self.optimizer,
            Stage::Eval => &mut self.eval,
            Stage::Checkpoint => &mut self.checkpoint,
        }
    }

    pub fn total(&self) -> f64 {
        Stage::ALL.iter().map(|&s| self.get(s)).sum()
    }

    /// Element-wise `self − earlier`.
    pub fn since(&self, earlier: &PerStage) -> PerStage {
        let mut out = PerStage::default();
        for s in Stage::ALL {
            *out.get_mut(s) = self.get(s) - earlier.get(s);
        }
        out
    }

    /// Every stage scaled (seconds to milliseconds, rounded to 0.1 ms).
    pub fn to_ms(&self) -> PerStage {
        let mut out = PerStage::default();
        for s in Stage::ALL {
            *out.get_mut(s) = (self.get(s) * 1e4).round() / 10.0;
        }
        out
    }
}

/// `start`: what the run is, once per process that trains it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Start {
    pub step: u64,
    pub backend: String,
    /// Data-parallel processes training together (1: one process).
    #[serde(default = "one")]
    pub world_size: usize,
    pub parameters: usize,
    pub model: ModelConfig,
    pub train: TrainConfig,
    /// The measured matmul throughput MFU is reported against (GFLOP/s).
    pub peak_gflops: f64,
    pub flops_per_step: f64,
    pub tokens_per_step: u64,
    pub max_steps: Option<u64>,
    pub max_tokens: Option<u64>,
    pub time_budget_seconds: Option<f64>,
}

/// `step`: one optimizer step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Step {
    pub step: u64,
    #[serde(with = "finite_or_null")]
    pub loss: f64,
    pub lr: f64,
    #[serde(with = "finite_or_null")]
    pub grad_norm: f64,
    /// The step had a non-finite loss or gradient and did not touch the weights.
    pub skipped: bool,
    pub skipped_total: u64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub ms_per_step: f64,
    /// Milliseconds per stage of this step.
    pub ms: PerStage,
    pub tflops: f64,
    pub mfu: f64,
    pub rss_mib: Option<f64>,
    pub elapsed_s: f64,
    /// Fraction of the budget spent.
    pub progress: f64,
    /// Tokens per sequence of this step, where a sequence-length warmup made them fewer than
    /// the run's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<usize>,
    /// The loss scale the step ran at, with loss scaling (fp16 products).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f32>,
}

/// `eval`: a validation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Eval {
    pub step: u64,
    pub val_loss: f64,
    pub val_bpb: f64,
    pub tokens: usize,
    pub bytes: usize,
    pub ms: f64,
}

/// Why a run stopped before its budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Too many consecutive steps with a non-finite loss or gradient.
    NonFinite,
    /// SIGINT or SIGTERM: stopped at a step boundary after a checkpoint.
    Interrupted,
}

/// What a finished run reports (also `report.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub steps: u64,
    pub skipped_steps: u64,
    pub tokens: u64,
    pub wall_seconds: f64,
    pub ms_per_step: f64,
    pub tokens_per_second: f64,
    pub tflops: f64,
    pub mfu: f64,
    pub peak_gflops: f64,
    /// Seconds per stage over the run.
    pub stage_seconds: PerStage,
    #[serde(with = "finite_or_null_f32")]
    pub final_loss: f32,
    pub val: Option<EvalResult>,
    pub peak_memory_mib: Option<f64>,
    #[serde(with = "finite_or_null_vec")]
    pub losses: Vec<f32>,
}

/// One line of `telemetry.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Start(Box<Start>),
    Step(Step),
    Eval(Eval),
    Sample {
        step: u64,
        text: String,
    },
    Checkpoint {
        step: u64,
        path: PathBuf,
        ms: f64,
    },
    Resume {
        step: u64,
        checkpoint: PathBuf,
    },
    Stopped {
        step: u64,
        reason: StopReason,
        consecutive: u64,
    },
    Report(Box<RunReport>),
    /// Where the run's device time went, summed by launch over its `steps` (written before
    /// the report, where the backend times launches: the cuda backend under
    /// `KILN_CUDA_PROFILE=1`), longest first.
    LaunchTimes {
        steps: u64,
        launches: Vec<kiln_core::backend::LaunchTime>,
    },
}

/// An event with the time it was written (seconds since the Unix epoch).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub time: f64,
    #[serde(flatten)]
    pub event: Event,
}

/// Appends records to a run's telemetry file, flushing each so a reader sees it at once, and
/// mirrors the scalars of step and eval events into TensorBoard event files when asked.
pub struct Telemetry {
    /// `None`: events are dropped (a data-parallel process other than rank 0).
    file: Option<File>,
    tensorboard: Option<EventWriter>,
}

impl Telemetry {
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Telemetry {
            file: Some(file),
            tensorboard: None,
        })
    }

    /// Telemetry that writes nothing: rank 0 alone writes a data-parallel run's.
    pub fn discard() -> Self {
        Telemetry {
            file: None,
            tensorboard: None,
        }
    }

    /// Mirrors step and eval metrics into TensorBoard event files under `dir`.
    pub fn enable_tensorboard(&mut self, dir: &Path) -> Result<()> {
        self.tensorboard = Some(EventWriter::create(dir)?);
        Ok(())
    }

    pub fn emit(&mut self, event: Event) -> Result<()> {
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let record = Record { time, event };
        writeln!(file, "{}", serde_json::to_string(&record)?)?;
        file.flush()?;
        if let Some(tb) = &mut self.tensorboard {
            let (step, scalars) = tensorboard_scalars(&record.event);
            if !scalars.is_empty() {
                tb.scalars(step, &scalars)?;
            }
        }
        Ok(())
    }
}

fn one() -> usize {
    1
}

/// The TensorBoard tags of an event's scalars (non-finite values left out).
pub fn tensorboard_scalars(event: &Event) -> (u64, Vec<(&'static str, f32)>) {
    let (step, all) = match event {
        Event::Step(s) => (
            s.step,
            vec![
                ("train/loss", s.loss),
                ("train/learning_rate", s.lr),
                ("train/grad_norm", s.grad_norm),
                ("perf/tokens_per_s", s.tokens_per_s),
                ("perf/ms_per_step", s.ms_per_step),
                ("perf/tflops", s.tflops),
                ("perf/mfu", s.mfu),
            ],
        ),
        Event::Eval(e) => (
            e.step,
            vec![("val/loss", e.val_loss), ("val/bits_per_byte", e.val_bpb)],
        ),
        _ => (0, Vec::new()),
    };
    let scalars = all
        .into_iter()
        .filter(|(_, v)| v.is_finite())
        .map(|(tag, v)| (tag, v as f32))
        .collect();
    (step, scalars)
}

/// Human form of a duration: "1h02m", "3m05s", "12s".
pub fn human_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
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

/// f64 that may be NaN or infinite: written as `null`, read back as NaN.
mod finite_or_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        match v.is_finite() {
            true => s.serialize_f64(*v),
            false => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// f32 that may be non-finite, as [`finite_or_null`].
mod finite_or_null_f32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
        match v.is_finite() {
            true => s.serialize_f32(*v),
            false => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
    }
}

/// A list of f32 that may hold non-finite values, as [`finite_or_null`].
mod finite_or_null_vec {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let values: Vec<Option<f32>> = v.iter().map(|x| x.is_finite().then_some(*x)).collect();
        values.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        let values = Vec::<Option<f32>>::deserialize(d)?;
        Ok(values.into_iter().map(|x| x.unwrap_or(f32::NAN)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skipped_step_round_trips_with_its_nan_loss() {
        let event = Event::Step(Step {
            step: 3,
            loss: f64::NAN,
            lr: 1e-3,
            grad_norm: f64::INFINITY,
            skipped: true,
            skipped_total: 1,
            tokens: 96,
            tokens_per_s: 10.0,
            ms_per_step: 5.0,
            ms: PerStage {
                forward: 2.0,
                ..Default::default()
            },
            tflops: 0.1,
            mfu: 0.5,
            rss_mib: None,
            elapsed_s: 1.0,
            progress: 0.25,
            seq: None,
            loss_scale: None,
        });
        let line = serde_json::to_string(&Record { time: 1.0, event }).unwrap();
        assert!(
            line.contains(r#""type":"step""#) && line.contains(r#""loss":null"#),
            "{line}"
        );
        let back: Record = serde_json::from_str(&line).unwrap();
        let Event::Step(s) = back.event else {
            panic!("not a step: {line}")
        };
        assert!(s.loss.is_nan() && s.grad_norm.is_nan() && s.skipped);
        assert_eq!(s.ms.forward, 2.0);
    }

    #[test]
    fn an_unknown_stage_is_refused_not_renamed() {
        let line = r#"{"data":1,"forward":2,"backward":3,"optimizer":4,"eval":0,"checkpoint":0,"warmup":9}"#;
        let err = serde_json::from_str::<PerStage>(line)
            .unwrap_err()
            .to_string();
        assert!(err.contains("warmup"), "{err}");
    }
}
