//! `kiln dashboard RUN_DIR` (and `kiln train --dashboard`): a terminal view of a live or
//! finished run, built only from the run directory — `telemetry.jsonl` and the checkpoints —
//! never from printed text. It reads the files a few times a second and never writes, so
//! training does not wait on it.
//!
//! Panels: the selected curve (loss, learning rate, gradient norm or throughput) against
//! steps, tokens or wall time, with validation points; throughput, TFLOP/s, MFU and a bar of
//! time per stage; learning rate and gradient norm; the machine (CPU per core, resident
//! memory, power from Intel RAPL where exposed); progress and ETA; and text sampled from the
//! newest checkpoint with kiln's own sampler and KV cache, in a background thread.
//! Keys: `q` quit, `p` pause, `x` switch the x axis, `c` switch the curve.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Result;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Borders, Chart, Dataset, Gauge, GraphType, Paragraph, Wrap};
use ratatui::Frame;

use kiln_core::backend::Backend;
use kiln_core::model::Model;
use kiln_core::sample::{complete, SamplingParams};
use kiln_formats::checkpoint;

use crate::backends::Selection;
use crate::runlog::RunLog;
use crate::telemetry::{human_duration, PerStage, Stage, Step, StopReason};

const STAGE_COLORS: [Color; Stage::ALL.len()] = [
    Color::Gray,
    Color::Cyan,
    Color::Blue,
    Color::Green,
    Color::Magenta,
    Color::Yellow,
    Color::Red,
];

#[derive(Clone, Copy, PartialEq)]
enum XAxis {
    Steps,
    Tokens,
    Time,
}

#[derive(Clone, Copy, PartialEq)]
enum Curve {
    Loss,
    LearningRate,
    GradNorm,
    Throughput,
}

impl Curve {
    fn name(self) -> &'static str {
        match self {
            Curve::Loss => "loss",
            Curve::LearningRate => "learning rate",
            Curve::GradNorm => "gradient norm",
            Curve::Throughput => "tokens/s",
        }
    }
    fn value(self, s: &Step) -> f64 {
        match self {
            Curve::Loss => s.loss,
            Curve::LearningRate => s.lr,
            Curve::GradNorm => s.grad_norm,
            Curve::Throughput => s.tokens_per_s,
        }
    }
}

/// CPU use per core from /proc/stat, as the share of time busy since the last reading.
#[derive(Default)]
struct CpuMeter {
    last: Vec<(u64, u64)>,
    usage: Vec<f64>,
}

impl CpuMeter {
    fn update(&mut self) {
        let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
            return;
        };
        let now: Vec<(u64, u64)> = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .map(|l| {
                let v: Vec<u64> = l
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
                (v.iter().sum(), idle)
            })
            .collect();
        if self.last.len() == now.len() {
            self.usage = now
                .iter()
                .zip(&self.last)
                .map(|((t1, i1), (t0, i0))| {
                    let total = t1.saturating_sub(*t0) as f64;
                    if total > 0.0 {
                        1.0 - i1.saturating_sub(*i0) as f64 / total
                    } else {
                        0.0
                    }
                })
                .collect();
        }
        self.last = now;
    }
}

/// Package power from Intel RAPL (`/sys/class/powercap/intel-rapl:0/energy_uj`), if exposed.
#[derive(Default)]
struct PowerMeter {
    last: Option<(u64, Instant)>,
    watts: Option<f64>,
}

impl PowerMeter {
    fn update(&mut self) {
        let Some(energy) = std::fs::read_to_string("/sys/class/powercap/intel-rapl:0/energy_uj")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        else {
            return;
        };
        let now = Instant::now();
        if let Some((e0, t0)) = self.last {
            let dt = now.duration_since(t0).as_secs_f64();
            if energy >= e0 && dt > 0.0 {
                self.watts = Some((energy - e0) as f64 / 1e6 / dt);
            }
        }
        self.last = Some((energy, now));
    }
}

/// Samples text from each new checkpoint in a background thread.
struct Sampler {
    results: mpsc::Receiver<(u64, String)>,
    requests: mpsc::Sender<PathBuf>,
    last_checkpoint: Option<PathBuf>,
}

impl Sampler {
    fn start(tokens: usize, backend: Selection) -> Self {
        let (req_tx, req_rx) = mpsc::channel::<PathBuf>();
        let (res_tx, res_rx) = mpsc::channel();
        std::thread::spawn(move || {
            while let Ok(mut dir) = req_rx.recv() {
                // Only the newest request matters.
                while let Ok(newer) = req_rx.try_recv() {
                    dir = newer;
                }
                let text = sample_checkpoint(&dir, tokens, backend)
                    .unwrap_or_else(|e| format!("(no sample: {e:#})"));
                let step = checkpoint::read_manifest(&dir).map(|m| m.step).unwrap_or(0);
                if res_tx.send((step, text)).is_err() {
                    break;
                }
            }
        });
        Sampler {
            results: res_rx,
            requests: req_tx,
            last_checkpoint: None,
        }
    }

    fn check(&mut self, run_dir: &Path) {
        let newest = checkpoint::list(&run_dir.join("checkpoints"))
            .ok()
            .and_then(|mut l| l.pop())
            .map(|c| c.1);
        if let Some(dir) = newest.filter(|n| Some(n) != self.last_checkpoint.as_ref()) {
            self.last_checkpoint = Some(dir.clone());
            let _ = self.requests.send(dir);
        }
    }
}

/// A sample of `tokens` tokens from a checkpoint, with the engine's sampler and KV cache, on
/// the backend the dashboard was given.
fn sample_checkpoint(dir: &Path, tokens: usize, backend: Selection) -> Result<String> {
    crate::with_backend!(backend, |b| sample_checkpoint_on(b, dir, tokens))
}

fn sample_checkpoint_on<B: Backend>(backend: B, dir: &Path, tokens: usize) -> Result<String> {
    let imported = crate::rundir::import(dir, None)?;
    let tokenizer = imported
        .tokenizer
        .ok_or_else(|| anyhow::anyhow!("no tokenizer beside the checkpoint"))?;
    let model = Model::for_inference(backend, imported.config)?;
    model.upload_params(&imported.weights)?;
    let prompt: Vec<u32> = tokenizer.bos().into_iter().collect();
    anyhow::ensure!(
        !prompt.is_empty(),
        "the tokenizer has no BOS token to start from"
    );
    let params = SamplingParams {
        temperature: 0.8,
        top_k: 0,
        top_p: 0.95,
        seed: 7,
    };
    let (text, _) = complete(
        &model,
        &tokenizer,
        imported.vocab_map.as_ref(),
        &prompt,
        tokens,
        &params,
        false,
        |_| {},
    )?;
    Ok(text)
}

struct App {
    log: RunLog,
    x_axis: XAxis,
    curve: Curve,
    paused: bool,
    cpu: CpuMeter,
    power: PowerMeter,
    sampler: Option<Sampler>,
    sample: Option<(u64, String)>,
}

impl App {
    fn x(&self, s: &Step) -> f64 {
        match self.x_axis {
            XAxis::Steps => s.step as f64,
            XAxis::Tokens => s.tokens as f64 / 1e6,
            XAxis::Time => s.elapsed_s / 60.0,
        }
    }
    fn x_title(&self) -> &'static str {
        match self.x_axis {
            XAxis::Steps => "step",
            XAxis::Tokens => "tokens (M)",
            XAxis::Time => "minutes",
        }
    }
}

fn span_bounds(values: impl Iterator<Item = f64>) -> [f64; 2] {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return [0.0, 1.0];
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    [lo - pad, hi + pad]
}

fn fmt_axis(v: f64) -> String {
    let a = v.abs();
    if a >= 1e4 || (a < 1e-2 && a > 0.0) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Exponential moving average (weight 0.9 on the past): a readable trend through noisy steps.
fn smoothed(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut ema = None;
    points
        .iter()
        .map(|&(x, y)| {
            let e = ema.map_or(y, |e: f64| 0.9 * e + 0.1 * y);
            ema = Some(e);
            (x, e)
        })
        .collect()
}

/// A line chart of `data` (raw, dim) with its smoothed trend (`trend`, bright) and optional
/// validation markers. The x axis spans exactly the data; the y axis gets a little margin.
fn chart<'a>(
    title: String,
    x_title: &'a str,
    data: &'a [(f64, f64)],
    trend: &'a [(f64, f64)],
    markers: &'a [(f64, f64)],
    color: Color,
) -> Chart<'a> {
    let xs = data
        .iter()
        .chain(markers)
        .map(|p| p.0)
        .filter(|v| v.is_finite());
    let xb = xs
        .clone()
        .fold(None, |acc: Option<[f64; 2]>, v| {
            Some(acc.map_or([v, v], |[a, b]| [a.min(v), b.max(v)]))
        })
        .map_or(
            [0.0, 1.0],
            |[a, b]| if b > a { [a, b] } else { [a, a + 1.0] },
        );
    let yb = span_bounds(data.iter().chain(markers).map(|p| p.1));
    let raw_color = if trend.is_empty() {
        color
    } else {
        Color::DarkGray
    };
    let mut sets = vec![Dataset::default()
        .name("train")
        .marker(Marker::Braille)
        .graph_type(GraphType::Line)
        .style(Style::default().fg(raw_color))
        .data(data)];
    if !trend.is_empty() {
        sets.push(
            Dataset::default()
                .name("smoothed")
                .marker(Marker::Braille)
                .graph_type(GraphType::Line)
                .style(Style::default().fg(color))
                .data(trend),
        );
    }
    if !markers.is_empty() {
        sets.push(
            Dataset::default()
                .name("validation")
                .marker(Marker::Dot)
                .graph_type(GraphType::Scatter)
                .style(Style::default().fg(Color::LightRed))
                .data(markers),
        );
    }
    Chart::new(sets)
        .block(Block::default().borders(Borders::ALL).title(title))
        .x_axis(Axis::default().title(x_title).bounds(xb).labels([
            fmt_axis(xb[0]),
            fmt_axis((xb[0] + xb[1]) / 2.0),
            fmt_axis(xb[1]),
        ]))
        .y_axis(Axis::default().bounds(yb).labels([
            fmt_axis(yb[0]),
            fmt_axis((yb[0] + yb[1]) / 2.0),
            fmt_axis(yb[1]),
        ]))
}

fn stage_bar(last: &PerStage, totals: &PerStage, width: usize) -> Vec<Line<'static>> {
    let sum = totals.total();
    let mut bar = Vec::new();
    let mut legend = Vec::new();
    for (stage, color) in Stage::ALL.into_iter().zip(STAGE_COLORS) {
        let share = if sum > 0.0 {
            totals.get(stage) / sum
        } else {
            0.0
        };
        let cells = (share * width as f64).round() as usize;
        bar.push(Span::styled("█".repeat(cells), Style::default().fg(color)));
        legend.push(Span::styled(
            format!("■ {} {:.0}% ", stage.name(), share * 100.0),
            Style::default().fg(color),
        ));
    }
    let last_line = format!(
        "last step: fwd {:.0} ms · bwd {:.0} ms · opt {:.0} ms · data {:.1} ms",
        last.forward, last.backward, last.optimizer, last.data
    );
    vec![Line::from(bar), Line::from(legend), Line::from(last_line)]
}

/// The whole screen: header, main curve and throughput, learning rate / gradient norm /
/// machine, the newest sample, the keys.
fn draw(frame: &mut Frame, app: &App) {
    let rows = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(10),
        Constraint::Length(10),
        Constraint::Length(7),
        Constraint::Length(1),
    ])
    .split(frame.area());
    draw_header(frame, app, rows[0]);
    let top =
        Layout::horizontal([Constraint::Percentage(62), Constraint::Percentage(38)]).split(rows[1]);
    draw_main_curve(frame, app, top[0]);
    draw_throughput(frame, app, top[1]);
    let mid = Layout::horizontal([
        Constraint::Percentage(31),
        Constraint::Percentage(31),
        Constraint::Percentage(38),
    ])
    .split(rows[2]);
    draw_schedule(frame, app, mid[0], mid[1]);
    draw_machine(frame, app, mid[2]);
    draw_sample(frame, app, rows[3]);
    let keys = format!(
        " q quit · p {} · x x-axis: {} · c curve: {} ",
        if app.paused { "resume" } else { "pause" },
        app.x_title(),
        app.curve.name()
    );
    frame.render_widget(
        Paragraph::new(keys).style(Style::default().fg(Color::DarkGray)),
        rows[4],
    );
}

/// Run, backend, parameters, budget; progress, elapsed time and ETA.
fn draw_header(frame: &mut Frame, app: &App, area: Rect) {
    let log = &app.log;
    let last = log.steps.last();
    let start = log.start.as_ref();
    let progress = last.map_or(0.0, |s| s.progress.clamp(0.0, 1.0));
    let elapsed = last.map_or(0.0, |s| s.elapsed_s);
    let eta = if progress > 0.0 {
        elapsed * (1.0 - progress) / progress
    } else {
        0.0
    };
    let state = if log.finished() {
        "finished".to_string()
    } else if app.paused {
        "paused".to_string()
    } else {
        format!("eta {}", human_duration(eta))
    };
    let budget = start.map_or(String::new(), |s| {
        [
            (s.max_steps.map(|v| v as f64), "steps"),
            (s.max_tokens.map(|v| v as f64), "tokens"),
            (s.time_budget_seconds, "s"),
        ]
        .iter()
        .filter_map(|(v, unit)| v.map(|v| format!("{v} {unit}")))
        .collect::<Vec<_>>()
        .join(" / ")
    });
    let title = format!(
        " kiln · {} · {}{} · {} parameters · budget {} ",
        log.name(),
        start.map_or("?", |s| s.backend.as_str()),
        match start.map_or(1, |s| s.world_size) {
            1 => String::new(),
            world => format!(" × {world} processes"),
        },
        start.map_or("?".into(), |s| s.parameters.to_string()),
        budget
    );
    let label = format!(
        "step {} · {:.0}% · {} elapsed · {}",
        last.map_or(0, |s| s.step),
        progress * 100.0,
        human_duration(elapsed),
        state
    );
    frame.render_widget(
        Gauge::default()
            .block(Block::default().borders(Borders::ALL).title(title))
            .gauge_style(Style::default().fg(Color::Green))
            .ratio(progress)
            .label(label),
        area,
    );
}

/// The selected curve against the selected x axis, smoothed, with validation points.
fn draw_main_curve(frame: &mut Frame, app: &App, area: Rect) {
    let log = &app.log;
    let points: Vec<(f64, f64)> = log
        .steps
        .iter()
        .filter(|s| !s.skipped)
        .map(|s| (app.x(s), app.curve.value(s)))
        .collect();
    let markers: Vec<(f64, f64)> = if app.curve == Curve::Loss {
        log.evals
            .iter()
            .filter_map(|e| log.step_at(e.step).map(|s| (app.x(s), e.val_loss)))
            .collect()
    } else {
        Vec::new()
    };
    let val = log.evals.last().map_or(String::new(), |e| {
        format!(" · val {:.4} · {:.4} bits/byte", e.val_loss, e.val_bpb)
    });
    let title = format!(
        " {} vs {} · last {}{val} ",
        app.curve.name(),
        app.x_title(),
        log.steps
            .last()
            .map_or("-".into(), |s| format!("{:.4}", app.curve.value(s)))
    );
    let trend = if app.curve == Curve::Loss {
        smoothed(&points)
    } else {
        Vec::new()
    };
    let chart = chart(title, app.x_title(), &points, &trend, &markers, Color::Cyan);
    frame.render_widget(chart, area);
}

/// Tokens/s, ms/step, TFLOP/s and MFU over the last steps, and the bar of time per stage.
fn draw_throughput(frame: &mut Frame, app: &App, area: Rect) {
    let log = &app.log;
    let mut lines = Vec::new();
    if let Some(s) = log.steps.last() {
        let n = log.steps.len().min(20);
        let recent = &log.steps[log.steps.len() - n..];
        let tps = recent.iter().map(|s| s.tokens_per_s).sum::<f64>() / n as f64;
        let ms = recent.iter().map(|s| s.ms_per_step).sum::<f64>() / n as f64;
        let world = log.start.as_ref().map_or(1, |s| s.world_size);
        let over = if world > 1 {
            format!(", all {world} processes")
        } else {
            String::new()
        };
        lines.push(Line::from(format!(
            "tokens/s  {tps:>10.0}   (mean of last {n} steps{over})"
        )));
        lines.push(Line::from(format!("ms/step   {ms:>10.1}")));
        if world > 1 {
            let reduce = recent.iter().map(|s| s.ms.allreduce).sum::<f64>() / n as f64;
            lines.push(Line::from(format!(
                "all-reduce{reduce:>10.1} ms/step ({:.1}%)",
                100.0 * reduce / ms
            )));
        }
        lines.push(Line::from(format!(
            "TFLOP/s   {:>10.4}   MFU {:.1}%",
            s.tflops,
            s.mfu * 100.0
        )));
        lines.push(Line::from(format!(
            "peak      {:>10.1} GFLOP/s (MFU is against it)",
            log.start.as_ref().map_or(f64::NAN, |s| s.peak_gflops)
        )));
        lines.push(Line::from(""));
        lines.push(Line::styled(
            "time per stage (whole run)",
            Style::default().add_modifier(Modifier::BOLD),
        ));
        let width = area.width.saturating_sub(4) as usize;
        lines.extend(stage_bar(&s.ms, &log.stage_totals(), width));
    } else {
        lines.push(Line::from("waiting for the first step…"));
    }
    if log.bad_lines > 0 {
        lines.push(Line::styled(
            format!(
                "{} unreadable telemetry lines: {}",
                log.bad_lines,
                log.first_error.as_deref().unwrap_or("")
            ),
            Style::default().fg(Color::Red),
        ));
    }
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::default().borders(Borders::ALL).title(" throughput ")),
        area,
    );
}

/// The learning rate and the gradient norm against the x axis.
fn draw_schedule(frame: &mut Frame, app: &App, lr_area: Rect, norm_area: Rect) {
    let steps = &app.log.steps;
    let lr: Vec<(f64, f64)> = steps.iter().map(|s| (app.x(s), s.lr)).collect();
    let norm: Vec<(f64, f64)> = steps
        .iter()
        .filter(|s| s.grad_norm.is_finite())
        .map(|s| (app.x(s), s.grad_norm))
        .collect();
    let x = app.x_title();
    let lr_chart = chart(" learning rate ".into(), x, &lr, &[], &[], Color::Yellow);
    frame.render_widget(lr_chart, lr_area);
    let norm_chart = chart(" gradient norm ".into(), x, &norm, &[], &[], Color::Magenta);
    frame.render_widget(norm_chart, norm_area);
}

/// CPU use per core, the trainer's memory, package power, and a stop if there was one.
fn draw_machine(frame: &mut Frame, app: &App, area: Rect) {
    let mut machine: Vec<Line> = app
        .cpu
        .usage
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let cells = (u * 20.0).round() as usize;
            Line::from(vec![
                Span::raw(format!("cpu{i} ")),
                Span::styled("▮".repeat(cells), Style::default().fg(Color::Green)),
                Span::raw(format!(
                    "{} {:>3.0}%",
                    " ".repeat(20 - cells.min(20)),
                    u * 100.0
                )),
            ])
        })
        .collect();
    machine.push(Line::from(format!(
        "trainer memory  {}",
        app.log
            .steps
            .last()
            .and_then(|s| s.rss_mib)
            .map_or("-".into(), |m| format!("{m:.0} MiB"))
    )));
    machine.push(Line::from(format!(
        "power           {}",
        app.power
            .watts
            .map_or("not available (no Intel RAPL here)".into(), |w| format!(
                "{w:.1} W (RAPL package)"
            ))
    )));
    if let Some(reason) = &app.log.stopped {
        let why = match reason {
            StopReason::NonFinite => "non-finite loss or gradient",
            StopReason::Interrupted => "interrupted (a checkpoint was saved; resume to continue)",
        };
        machine.push(Line::styled(
            format!("stopped: {why}"),
            Style::default().fg(Color::Red),
        ));
    }
    frame.render_widget(
        Paragraph::new(machine).block(Block::default().borders(Borders::ALL).title(" machine ")),
        area,
    );
}

/// The newest sample: the dashboard's own (from the newest checkpoint) or the trainer's.
fn draw_sample(frame: &mut Frame, app: &App, area: Rect) {
    let trainer_sample = app.log.samples.last().cloned();
    let shown = match (&app.sample, &trainer_sample) {
        (Some(a), Some(b)) => Some(if a.0 >= b.0 {
            (a.0, a.1.clone(), "checkpoint")
        } else {
            (b.0, b.1.clone(), "trainer")
        }),
        (Some(a), None) => Some((a.0, a.1.clone(), "checkpoint")),
        (None, Some(b)) => Some((b.0, b.1.clone(), "trainer")),
        (None, None) => None,
    };
    let (title, text) = match shown {
        // Blank lines carry nothing in a five-line panel: drop them.
        Some((step, text, from)) => (
            format!(" sample · step {step} · kiln sampler, from the {from} "),
            text.lines()
                .map(str::trim_end)
                .filter(|l| !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        None => (" sample ".into(), "no checkpoint or sample yet".into()),
    };
    frame.render_widget(
        Paragraph::new(text)
            .wrap(Wrap { trim: false })
            .block(Block::default().borders(Borders::ALL).title(title)),
        area,
    );
}

/// Options of the dashboard.
pub struct Options {
    /// The backend the checkpoint samples run on.
    pub backend: Selection,
    /// Tokens per checkpoint sample (0: no sampling).
    pub sample_tokens: usize,
    /// Leave once the run has finished (for scripts); otherwise wait for `q`.
    pub exit_when_finished: bool,
}

/// Runs the dashboard on `run_dir` until `q` (or the run ends, with `exit_when_finished`).
pub fn run(run_dir: &Path, options: Options) -> Result<()> {
    let mut app = App {
        log: RunLog::new(run_dir),
        x_axis: XAxis::Steps,
        curve: Curve::Loss,
        paused: false,
        cpu: CpuMeter::default(),
        power: PowerMeter::default(),
        sampler: (options.sample_tokens > 0)
            .then(|| Sampler::start(options.sample_tokens, options.backend)),
        sample: None,
    };
    let mut terminal = ratatui::init();
    let result = (|| -> Result<()> {
        let mut last_refresh = Instant::now() - Duration::from_secs(1);
        loop {
            if last_refresh.elapsed() >= Duration::from_millis(500) && !app.paused {
                app.log.poll()?;
                app.cpu.update();
                app.power.update();
                if let Some(s) = &mut app.sampler {
                    s.check(run_dir);
                    while let Ok(sample) = s.results.try_recv() {
                        app.sample = Some(sample);
                    }
                }
                last_refresh = Instant::now();
            }
            terminal.draw(|f| draw(f, &app))?;
            if options.exit_when_finished && app.log.finished() {
                return Ok(());
            }
            if event::poll(Duration::from_millis(200))? {
                if let Event::Key(key) = event::read()? {
                    if key.kind != KeyEventKind::Press {
                        continue;
                    }
                    match key.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        KeyCode::Char('p') => app.paused = !app.paused,
                        KeyCode::Char('x') => {
                            app.x_axis = match app.x_axis {
                                XAxis::Steps => XAxis::Tokens,
                                XAxis::Tokens => XAxis::Time,
                                XAxis::Time => XAxis::Steps,
                            }
                        }
                        KeyCode::Char('c') => {
                            app.curve = match app.curve {
                                Curve::Loss => Curve::LearningRate,
                                Curve::LearningRate => Curve::GradNorm,
                                Curve::GradNorm => Curve::Throughput,
                                Curve::Throughput => Curve::Loss,
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}
