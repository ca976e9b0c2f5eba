//! `kiln ablate`: a base training configuration and its variants, each trained with several
//! seeds, exported as a packed artifact and scored after the round trip, then compared in one
//! table — mean ± standard deviation per variant, the difference from the base, and whether it
//! exceeds the seeds' noise. A sweep resumes: each finished run leaves its result
//! (`results/NAME-seedS.json`), and rerunning the command trains only the runs without one (an
//! unfinished run restarts). Runs are in `runs/NAME-seedS`, artifacts in `artifacts/`. A
//! variant that changes only the export scores the base's runs, compared seed by seed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use kiln_core::backend::Backend;
use kiln_core::quant::{PackRule, SchemeName};
use kiln_formats::data::{Dataset, Split};
use kiln_formats::fsutil::write_atomic;
use kiln_formats::packed::PackOptions;
use serde::{Deserialize, Serialize};

use crate::commands::{load_artifact, Source};
use crate::telemetry::RunReport;

/// What a sweep trains (`plan.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// The prepared corpus every run trains and is scored on.
    pub data: PathBuf,
    /// `kiln train` flags every run shares (not `--data`, `--out` or `--seed`).
    pub base: Vec<String>,
    /// Each variant's flags, added after the base's (a later flag overrides an earlier one).
    pub variants: Vec<Variant>,
    /// Seeds per configuration: 1, 2, … `seeds`.
    #[serde(default = "three")]
    pub seeds: u64,
    /// The artifact's scheme for the blocks' matrices, and for the embedding.
    #[serde(default = "int8")]
    pub scheme: SchemeName,
    #[serde(default = "int8")]
    pub embedding_scheme: SchemeName,
    /// Export choices beyond the schemes (`{"clip_search": true}`), for every configuration
    /// that does not give its own.
    #[serde(default)]
    pub export: PackOptions,
    /// Evaluation-time techniques applied when scoring (`{"ngram_cache": {"order": 3,
    /// "weight": 0.3}}`), for every configuration that does not give its own.
    #[serde(default)]
    pub eval: EvalTime,
}

/// Evaluation-time techniques, applied before export and after the round trip alike.
pub use kiln_core::eval::EvalTime;

fn three() -> u64 {
    3
}

fn int8() -> SchemeName {
    SchemeName::Int8
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Variant {
    pub name: String,
    /// Training flags after the base's. None: the variant differs only in its export, and
    /// scores the base's trained runs (trained once), compared seed by seed.
    #[serde(default)]
    pub flags: Vec<String>,
    /// This variant's export choices, instead of the plan's.
    #[serde(default)]
    pub export: Option<PackOptions>,
    /// This variant's evaluation-time techniques, instead of the plan's.
    #[serde(default)]
    pub eval: Option<EvalTime>,
}

impl Variant {
    /// Whether the variant trains exactly as the base does (it changes only the export or
    /// the scoring).
    pub fn export_only(&self) -> bool {
        self.flags.is_empty()
    }
}

/// One finished run (`results/NAME-seedS.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub variant: String,
    pub seed: u64,
    pub steps: u64,
    pub tokens: u64,
    pub seconds: f64,
    /// Validation bits per byte of the trained weights, before export (scored as the
    /// artifact is); under QAT, the weights as its rule quantizes them, as training validated
    /// them.
    pub val_bpb: f64,
    /// Validation bits per byte of the packed artifact, reloaded alone.
    pub roundtrip_bpb: f64,
    /// The same, its bytes counted by the parameter-golf challenge's rule (SentencePiece
    /// tokenizers only; `kiln eval --bytes challenge`).
    #[serde(default)]
    pub roundtrip_bpb_challenge: Option<f64>,
    pub artifact_bytes: u64,
}

/// A configuration's runs summarised.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub variant: String,
    pub seeds: usize,
    pub roundtrip_bpb_mean: f64,
    pub roundtrip_bpb_std: f64,
    /// The mean by the challenge's byte rule, where every run has it.
    pub roundtrip_bpb_challenge_mean: Option<f64>,
    /// Mean minus the base's mean (0 for the base).
    pub delta: f64,
    /// The standard error of that difference: √(s_b²/n_b + s_v²/n_v), or for a variant that
    /// scores the base's own runs (`paired`), s_d/√n of the per-seed differences.
    pub noise: f64,
    /// The variant differs from the base only in its export: the same trained runs.
    #[serde(default)]
    pub paired: bool,
    /// `|delta| > 2·noise`, with at least two seeds on each side.
    pub beyond_noise: bool,
    pub val_bpb_mean: f64,
    pub artifact_bytes_mean: f64,
    pub steps_mean: f64,
    pub tokens_mean: f64,
    pub seconds_mean: f64,
}

/// The flags a run of `variant` (`None`: the base) with `seed` trains with.
pub fn flags(plan: &Plan, variant: Option<&Variant>, seed: u64, out: &Path) -> Vec<String> {
    let mut flags = plan.base.clone();
    flags.extend(variant.map_or(&[][..], |v| &v.flags).iter().cloned());
    flags.extend([
        "--data".into(),
        plan.data.display().to_string(),
        "--seed".into(),
        seed.to_string(),
        "--out".into(),
        out.display().to_string(),
    ]);
    flags
}

/// Reads and checks `plan.json`.
pub fn read_plan(path: &Path) -> Result<Plan> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read ablation plan {}", path.display()))?;
    let plan: Plan = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an ablation plan", path.display()))?;
    ensure!(
        plan.seeds > 0,
        "{}: seeds must be at least 1",
        path.display()
    );
    let mut names: Vec<&str> = plan.variants.iter().map(|v| v.name.as_str()).collect();
    names.push("base");
    for name in &names {
        ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "{}: variant name '{name}' must be letters, digits, '-', '_' or '.'",
            path.display()
        );
    }
    for v in &plan.variants {
        ensure!(
            !v.export_only()
                || v.export.is_some_and(|e| e != plan.export)
                || v.eval.is_some_and(|e| e != plan.eval),
            "{}: variant '{}' changes nothing (no flags, the plan's export and scoring)",
            path.display(),
            v.name
        );
    }
    let count = names.len();
    names.sort_unstable();
    names.dedup();
    ensure!(
        names.len() == count,
        "{}: variant names must differ (and not be 'base')",
        path.display()
    );
    for flag in plan
        .base
        .iter()
        .chain(plan.variants.iter().flat_map(|v| &v.flags))
    {
        ensure!(
            !["--data", "--out", "--seed", "--resume"].contains(&flag.as_str()),
            "{}: {flag} is set by the sweep itself",
            path.display()
        );
    }
    Ok(plan)
}

/// Runs every configuration × seed not finished yet in `out`, training each with `train`
/// (which parses `kiln train` flags and trains into the directory they name, returning its
/// report, or `None` when interrupted), then exports and scores it on `backend`; writes
/// `ablation.md`, `ablation.json` and the loss curves, and returns the rows.
pub fn run<B: Backend + Clone>(
    backend: &B,
    plan: &Plan,
    out: &Path,
    train: &dyn Fn(&[String]) -> Result<Option<RunReport>>,
) -> Result<Vec<Row>> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_atomic(
        &out.join("plan.json"),
        serde_json::to_string_pretty(plan)?.as_bytes(),
    )?;
    let configs: Vec<(String, Option<&Variant>)> = std::iter::once(("base".to_string(), None))
        .chain(plan.variants.iter().map(|v| (v.name.clone(), Some(v))))
        .collect();
    let id = |name: &str, seed: u64| format!("{name}-seed{seed}");
    let result_path = |id: &str| out.join("results").join(format!("{id}.json"));
    let unfinished: Vec<_> = (configs.iter())
        .flat_map(|(name, v)| (1..=plan.seeds).map(move |s| (name, *v, s)))
        .filter(|(name, _, s)| !result_path(&id(name, *s)).exists())
        .collect();
    let pending = unfinished.len();
    let export_only = (unfinished.iter())
        .filter(|(_, v, _)| v.is_some_and(Variant::export_only))
        .count();
    let total = configs.len() * plan.seeds as usize;
    println!(
        "{} configurations × {} seeds: {pending} of {total} runs to do{}",
        configs.len(),
        plan.seeds,
        if export_only > 0 {
            format!(" ({export_only} of them export or scoring only, on the base's trained runs)")
        } else {
            String::new()
        }
    );
    let mut results: BTreeMap<String, Vec<RunResult>> = BTreeMap::new();
    let mut done = 0;
    for (name, variant) in &configs {
        for seed in 1..=plan.seeds {
            let id = id(name, seed);
            let result_path = result_path(&id);
            let result = match std::fs::read_to_string(&result_path) {
                Ok(text) => serde_json::from_str::<RunResult>(&text)
                    .with_context(|| format!("{} is malformed", result_path.display()))?,
                Err(_) => {
                    done += 1;
                    println!("== {name}, seed {seed} (run {done} of {pending})");
                    let export = variant.and_then(|v| v.export).unwrap_or(plan.export);
                    let eval = variant.and_then(|v| v.eval).unwrap_or(plan.eval);
                    let base_run = out.join("runs").join(format!("base-seed{seed}"));
                    let shared = variant.is_some_and(Variant::export_only)
                        && base_run.join("report.json").exists();
                    let (run, report) = if shared {
                        println!(
                            "   (the base's run, exported with {}, scored {})",
                            describe(export),
                            describe_eval(eval)
                        );
                        let path = base_run.join("report.json");
                        let text = std::fs::read_to_string(&path)
                            .with_context(|| format!("cannot read {}", path.display()))?;
                        let report: RunReport = serde_json::from_str(&text)
                            .with_context(|| format!("{} is malformed", path.display()))?;
                        (base_run, report)
                    } else {
                        let run = out.join("runs").join(&id);
                        if run.exists() {
                            // An unfinished run of an earlier sweep: it starts again.
                            std::fs::remove_dir_all(&run)
                                .with_context(|| format!("cannot remove {}", run.display()))?;
                        }
                        let Some(report) = train(&flags(plan, *variant, seed, &run))? else {
                            bail!(
                                "interrupted during {name}, seed {seed}; the same command \
                                 resumes the sweep"
                            );
                        };
                        (run, report)
                    };
                    let artifact = out.join("artifacts").join(&id);
                    let result = score(
                        backend,
                        plan,
                        (name, seed, export, eval),
                        (&run, &artifact),
                        &report,
                    )?;
                    std::fs::create_dir_all(out.join("results"))?;
                    write_atomic(
                        &result_path,
                        serde_json::to_string_pretty(&result)?.as_bytes(),
                    )?;
                    result
                }
            };
            results.entry(name.clone()).or_default().push(result);
        }
    }
    let rows: Vec<Row> = configs
        .iter()
        .map(|(name, variant)| {
            let paired = variant.is_some_and(Variant::export_only);
            summarise(name, &results[name], &results["base"], paired)
        })
        .collect();
    write_atomic(
        &out.join("ablation.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "plan": plan,
            "rows": rows,
            "runs": results,
        }))?
        .as_bytes(),
    )?;
    let table = markdown(plan, &rows);
    write_atomic(&out.join("ablation.md"), table.as_bytes())?;
    print!("{table}");
    let runs: Vec<PathBuf> = configs
        .iter()
        .flat_map(|(name, _)| (1..=plan.seeds).map(move |s| format!("{name}-seed{s}")))
        .map(|id| out.join("runs").join(id))
        .filter(|d| d.join("telemetry.jsonl").exists())
        .collect();
    if !runs.is_empty() {
        crate::report::write(&runs, &out.join("curves"))?;
    }
    println!(
        "wrote {}, {} and the loss curves in {}",
        out.join("ablation.md").display(),
        out.join("ablation.json").display(),
        out.join("curves").display()
    );
    Ok(rows)
}

/// Exports the run as a packed artifact into `artifact`, and scores the trained weights and
/// the artifact reloaded alone the same way: the whole validation split in windows of up to
/// 256 tokens.
fn score<B: Backend + Clone>(
    backend: &B,
    plan: &Plan,
    (name, seed, export, eval): (&str, u64, PackOptions, EvalTime),
    (run, artifact): (&Path, &Path),
    report: &RunReport,
) -> Result<RunResult> {
    let imported = crate::rundir::import(run, None)?;
    // A QAT run trained inside the Hadamard rotation is exported inside it too.
    let qat = crate::rundir::qat_rule(run);
    let rule = PackRule {
        matrices: plan.scheme.scheme(),
        embedding: plan.embedding_scheme.scheme(),
        small_max: 65536,
        hadamard: qat.is_some_and(|r| r.hadamard),
    };
    // A calibrated export chooses its scales on the plan's training split.
    let calibration = if export.calibrate {
        let c = crate::calibrate::calibrate_export(
            backend.clone(),
            &imported,
            (rule, export),
            &plan.data,
        )?;
        c.choices
    } else {
        Vec::new()
    };
    let (path, _) = kiln_formats::interop::export_packed_calibrated(
        &imported,
        artifact,
        (rule, export),
        &calibration,
    )?;
    let artifact_bytes = std::fs::metadata(&path)?.len();
    let dataset = Dataset::open(&plan.data)?;
    let tokens = dataset.read_all(Split::Val)?;
    let bits_per_byte = |loaded: &crate::commands::Loaded<B>,
                         text: &dyn kiln_core::vocab::TokenText|
     -> Result<f64> {
        let seq = 256.min(loaded.model.config.max_seq_len);
        let result = kiln_core::eval::evaluate_adapted(
            &loaded.model,
            (8, seq),
            &tokens,
            text,
            loaded.vocab_map.as_ref(),
            seq,
            0,
            eval,
            &mut |_, _| {},
        )?;
        Ok(result.bits_per_byte)
    };
    let trained = Source {
        run: Some(run.to_path_buf()),
        ..Default::default()
    };
    let trained = crate::commands::load(backend.clone(), &trained)?;
    // (`load` gives a QAT run's weights as its rule quantizes them, as it validated them.)
    let val_bpb = bits_per_byte(&trained, &trained.tokenizer)?;
    let reloaded = load_artifact(backend.clone(), &path, &Source::default())?;
    let roundtrip_bpb = bits_per_byte(&reloaded, &reloaded.tokenizer)?;
    let roundtrip_bpb_challenge = match reloaded.tokenizer.challenge_bytes() {
        Ok(challenge) => Some(bits_per_byte(&reloaded, &challenge)?),
        Err(_) => None,
    };
    Ok(RunResult {
        variant: name.to_string(),
        seed,
        steps: report.steps,
        tokens: report.tokens,
        seconds: report.wall_seconds,
        val_bpb,
        roundtrip_bpb,
        roundtrip_bpb_challenge,
        artifact_bytes,
    })
}

/// Mean and sample standard deviation (0 for one value).
fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// A configuration's row against the base's runs; `paired`: the runs are the base's own
/// trained runs, exported otherwise, so the difference is taken seed by seed.
pub fn summarise(name: &str, runs: &[RunResult], base: &[RunResult], paired: bool) -> Row {
    let bpb = |r: &[RunResult]| r.iter().map(|x| x.roundtrip_bpb).collect::<Vec<_>>();
    let (mean, std) = mean_std(&bpb(runs));
    let (base_mean, base_std) = mean_std(&bpb(base));
    let noise = if paired {
        let differences: Vec<f64> = runs
            .iter()
            .filter_map(|r| {
                let b = base.iter().find(|b| b.seed == r.seed)?;
                Some(r.roundtrip_bpb - b.roundtrip_bpb)
            })
            .collect();
        mean_std(&differences).1 / (differences.len() as f64).sqrt()
    } else {
        (base_std.powi(2) / base.len() as f64 + std.powi(2) / runs.len() as f64).sqrt()
    };
    let delta = if name == "base" {
        0.0
    } else {
        mean - base_mean
    };
    let average =
        |f: &dyn Fn(&RunResult) -> f64| mean_std(&runs.iter().map(f).collect::<Vec<_>>()).0;
    Row {
        variant: name.to_string(),
        seeds: runs.len(),
        roundtrip_bpb_mean: mean,
        roundtrip_bpb_std: std,
        roundtrip_bpb_challenge_mean: runs
            .iter()
            .map(|r| r.roundtrip_bpb_challenge)
            .collect::<Option<Vec<f64>>>()
            .map(|v| mean_std(&v).0),
        delta,
        noise,
        paired,
        beyond_noise: name != "base"
            && runs.len() > 1
            && base.len() > 1
            && delta.abs() > 2.0 * noise,
        val_bpb_mean: average(&|r| r.val_bpb),
        artifact_bytes_mean: average(&|r| r.artifact_bytes as f64),
        steps_mean: average(&|r| r.steps as f64),
        tokens_mean: average(&|r| r.tokens as f64),
        seconds_mean: average(&|r| r.seconds),
    }
}

/// Export options in words: "clip search, Hadamard rotation", or "the schemes alone".
fn describe(export: PackOptions) -> String {
    let mut parts = Vec::new();
    if export.clip_search {
        parts.push("clip search");
    }
    if export.hadamard {
        parts.push("Hadamard rotation");
    }
    if export.calibrate {
        parts.push("per-tensor calibration");
    }
    if parts.is_empty() {
        "the schemes alone".into()
    } else {
        parts.join(", ")
    }
}

/// Evaluation-time techniques in words.
fn describe_eval(eval: EvalTime) -> String {
    let mut parts = Vec::new();
    if eval.temperature {
        parts.push("with a temperature fitted while scoring".to_string());
    }
    if let Some(c) = eval.ngram_cache {
        parts.push(format!(
            "with a {}-gram cache of weight {}",
            c.order, c.weight
        ));
    }
    if let Some(t) = eval.ttt {
        parts.push(format!(
            "with test-time training ({} step(s) at {} per scored batch{})",
            t.steps,
            t.lr,
            match t.scope {
                kiln_core::eval::TttScope::All => "",
                kiln_core::eval::TttScope::Memory => ", the n-gram memories only",
            }
        ));
    }
    if let Some(p) = eval.capsule_passes {
        parts.push(format!("with {p} Koopman capsule pass(es)"));
    }
    if let Some(h) = eval.capsule_halt {
        parts.push(format!(
            "halting each position's passes at a change under {h}"
        ));
    }
    if let Some(d) = eval.capsule_carry {
        parts.push(format!("carrying capsules across windows (decay {d})"));
    }
    if parts.is_empty() {
        "plainly".into()
    } else {
        parts.join(" and ")
    }
}

/// The table, as Markdown.
pub fn markdown(plan: &Plan, rows: &[Row]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Ablation: {} seeds per configuration\n", plan.seeds);
    let scheme = |s: SchemeName| serde_json::to_string(&s).unwrap_or_default();
    let _ = writeln!(
        md,
        "Base: `kiln train {}` on `{}`; artifacts {} (embedding {}); the weights before export \
         and the artifact reloaded alone both scored on the whole validation split.\n",
        plan.base.join(" "),
        plan.data.display(),
        scheme(plan.scheme),
        scheme(plan.embedding_scheme)
    );
    let _ = writeln!(md, "| variant | flags | seeds | round-trip bits/byte | Δ vs base | beyond noise (2σ) | bits/byte before export | round-trip, the challenge's byte count | artifact bytes | steps | tokens | seconds |");
    let _ = writeln!(
        md,
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"
    );
    for row in rows {
        let variant = plan.variants.iter().find(|v| v.name == row.variant);
        let mut what = Vec::new();
        if let Some(v) = variant.filter(|v| !v.export_only()) {
            what.push(format!("`{}`", v.flags.join(" ")));
        }
        let export = variant.and_then(|v| v.export).unwrap_or(plan.export);
        if export != PackOptions::default() {
            what.push(format!("export: {}", describe(export)));
        }
        let eval = variant.and_then(|v| v.eval).unwrap_or(plan.eval);
        if eval != EvalTime::default() {
            what.push(format!("scored {}", describe_eval(eval)));
        }
        if row.paired {
            what.push("(the base's runs)".into());
        }
        let flags = what.join(" ");
        let delta = if row.variant == "base" {
            "—".to_string()
        } else {
            let paired = if row.paired { ", paired" } else { "" };
            format!("{:+.4} ± {:.4}{paired}", row.delta, row.noise)
        };
        let beyond = match (row.variant.as_str(), row.beyond_noise) {
            ("base", _) => "—",
            (_, true) => "yes",
            (_, false) => "no",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.4} ± {:.4} | {} | {} | {:.4} | {} | {:.0} | {:.0} | {:.0} | {:.2} |",
            row.variant,
            flags,
            row.seeds,
            row.roundtrip_bpb_mean,
            row.roundtrip_bpb_std,
            delta,
            beyond,
            row.val_bpb_mean,
            (row.roundtrip_bpb_challenge_mean).map_or("—".into(), |v| format!("{v:.4}")),
            row.artifact_bytes_mean,
            row.steps_mean,
            row.tokens_mean,
            row.seconds_mean
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(variant: &str, bpb: f64) -> RunResult {
        RunResult {
            variant: variant.into(),
            seed: 1,
            steps: 10,
            tokens: 100,
            seconds: 1.0,
            val_bpb: bpb - 0.01,
            roundtrip_bpb: bpb,
            roundtrip_bpb_challenge: None,
            artifact_bytes: 1000,
        }
    }

    /// Mean, sample standard deviation and the 2σ test, computed by hand: base 2.0, 2.2, 2.4
    /// (mean 2.2, s = 0.2); variant 1.9, 2.0, 2.1 (mean 2.0, s = 0.1); noise
    /// √(0.04/3 + 0.01/3) = 0.1291, so Δ = −0.2 is within 2σ = 0.2582, and a variant at
    /// 1.5, 1.6, 1.7 (Δ = −0.6) is beyond it.
    #[test]
    fn rows_state_the_difference_and_the_noise() {
        let base: Vec<_> = [2.0, 2.2, 2.4].map(|b| result("base", b)).into();
        let near: Vec<_> = [1.9, 2.0, 2.1].map(|b| result("near", b)).into();
        let far: Vec<_> = [1.5, 1.6, 1.7].map(|b| result("far", b)).into();
        let row = summarise("near", &near, &base, false);
        assert!((row.roundtrip_bpb_mean - 2.0).abs() < 1e-12);
        assert!((row.roundtrip_bpb_std - 0.1).abs() < 1e-12);
        assert!((row.delta + 0.2).abs() < 1e-12);
        assert!((row.noise - (0.05f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!(!row.beyond_noise);
        assert!(summarise("far", &far, &base, false).beyond_noise);
        let base_row = summarise("base", &base, &base, false);
        assert_eq!(base_row.delta, 0.0);
        assert!(!base_row.beyond_noise);
        // One seed cannot tell noise from an effect.
        assert!(!summarise("far", &far[..1], &base[..1], false).beyond_noise);
    }

    /// Paired by seed (the base's runs exported otherwise): differences −0.01, −0.02, −0.03
    /// (mean −0.02, s = 0.01, noise 0.01/√3 = 0.00577): beyond 2σ, though unpaired the
    /// seeds' spread (s = 0.2) would hide it.
    #[test]
    fn an_export_only_variant_is_compared_seed_by_seed() {
        let base: Vec<_> = [2.0, 2.2, 2.4].map(|b| result("base", b)).into();
        let mut seeded = base.clone();
        for (seed, r) in seeded.iter_mut().enumerate() {
            r.seed = seed as u64 + 1;
        }
        let mut export = seeded.clone();
        for (r, d) in export.iter_mut().zip([0.01, 0.02, 0.03]) {
            r.variant = "export".into();
            r.roundtrip_bpb -= d;
        }
        let row = summarise("export", &export, &seeded, true);
        assert!((row.delta + 0.02).abs() < 1e-12);
        assert!((row.noise - 0.01 / 3f64.sqrt()).abs() < 1e-12);
        assert!(row.paired && row.beyond_noise);
        assert!(!summarise("export", &export, &seeded, false).beyond_noise);
    }
}
