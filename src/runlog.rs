//! Reading a run's `telemetry.jsonl` into the typed [`Event`]s the trainer wrote: the one
//! interface between the trainer and whatever watches it (the dashboard, `kiln report`).
//! Reads incrementally, so a live run can be followed by polling. Only complete lines are
//! parsed: a poll that lands mid-line, or in the middle of a multi-byte character, keeps the
//! partial bytes for the next poll. A complete line that is not a valid event is counted and
//! its first error kept, never silently reinterpreted.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::telemetry::{Eval, Event, PerStage, Record, RunReport, Stage, Start, Step, StopReason};

/// A run's telemetry so far.
#[derive(Default)]
pub struct RunLog {
    pub dir: PathBuf,
    /// The first `start` event (configs, parameter count, measured peak, budgets).
    pub start: Option<Start>,
    pub steps: Vec<Step>,
    pub evals: Vec<Eval>,
    /// `(step, text)` of each `sample` event.
    pub samples: Vec<(u64, String)>,
    pub report: Option<RunReport>,
    /// Why the run stopped early, if it did.
    pub stopped: Option<StopReason>,
    /// The device time by launch and the steps it covers, where the backend timed them.
    pub launch_times: Option<(u64, Vec<kiln_core::backend::LaunchTime>)>,
    /// Complete lines that were not valid events, and the first one's error.
    pub bad_lines: usize,
    pub first_error: Option<String>,
    offset: u64,
    pending: Vec<u8>,
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
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .with_context(|| format!("cannot read {}", path.display()))?;
        self.offset += bytes.len() as u64;
        self.pending.extend_from_slice(&bytes);
        let mut any = false;
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let parsed = std::str::from_utf8(&line)
                .map_err(|e| e.to_string())
                .and_then(|text| match text.trim() {
                    "" => Ok(None),
                    text => serde_json::from_str::<Record>(text)
                        .map(Some)
                        .map_err(|e| e.to_string()),
                });
            match parsed {
                Ok(Some(record)) => {
                    self.ingest(record.event);
                    any = true;
                }
                Ok(None) => {}
                Err(e) => {
                    self.bad_lines += 1;
                    self.first_error.get_or_insert(e);
                }
            }
        }
        Ok(any)
    }

    fn ingest(&mut self, event: Event) {
        match event {
            Event::Start(start) => {
                if self.start.is_none() {
                    self.start = Some(*start);
                }
            }
            Event::Step(step) => self.steps.push(step),
            Event::Eval(eval) => self.evals.push(eval),
            Event::Sample { step, text } => self.samples.push((step, text)),
            Event::Report(report) => self.report = Some(*report),
            Event::Stopped { reason, .. } => self.stopped = Some(reason),
            Event::LaunchTimes { steps, launches } => self.launch_times = Some((steps, launches)),
            Event::Checkpoint { .. } | Event::Resume { .. } => {}
        }
    }

    /// Tokens per optimizer step, from the start event.
    pub fn tokens_per_step(&self) -> u64 {
        self.start.as_ref().map_or(0, |s| s.tokens_per_step)
    }

    /// The step event at `step`, if logged.
    pub fn step_at(&self, step: u64) -> Option<&Step> {
        self.steps.iter().rev().find(|s| s.step == step)
    }

    /// Seconds per stage summed over all steps.
    pub fn stage_totals(&self) -> PerStage {
        let mut totals = PerStage::default();
        for s in &self.steps {
            for stage in Stage::ALL {
                let ms = s.ms.get(stage);
                if ms.is_finite() {
                    *totals.get_mut(stage) += ms / 1e3;
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

    fn step_line(step: u64, loss: f64) -> String {
        let event = Event::Step(Step {
            step,
            loss,
            lr: 1e-3,
            grad_norm: 1.0,
            skipped: false,
            skipped_total: 0,
            tokens: step * 64,
            tokens_per_s: 100.0,
            ms_per_step: 10.0,
            ms: PerStage {
                forward: 3.0,
                ..Default::default()
            },
            tflops: 0.0,
            mfu: 0.0,
            rss_mib: None,
            elapsed_s: 1.0,
            progress: 0.5,
            seq: None,
            loss_scale: None,
        });
        serde_json::to_string(&Record { time: 0.0, event }).unwrap()
    }

    /// A launch-time event (the cuda backend under KILN_CUDA_PROFILE) is read back whole, and
    /// the run's report.md lists it per step.
    #[test]
    fn launch_times_are_read_back_and_reported_per_step() {
        use kiln_core::backend::LaunchTime;
        let dir = std::env::temp_dir().join(format!("kiln-launch-times-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let launches = vec![
            LaunchTime {
                name: "attention_backward_mma".into(),
                ms: 46.0,
                launches: 24,
            },
            LaunchTime {
                name: "gemm 65536×768×768".into(),
                ms: 15.5,
                launches: 96,
            },
        ];
        let event = Event::LaunchTimes {
            steps: 2,
            launches: launches.clone(),
        };
        let line = serde_json::to_string(&Record { time: 0.0, event }).unwrap();
        std::fs::write(
            dir.join("telemetry.jsonl"),
            format!("{}\n{line}\n", step_line(1, 5.0)),
        )
        .unwrap();
        let log = RunLog::load(&dir).unwrap();
        assert_eq!(log.launch_times, Some((2, launches)));
        let md = crate::report::summary(&[log], &[]);
        assert!(
            md.contains("| attention_backward_mma | 23.00 | 74.8% | 12 |"),
            "{md}"
        );
        assert!(
            md.contains("| gemm 65536×768×768 | 7.75 | 25.2% | 48 |"),
            "{md}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn polling_follows_a_growing_file_and_waits_for_whole_lines() {
        let dir = std::env::temp_dir().join(format!("kiln-runlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("telemetry.jsonl");
        let mut file = File::create(&path).unwrap();
        writeln!(file, "{}", step_line(1, 5.0)).unwrap();
        // The next line stops inside the two-byte character of a sample's text.
        let sample = Event::Sample {
            step: 1,
            text: "née".into(),
        };
        let sample = serde_json::to_string(&Record {
            time: 0.0,
            event: sample,
        })
        .unwrap();
        let cut = sample.find('é').unwrap() + 1;
        file.write_all(&sample.as_bytes()[..cut]).unwrap();
        file.flush().unwrap();
        let mut log = RunLog::new(&dir);
        assert!(log.poll().unwrap());
        assert_eq!(log.steps.len(), 1);
        assert!(log.samples.is_empty());
        file.write_all(&sample.as_bytes()[cut..]).unwrap();
        writeln!(file).unwrap();
        let half = step_line(2, 4.5);
        file.write_all(&half.as_bytes()[..10]).unwrap();
        file.flush().unwrap();
        assert!(log.poll().unwrap());
        assert_eq!(log.samples, [(1, "née".to_string())]);
        writeln!(file, "{}", &half[10..]).unwrap();
        writeln!(file, r#"{{"type":"step","step":3}}"#).unwrap();
        file.flush().unwrap();
        assert!(log.poll().unwrap());
        assert_eq!(
            log.steps.iter().map(|s| s.loss).collect::<Vec<_>>(),
            [5.0, 4.5]
        );
        // A line that is not a valid event is counted, not guessed at.
        assert_eq!(log.bad_lines, 1);
        assert!(log
            .first_error
            .as_deref()
            .unwrap()
            .contains("missing field"));
        assert!(!log.poll().unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
