//! `kiln report RUN…`: PNG and SVG plots of one or several runs (overlaid for comparison)
//! and a Markdown summary with each run's efficiency report and final metrics. Everything is
//! read from the runs' telemetry; the font is embedded, so no system font libraries are needed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::runlog::RunLog;
use crate::telemetry::{Stage, Step};

/// DejaVu Sans (Bitstream Vera license, see assets/fonts/LICENSE-DejaVu.txt).
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// One line of a plot: a run's points, and optionally marker points (validation).
struct Series {
    name: String,
    line: Vec<(f64, f64)>,
    markers: Vec<(f64, f64)>,
}

/// What goes on one plot.
struct Plot {
    file: &'static str,
    title: String,
    x_label: &'static str,
    y_label: &'static str,
    series: Vec<Series>,
    line_label: &'static str,
    marker_label: &'static str,
}

fn bounds(points: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = points
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo - pad, hi + pad)
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, plot: &Plot) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let all = || {
        plot.series
            .iter()
            .flat_map(|s| s.line.iter().chain(&s.markers))
    };
    let (x0, x1) = bounds(all().map(|p| p.0));
    let (y0, y1) = bounds(all().map(|p| p.1));
    let mut chart = ChartBuilder::on(&root)
        .caption(&plot.title, ("sans-serif", 24))
        .margin(18)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(plot.x_label)
        .y_desc(plot.y_label)
        .label_style(("sans-serif", 15))
        .x_label_formatter(&|v| {
            if v.fract().abs() < 1e-9 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let several = plot.series.len() > 1;
    for (i, s) in plot.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let label = |what: &str| {
            if several {
                format!("{} — {what}", s.name)
            } else {
                what.to_string()
            }
        };
        chart
            .draw_series(LineSeries::new(
                s.line.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label(label(plot.line_label))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
        if !s.markers.is_empty() {
            chart
                .draw_series(s.markers.iter().map(|&p| Circle::new(p, 5, color.filled())))
                .map_err(|e| anyhow!("{e}"))?
                .label(label(plot.marker_label))
                .legend(move |(x, y)| Circle::new((x + 12, y), 5, color.filled()));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn plots(runs: &[RunLog]) -> Vec<Plot> {
    let series = |x: &dyn Fn(&RunLog, u64, f64, f64) -> f64,
                  y: &dyn Fn(&Step) -> f64,
                  with_val: bool|
     -> Vec<Series> {
        runs.iter()
            .map(|r| Series {
                name: r.name(),
                line: r
                    .steps
                    .iter()
                    .filter(|s| !s.skipped)
                    .map(|s| (x(r, s.step, s.tokens as f64, s.elapsed_s), y(s)))
                    .collect(),
                markers: if with_val {
                    r.evals
                        .iter()
                        .filter_map(|e| {
                            let s = r.step_at(e.step)?;
                            Some((x(r, e.step, s.tokens as f64, s.elapsed_s), e.val_loss))
                        })
                        .collect()
                } else {
                    Vec::new()
                },
            })
            .collect()
    };
    let by_step = |_: &RunLog, step: u64, _: f64, _: f64| step as f64;
    let by_tokens = |_: &RunLog, _: u64, tokens: f64, _: f64| tokens / 1e6;
    let by_time = |_: &RunLog, _: u64, _: f64, elapsed: f64| elapsed / 60.0;
    let loss = |s: &Step| s.loss;
    let title = |what: &str| {
        if runs.len() == 1 {
            format!("{what} — {}", runs[0].name())
        } else {
            what.to_string()
        }
    };
    vec![
        Plot {
            file: "loss_vs_steps",
            title: title("Loss"),
            x_label: "optimizer step",
            y_label: "cross-entropy (nats/token)",
            series: series(&by_step, &loss, true),
            line_label: "train loss",
            marker_label: "validation loss",
        },
        Plot {
            file: "loss_vs_tokens",
            title: title("Loss"),
            x_label: "training tokens (millions)",
            y_label: "cross-entropy (nats/token)",
            series: series(&by_tokens, &loss, true),
            line_label: "train loss",
            marker_label: "validation loss",
        },
        Plot {
            file: "loss_vs_time",
            title: title("Loss"),
            x_label: "wall time (minutes)",
            y_label: "cross-entropy (nats/token)",
            series: series(&by_time, &loss, true),
            line_label: "train loss",
            marker_label: "validation loss",
        },
        Plot {
            file: "throughput",
            title: title("Throughput"),
            x_label: "optimizer step",
            y_label: "tokens per second",
            series: series(&by_step, &|s| s.tokens_per_s, false),
            line_label: "tokens/s",
            marker_label: "",
        },
        Plot {
            file: "learning_rate",
            title: title("Learning rate"),
            x_label: "optimizer step",
            y_label: "learning rate",
            series: series(&by_step, &|s| s.lr, false),
            line_label: "learning rate",
            marker_label: "",
        },
    ]
}

pub(crate) fn summary(runs: &[RunLog], files: &[&str]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# kiln run report\n");
    for r in runs {
        let _ = writeln!(md, "## {}\n", r.name());
        if let Some(start) = &r.start {
            let _ = writeln!(
                md,
                "{} parameters on {}; {} tokens per step; measured matmul peak {:.1} GFLOP/s.\n",
                start.parameters, start.backend, start.tokens_per_step, start.peak_gflops
            );
        }
        let last = r.steps.last();
        let _ = writeln!(md, "| metric | value |\n| --- | --- |");
        if let Some(report) = &r.report {
            let _ = writeln!(
                md,
                "| steps | {} ({} skipped) |",
                report.steps, report.skipped_steps
            );
            let _ = writeln!(md, "| tokens | {} |", report.tokens);
            let _ = writeln!(md, "| wall time | {:.1} s |", report.wall_seconds);
            let _ = writeln!(md, "| ms per step | {:.1} |", report.ms_per_step);
            let _ = writeln!(
                md,
                "| tokens per second | {:.0} |",
                report.tokens_per_second
            );
            let _ = writeln!(md, "| TFLOP/s | {:.4} |", report.tflops);
            let _ = writeln!(
                md,
                "| MFU (of the run's peak) | {:.1}% |",
                100.0 * report.mfu
            );
            if let Some(mem) = report.peak_memory_mib {
                let _ = writeln!(md, "| peak memory | {mem:.0} MiB |");
            }
        } else if let Some(s) = last {
            let _ = writeln!(md, "| steps so far | {} (run not finished) |", s.step);
        }
        if let Some(s) = last {
            let _ = writeln!(md, "| final train loss | {:.4} |", s.loss);
        }
        if let Some(e) = r.evals.last() {
            let _ = writeln!(
                md,
                "| validation loss (step {}) | {:.4} |",
                e.step, e.val_loss
            );
            let _ = writeln!(md, "| validation bits per byte | {:.4} |", e.val_bpb);
        }
        let totals = r.stage_totals();
        let sum = totals.total();
        if sum > 0.0 {
            let _ = writeln!(
                md,
                "\nTime per stage:\n\n| stage | seconds | share |\n| --- | ---: | ---: |"
            );
            for stage in Stage::ALL {
                let t = totals.get(stage);
                let name = stage.name();
                let _ = writeln!(md, "| {name} | {t:.1} | {:.1}% |", 100.0 * t / sum);
            }
        }
        if let Some((steps, launches)) = &r.launch_times {
            let total: f64 = launches.iter().map(|l| l.ms).sum();
            let _ = writeln!(
                md,
                "\nDevice time by launch over {steps} steps ({:.1} ms a step; the ten longest):\n\n\
                 | launch | ms a step | share | launches a step |\n| --- | ---: | ---: | ---: |",
                total / (*steps).max(1) as f64
            );
            for l in launches.iter().take(10) {
                let per = (*steps).max(1) as f64;
                let _ = writeln!(
                    md,
                    "| {} | {:.2} | {:.1}% | {:.0} |",
                    l.name,
                    l.ms / per,
                    100.0 * l.ms / total.max(f64::MIN_POSITIVE),
                    l.launches as f64 / per
                );
            }
        }
        if let Some((step, text)) = r.samples.last() {
            let _ = writeln!(
                md,
                "\nSample at step {step}:\n\n```text\n{}\n```",
                text.trim()
            );
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "## Plots\n");
    for f in files {
        let _ = writeln!(md, "![{f}]({f}.png)\n");
    }
    md
}

/// Writes the plots and `report.md` for `run_dirs` into `out`; returns the files written.
pub fn write(run_dirs: &[PathBuf], out: &Path) -> Result<Vec<PathBuf>> {
    ensure!(!run_dirs.is_empty(), "name at least one run directory");
    register_font();
    let runs: Vec<RunLog> = run_dirs
        .iter()
        .map(|d| RunLog::load(d))
        .collect::<Result<_>>()?;
    ensure!(
        runs.iter().any(|r| !r.steps.is_empty()),
        "no steps logged yet in {run_dirs:?}"
    );
    std::fs::create_dir_all(out)?;
    let mut written = Vec::new();
    let plots = plots(&runs);
    for plot in &plots {
        let png = out.join(format!("{}.png", plot.file));
        draw(
            BitMapBackend::new(&png, (1000, 600)).into_drawing_area(),
            plot,
        )?;
        let svg = out.join(format!("{}.svg", plot.file));
        draw(SVGBackend::new(&svg, (1000, 600)).into_drawing_area(), plot)?;
        written.extend([png, svg]);
    }
    let files: Vec<&str> = plots.iter().map(|p| p.file).collect();
    let md = out.join("report.md");
    kiln_formats::fsutil::write_atomic(&md, summary(&runs, &files).as_bytes())?;
    written.push(md);
    Ok(written)
}
