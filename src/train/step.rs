//! The training loop, one step at a time: data, forward and backward over the micro-batches,
//! the all-reduce, the optimizer step (or a skip when the loss or gradient is not finite),
//! then the periodic work (validation, a sample, a checkpoint), the step's telemetry, and at
//! the end the efficiency report.

use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{bail, Result};
use kiln_core::backend::{Backend, HostReduce, LaunchTime, View};
use kiln_core::eval::EvalResult;
use kiln_core::model::Activations;
use kiln_core::optim::{adamw_step, muon_adam_step, AdamW, LossScaler, MuonAdam};
use kiln_formats::data::Split;
use kiln_formats::fsutil::write_atomic;

use super::{human_duration, say, OptimizerKind, TrainConfig, Trainer};
use crate::telemetry::{
    memory_mib, Eval, Event, PerStage, RunReport, Stage, Start, Step, StopReason,
};

fn seconds_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// The state of one `run_until` call.
struct Progress {
    started: Instant,
    /// Seconds spent per stage so far in this call.
    stages: PerStage,
    losses: Vec<f32>,
    consecutive_bad: u64,
    last_val: Option<EvalResult>,
    last_loss: f32,
    last_step_seconds: f64,
    steps_at_start: u64,
    /// Rank 0's elapsed seconds at the end of the last step, which every process of a
    /// data-parallel run takes as the run's clock (budgets and time-based schedules must not
    /// see each process's own clock, or the processes would part ways).
    agreed_elapsed: f64,
    /// The run's clock at the last checkpoint (or the start), for `checkpoint_seconds`.
    last_checkpoint_clock: f64,
    /// The step [`Trainer::periodic`] last saved a checkpoint at.
    checkpointed_step: Option<u64>,
    /// Device time by launch name, where the backend times its launches: (ms, launches).
    launch_times: std::collections::BTreeMap<String, (f64, usize)>,
}

impl Progress {
    /// Adds the time since `t` to `stage`.
    fn charge(&mut self, stage: Stage, t: Instant) {
        *self.stages.get_mut(stage) += seconds_since(t);
    }
}

/// What a step did: its loss, what the optimizer part found, and how long it took.
struct Update {
    loss: f32,
    grad_norm: f64,
    lr: f32,
    finite: bool,
    /// The loss scale this step ran at (with loss scaling).
    loss_scale: Option<f32>,
    seconds: f64,
}

/// The run's constant rates: FLOPs per step and the matmul peak MFU is measured against.
struct Rates {
    flops_per_step: f64,
    peak_gflops: f64,
}

impl<B: Backend> Trainer<B> {
    /// Trains until a budget is reached. Returns the run's report.
    pub fn run(&mut self) -> Result<RunReport> {
        self.run_until(None)
    }

    /// Trains until a budget is reached or, if given, until step `stop_at`, as if the process
    /// were stopped there (the budget and schedule stay those of the whole run).
    pub fn run_until(&mut self, stop_at: Option<u64>) -> Result<RunReport> {
        let cfg = self.config.clone();
        let rates = Rates {
            flops_per_step: cfg.model.train_flops_per_token(cfg.seq) * cfg.tokens_per_step() as f64,
            // Each process's peak, times the processes: MFU of the whole run.
            peak_gflops: self.communicator.world_size() as f64
                * match self.peak_gflops {
                    Some(peak) => peak,
                    None => crate::bench::measure_matmul_peak(&self.model.backend, 512)?,
                },
        };
        self.start(&cfg, &rates)?;
        let acts = self.model.loss_activations(cfg.batch, cfg.seq)?;
        // The arena of a sequence-length warmup's current shape, while it lasts.
        let mut short: Option<((usize, usize), Activations<B>)> = None;
        let val_tokens = self.dataset.read_all(Split::Val)?;
        let mut run = Progress {
            started: Instant::now(),
            stages: PerStage::default(),
            losses: Vec::new(),
            consecutive_bad: 0,
            last_val: None,
            last_loss: f32::NAN,
            last_step_seconds: 0.0,
            steps_at_start: self.step,
            agreed_elapsed: self.elapsed_before,
            last_checkpoint_clock: self.elapsed_before,
            checkpointed_step: None,
            launch_times: Default::default(),
        };
        let world = self.communicator.world_size();
        if world > 1 {
            self.check_replicas("at the start")?;
        }
        let flag = self.interrupt.clone();
        let interrupted = || flag.as_ref().is_some_and(|f| f.load(Ordering::Relaxed));
        // With several processes, a signal is acted on only once they agree (after a step).
        let signalled_alone = || world == 1 && interrupted();
        while !self.finished(&cfg, stop_at, self.clock(&run), run.last_step_seconds)
            && !signalled_alone()
        {
            let step_started = Instant::now();
            let before = run.stages;
            self.communicator.at_step(self.step);
            // A sequence-length warmup's shorter sequences: the loader's tokens are the same
            // (batch × seq of the stream), read as more, shorter rows.
            let shape = cfg.batch_shape_at(self.step);
            if short.as_ref().is_some_and(|(s, _)| *s != shape) {
                // The last shape's arena goes before the next is allocated.
                drop(short.take());
            }
            if shape != (cfg.batch, cfg.seq) && short.is_none() {
                short = Some((shape, self.model.loss_activations(shape.0, shape.1)?));
            }
            let step_acts = short.as_ref().map_or(&acts, |(_, a)| a);
            let loss = self.forward_backward(&cfg, step_acts, &mut run)?;
            let mut update = self.update(&cfg, loss, &mut run)?;
            update.seconds = seconds_since(step_started);
            // Read once per step: a signal arriving later is seen at the next boundary.
            let (elapsed, step_seconds, signalled) =
                self.agree(&mut run, update.seconds, interrupted())?;
            let done = self.finished(&cfg, stop_at, elapsed, step_seconds);
            let interrupt = !done && signalled;
            run.last_step_seconds = step_seconds;
            self.print_step(&cfg, &run, &update, &rates, done);
            let stop_for_bad_steps = !update.finite && run.consecutive_bad >= cfg.max_bad_steps;
            if !update.finite {
                match (update.loss_scale, self.loss_scale) {
                    (Some(was), Some(now)) if loss.is_finite() => say!(
                        self.echo,
                        "step {}: gradients overflowed at loss scale {was}; step skipped, scale now {}",
                        self.step,
                        now.scale
                    ),
                    _ => say!(
                        self.echo,
                        "step {}: non-finite loss {loss} or gradient norm {}; step skipped ({} so far)",
                        self.step,
                        update.grad_norm,
                        self.skipped
                    ),
                }
            }
            if !stop_for_bad_steps {
                self.periodic(&cfg, &acts, &val_tokens, done, &mut run)?;
                if interrupt && run.checkpointed_step != Some(self.step) && self.lead() {
                    let t = Instant::now();
                    let path = self.save_checkpoint(self.elapsed(&run), None)?;
                    run.charge(Stage::Checkpoint, t);
                    self.telemetry.emit(Event::Checkpoint {
                        step: self.step,
                        path: path.clone(),
                        ms: seconds_since(t) * 1e3,
                    })?;
                }
            }
            // Read each step, so the backend's timing events do not pile up over a long run.
            for t in self.model.backend.launch_times().unwrap_or_default() {
                let entry = run.launch_times.entry(t.name).or_default();
                entry.0 += t.ms;
                entry.1 += t.launches;
            }
            self.emit_step(&cfg, &run, &update, &rates, &before)?;
            if stop_for_bad_steps {
                self.telemetry.emit(Event::Stopped {
                    step: self.step,
                    reason: StopReason::NonFinite,
                    consecutive: run.consecutive_bad,
                })?;
                bail!(
                    "stopping: {} consecutive steps had a non-finite loss or gradient; the weights were not updated by them, and the last good checkpoint in {} is intact",
                    run.consecutive_bad,
                    self.run_dir.join("checkpoints").display()
                );
            }
            if interrupt {
                self.telemetry.emit(Event::Stopped {
                    step: self.step,
                    reason: StopReason::Interrupted,
                    consecutive: 0,
                })?;
                say!(
                    self.echo,
                    "interrupted: stopped after step {} with a checkpoint; continue with \
                     `kiln train --resume {}`",
                    self.step,
                    self.run_dir.display()
                );
                break;
            }
        }
        self.report(&cfg, run, &rates)
    }

    fn elapsed(&self, run: &Progress) -> f64 {
        self.elapsed_before + seconds_since(run.started)
    }

    /// The run's clock: this process's own alone, rank 0's as last agreed with several.
    fn clock(&self, run: &Progress) -> f64 {
        if self.communicator.world_size() == 1 {
            self.elapsed(run)
        } else {
            run.agreed_elapsed
        }
    }

    /// Whether this process writes the run (checkpoints, telemetry, samples, the report).
    fn lead(&self) -> bool {
        self.communicator.rank() == 0
    }

    /// What every process must agree on after a step: `(elapsed seconds, this step's
    /// seconds, whether a stop was signalled)`. Alone, this process's own; with several,
    /// rank 0's clock and a signal any process received, in one small all-reduce.
    fn agree(
        &mut self,
        run: &mut Progress,
        step_seconds: f64,
        signalled: bool,
    ) -> Result<(f64, f64, bool)> {
        if self.communicator.world_size() == 1 {
            return Ok((self.elapsed(run), step_seconds, signalled));
        }
        let t = Instant::now();
        // Rank 0's clock wins the maximum over the others' −∞.
        let mut values = if self.lead() {
            [self.elapsed(run), step_seconds, 0.0]
        } else {
            [f64::NEG_INFINITY, f64::NEG_INFINITY, 0.0]
        };
        values[2] = if signalled { 1.0 } else { 0.0 };
        self.communicator
            .all_reduce_host(&mut values, HostReduce::Max)?;
        run.charge(Stage::Allreduce, t);
        run.agreed_elapsed = values[0];
        Ok((values[0], values[1], values[2] > 0.0))
    }

    /// Checks that every process holds the same weights, step and data position (a
    /// fingerprint of each, compared by an all-reduce of its minimum and maximum): processes
    /// that parted ways would otherwise train on silently.
    fn check_replicas(&mut self, when: &str) -> Result<()> {
        // The weights in pieces of 4 MiB, so that no copy of them all is made.
        let all = View::whole(&self.model.params);
        let mut piece = vec![0f32; all.len().min(1 << 20)];
        let mut words = Vec::with_capacity(all.len().div_ceil(piece.len().max(1)));
        let mut start = 0;
        while start < all.len() {
            let len = piece.len().min(all.len() - start);
            self.model
                .backend
                .download(all.slice(start, len), &mut piece[..len])?;
            words.push(fingerprint(piece[..len].iter().map(|p| p.to_bits() as u64)));
            start += len;
        }
        let position = self.loader.position;
        let state = [
            self.step,
            self.model.step,
            position.epoch,
            position.shard as u64,
            position.offset as u64,
        ];
        let fingerprint = fingerprint(
            words
                .into_iter()
                .map(f64::to_bits)
                .chain(state)
                .chain(serde_json::to_string(&self.config)?.bytes().map(u64::from)),
        );
        let mut low = [fingerprint];
        let mut high = [fingerprint];
        self.communicator
            .all_reduce_host(&mut low, HostReduce::Min)?;
        self.communicator
            .all_reduce_host(&mut high, HostReduce::Max)?;
        if low != high {
            bail!(
                "the {} processes hold different weights, steps, data positions or settings {when} \
                 (step {}): were they started with the same flags and files?",
                self.communicator.world_size(),
                self.step
            );
        }
        Ok(())
    }

    /// Whether to stop: a budget is spent, the next step would overrun the time budget, or
    /// `stop_at` is reached.
    fn finished(
        &self,
        cfg: &TrainConfig,
        stop_at: Option<u64>,
        elapsed: f64,
        step_seconds: f64,
    ) -> bool {
        cfg.progress(self.step, elapsed) >= 1.0
            || cfg
                .time_budget_seconds
                .is_some_and(|b| elapsed + step_seconds > b)
            || stop_at.is_some_and(|s| self.step >= s)
    }

    fn start(&mut self, cfg: &TrainConfig, rates: &Rates) -> Result<()> {
        self.telemetry.emit(Event::Start(Box::new(Start {
            step: self.step,
            backend: self.model.backend.name(),
            world_size: self.communicator.world_size(),
            parameters: self.model.param_count(),
            model: cfg.model.clone(),
            train: cfg.clone(),
            peak_gflops: rates.peak_gflops,
            flops_per_step: rates.flops_per_step,
            tokens_per_step: cfg.tokens_per_step(),
            max_steps: cfg.max_steps,
            max_tokens: cfg.max_tokens,
            time_budget_seconds: cfg.time_budget_seconds,
        })))?;
        let world = self.communicator.world_size();
        say!(
            self.echo,
            "training {} parameters on {}{} | {} tokens/step | peak {:.1} GFLOP/s (MFU is against it)",
            self.model.param_count(),
            self.model.backend.name(),
            if world > 1 { format!(" × {world} processes") } else { String::new() },
            cfg.tokens_per_step(),
            rates.peak_gflops
        );
        Ok(())
    }

    /// Zeroes the gradients, runs every micro-batch forward and backward (the gradients
    /// averaged over micro-batches and processes), and all-reduces them. Returns this
    /// process's mean loss.
    fn forward_backward(
        &mut self,
        cfg: &TrainConfig,
        acts: &Activations<B>,
        run: &mut Progress,
    ) -> Result<f32> {
        self.model.zero_grad();
        if let Some(sigma) = cfg.ternary_noise {
            // This step's noise: from the run's seed and the step, so a resume draws the same.
            let seed = cfg.seed ^ (self.step + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
            self.model.refresh_weights_noisy(sigma, seed)?;
        }
        let world = self.communicator.world_size();
        let rank = self.communicator.rank();
        let mut loss_sum = 0f32;
        let per_step = (cfg.accumulation * world) as u64;
        for micro in 0..cfg.accumulation {
            let t = Instant::now();
            // Of each `world` batches in turn, this process trains on the `rank`-th: together
            // the processes read what one process with `world` times the micro-batches would.
            for _ in 0..rank {
                self.loader.skip()?;
            }
            let (x, y) = self.loader.next_batch()?;
            for _ in rank + 1..world {
                self.loader.skip()?;
            }
            let (x, y) = match &self.vocab_map {
                Some(m) => (m.to_model(&x)?, m.to_model(&y)?),
                None => (x, y),
            };
            run.charge(Stage::Data, t);
            let t = Instant::now();
            // The batch's place in the run, as one process would read it (rank r's micro-batch
            // m is batch m·world + r of the step), so resuming on another world size draws
            // the same layers.
            let index = self.step * per_step + (micro * world + rank) as u64;
            let dropped = cfg.dropped_layers(index);
            let loss = self.model.forward_dropping(acts, &x, Some(&y), &dropped)?;
            loss_sum += loss.expect("targets were given");
            run.charge(Stage::Forward, t);
            let t = Instant::now();
            // With loss scaling, the loss's gradient is scaled up (a power of two: exact);
            // `update` divides it out of the gradients.
            let scale = self.loss_scale.map_or(1.0, |s| s.scale);
            let weight = scale / (cfg.accumulation * world) as f32;
            self.model
                .backward_dropping(acts, &x, &y, weight, &dropped)?;
            run.charge(Stage::Backward, t);
        }
        if world == 1 {
            return Ok(loss_sum / cfg.accumulation as f32);
        }
        let t = Instant::now();
        let grads = View::whole(&self.model.grads);
        self.communicator
            .all_reduce_sum(&self.model.backend, grads)?;
        // The step's loss over every process: a non-finite one on any process skips the step
        // on all of them.
        let mut loss = [loss_sum as f64];
        self.communicator
            .all_reduce_host(&mut loss, HostReduce::Sum)?;
        run.charge(Stage::Allreduce, t);
        Ok((loss[0] / (cfg.accumulation * world) as f64) as f32)
    }

    /// The optimizer step: clipping, AdamW or Muon + Adam, the moving average and the QAT
    /// shadow; skipped (weights untouched) when the loss or the gradient is not finite.
    fn update(&mut self, cfg: &TrainConfig, loss: f32, run: &mut Progress) -> Result<Update> {
        let t = Instant::now();
        if cfg.poison_steps.contains(&self.step) {
            let n = self.model.param_count();
            let grads = View::whole(&self.model.grads);
            self.model.backend.upload(grads, &vec![f32::NAN; n])?;
        }
        let loss_scale = self.loss_scale.map_or(1.0, |s| s.scale);
        let grad_norm = self.model.grad_norm() / loss_scale as f64;
        let lr_mult = cfg.lr_multiplier(self.step, self.clock(run));
        let lr = match cfg.optimizer {
            OptimizerKind::Adamw => cfg.learning_rate * lr_mult,
            OptimizerKind::Muon => cfg.muon.matrix_lr * lr_mult,
        };
        let finite = loss.is_finite() && grad_norm.is_finite();
        // A scaled step whose loss is finite but whose gradients overflowed backs the scale
        // off; it is skipped but not held against the run (unless the scale is already at its
        // floor, where it is a real failure).
        let overflow = match &mut self.loss_scale {
            Some(scaler) => {
                let floor = scaler.scale <= LossScaler::MIN_SCALE;
                scaler.update(finite);
                !finite && loss.is_finite() && !floor
            }
            None => false,
        };
        if finite {
            let clip = if cfg.grad_clip > 0.0 && grad_norm > cfg.grad_clip as f64 {
                (cfg.grad_clip as f64 / grad_norm) as f32
            } else {
                1.0
            };
            // Clipping and unscaling in one factor (both exact for a power-of-two scale).
            self.optimizer_step(cfg, lr, lr_mult, clip / loss_scale)?;
            self.model.update_ema();
            self.model.refresh_weights()?;
            run.consecutive_bad = 0;
        } else {
            // The weights did not change, but the shadow still holds this step's noise.
            if cfg.ternary_noise.is_some() {
                self.model.refresh_weights()?;
            }
            self.skipped += 1;
            if !overflow {
                run.consecutive_bad += 1;
            }
        }
        run.charge(Stage::Optimizer, t);
        self.step += 1;
        run.last_loss = loss;
        run.losses.push(loss);
        Ok(Update {
            loss,
            grad_norm,
            lr,
            finite,
            loss_scale: self.loss_scale.map(|_| loss_scale),
            seconds: 0.0,
        })
    }

    fn optimizer_step(
        &mut self,
        cfg: &TrainConfig,
        lr: f32,
        lr_mult: f32,
        grad_scale: f32,
    ) -> Result<()> {
        match cfg.optimizer {
            OptimizerKind::Adamw => {
                let hp = AdamW {
                    learning_rate: lr,
                    beta1: cfg.beta1,
                    beta2: cfg.beta2,
                    eps: cfg.adam_eps,
                    weight_decay: cfg.weight_decay,
                };
                adamw_step(&mut self.model, &hp, grad_scale)?;
            }
            OptimizerKind::Muon => {
                let m = &cfg.muon;
                let hp = MuonAdam {
                    matrix_lr: m.matrix_lr * lr_mult,
                    momentum: m.momentum_at(self.step),
                    ns_steps: m.ns_steps,
                    row_normalize: m.row_normalize,
                    weight_decay: cfg.weight_decay,
                    embed_lr: m.embed_lr * lr_mult,
                    head_lr: m.head_lr * lr_mult,
                    scalar_lr: m.scalar_lr * lr_mult,
                    beta1: cfg.beta1,
                    beta2: cfg.beta2,
                    eps: cfg.adam_eps,
                };
                muon_adam_step(&mut self.model, &hp, grad_scale)?;
            }
        }
        Ok(())
    }

    fn print_step(
        &self,
        cfg: &TrainConfig,
        run: &Progress,
        update: &Update,
        rates: &Rates,
        done: bool,
    ) {
        if self.print_every == 0 || (!self.step.is_multiple_of(self.print_every) && !done) {
            return;
        }
        let elapsed = self.clock(run);
        let progress = cfg.progress(self.step, elapsed);
        let eta = if progress > 0.0 {
            elapsed * (1.0 - progress) / progress
        } else {
            0.0
        };
        say!(self.echo,
            "step {:>6} | loss {:.4} | lr {:.2e} | norm {:.3} | {:.0} tok/s | {:.0} ms/step | {:.3} TFLOP/s | {:.0}% eta {}",
            self.step, update.loss, update.lr, update.grad_norm, cfg.tokens_per_step() as f64 / update.seconds,
            update.seconds * 1e3, rates.flops_per_step / update.seconds / 1e12, progress * 100.0, human_duration(eta)
        );
    }

    /// Validation, a sample and a checkpoint, each when due (every N steps, and at the end).
    fn periodic(
        &mut self,
        cfg: &TrainConfig,
        acts: &Activations<B>,
        val_tokens: &[u32],
        done: bool,
        run: &mut Progress,
    ) -> Result<()> {
        let step = self.step;
        let due = |every: u64| done || (every > 0 && step.is_multiple_of(every));
        // By steps, or by the run's clock (rank 0's as agreed: every process decides alike).
        let checkpoint = due(cfg.checkpoint_every)
            || (cfg.checkpoint_seconds > 0.0
                && self.clock(run) - run.last_checkpoint_clock >= cfg.checkpoint_seconds);
        if checkpoint {
            run.last_checkpoint_clock = self.clock(run);
            run.checkpointed_step = Some(step);
        }
        if checkpoint && self.communicator.world_size() > 1 {
            let t = Instant::now();
            self.check_replicas("before a checkpoint")?;
            run.charge(Stage::Allreduce, t);
        }
        // Rank 0 alone validates, samples and saves: the others hold the same weights.
        if !self.lead() {
            return Ok(());
        }
        if due(cfg.eval_every) {
            let t = Instant::now();
            // The step's activations are spent: validation reuses the same arena.
            let result = self.validate_now(acts, val_tokens)?;
            run.charge(Stage::Eval, t);
            self.telemetry.emit(Event::Eval(Eval {
                step,
                val_loss: result.loss,
                val_bpb: result.bits_per_byte,
                tokens: result.tokens,
                bytes: result.bytes,
                ms: seconds_since(t) * 1e3,
            }))?;
            say!(
                self.echo,
                "step {:>6} | val loss {:.4} | val bits/byte {:.4}",
                step,
                result.loss,
                result.bits_per_byte
            );
            run.last_val = Some(result);
        }
        if due(cfg.sample_every) && cfg.sample_tokens > 0 {
            let t = Instant::now();
            let text = self.sample_text(cfg.seed + step)?;
            run.charge(Stage::Eval, t);
            self.telemetry.emit(Event::Sample { step, text })?;
        }
        if checkpoint {
            let t = Instant::now();
            let val_here = if due(cfg.eval_every) {
                run.last_val
            } else {
                None
            };
            let path = self.save_checkpoint(self.elapsed(run), val_here)?;
            run.charge(Stage::Checkpoint, t);
            self.telemetry.emit(Event::Checkpoint {
                step,
                path,
                ms: seconds_since(t) * 1e3,
            })?;
        }
        Ok(())
    }

    /// One telemetry line per step, with every stage this step spent time in (eval, sampling
    /// and checkpointing only on the steps that do them).
    fn emit_step(
        &mut self,
        cfg: &TrainConfig,
        run: &Progress,
        update: &Update,
        rates: &Rates,
        before: &PerStage,
    ) -> Result<()> {
        let step_seconds = update.seconds;
        let tflops = rates.flops_per_step / step_seconds / 1e12;
        let elapsed = self.elapsed(run);
        let event = Event::Step(Step {
            step: self.step,
            loss: update.loss as f64,
            lr: update.lr as f64,
            grad_norm: update.grad_norm,
            skipped: !update.finite,
            skipped_total: self.skipped,
            tokens: self.step * cfg.tokens_per_step(),
            tokens_per_s: cfg.tokens_per_step() as f64 / step_seconds,
            ms_per_step: step_seconds * 1e3,
            ms: run.stages.since(before).to_ms(),
            tflops,
            mfu: tflops * 1e3 / rates.peak_gflops,
            rss_mib: memory_mib().map(|m| m.0),
            elapsed_s: elapsed,
            progress: cfg.progress(self.step, elapsed),
            seq: Some(cfg.batch_shape_at(self.step - 1).1).filter(|&s| s != cfg.seq),
            loss_scale: update.loss_scale,
        });
        self.telemetry.emit(event)
    }

    /// The end-of-run report: written to the telemetry and `report.json`.
    fn report(&mut self, cfg: &TrainConfig, run: Progress, rates: &Rates) -> Result<RunReport> {
        let wall = seconds_since(run.started);
        let steps = self.step - run.steps_at_start;
        let stages = run.stages;
        let compute = stages.total() - stages.eval - stages.checkpoint;
        let tokens = steps * cfg.tokens_per_step();
        let tflops = if compute > 0.0 {
            rates.flops_per_step * steps as f64 / compute / 1e12
        } else {
            0.0
        };
        let report = RunReport {
            steps: self.step,
            skipped_steps: self.skipped,
            tokens: self.step * cfg.tokens_per_step(),
            wall_seconds: wall,
            ms_per_step: if steps > 0 {
                compute / steps as f64 * 1e3
            } else {
                0.0
            },
            tokens_per_second: if compute > 0.0 {
                tokens as f64 / compute
            } else {
                0.0
            },
            tflops,
            mfu: tflops * 1e3 / rates.peak_gflops,
            peak_gflops: rates.peak_gflops,
            stage_seconds: stages,
            final_loss: run.last_loss,
            val: run.last_val,
            peak_memory_mib: memory_mib().map(|m| m.1),
            losses: run.losses,
        };
        if !run.launch_times.is_empty() {
            let mut launches: Vec<LaunchTime> = run
                .launch_times
                .into_iter()
                .map(|(name, (ms, launches))| LaunchTime { name, ms, launches })
                .collect();
            launches.sort_by(|a, b| b.ms.total_cmp(&a.ms));
            self.telemetry
                .emit(Event::LaunchTimes { steps, launches })?;
        }
        self.telemetry
            .emit(Event::Report(Box::new(report.clone())))?;
        if self.lead() {
            write_atomic(
                &self.run_dir.join("report.json"),
                serde_json::to_string_pretty(&report)?.as_bytes(),
            )?;
        }
        Ok(report)
    }
}

/// Prints the end-of-run efficiency report.
pub fn print_report(report: &RunReport) {
    let stages = &report.stage_seconds;
    let total = stages.total();
    eprintln!();
    eprintln!("=== efficiency report ===");
    eprintln!(
        "wall time        {:>10}",
        human_duration(report.wall_seconds)
    );
    eprintln!(
        "steps            {:>10} ({} skipped)",
        report.steps, report.skipped_steps
    );
    eprintln!(
        "ms/step          {:>10.1}   (training stages only)",
        report.ms_per_step
    );
    eprintln!("tokens/s         {:>10.0}", report.tokens_per_second);
    eprintln!(
        "TFLOP/s          {:>10.4}   MFU {:.1}% of the {:.1} GFLOP/s peak (the probe of the precision in use)",
        report.tflops,
        report.mfu * 100.0,
        report.peak_gflops
    );
    if let Some(mem) = report.peak_memory_mib {
        eprintln!("peak memory      {:>10.0} MiB", mem);
    }
    for stage in Stage::ALL {
        let s = stages.get(stage);
        eprintln!(
            "  {:<12} {:>9.1} s  {:>5.1}%",
            stage.name(),
            s,
            if total > 0.0 { 100.0 * s / total } else { 0.0 }
        );
    }
    eprintln!("final loss       {:>10.4}", report.final_loss);
    if let Some(val) = report.val {
        eprintln!(
            "val loss         {:>10.4}   bits/byte {:.4}",
            val.loss, val.bits_per_byte
        );
    }
}

/// FNV-1a over 64-bit words, folded to 52 bits so that an `f64` holds it exactly (the
/// all-reduce that compares processes' fingerprints carries `f64`s).
fn fingerprint(words: impl Iterator<Item = u64>) -> f64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for word in words {
        hash ^= word;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ((hash ^ (hash >> 52)) & ((1 << 52) - 1)) as f64
}
