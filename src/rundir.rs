//! A run directory and what it holds: `train.json`, the tokenizer, `telemetry.jsonl`,
//! `checkpoints/step_NNNNNNNN/` (the newest `--keep-last` kept, and the best by validation
//! loss, recorded in `checkpoints/best.json`) and, at the end, `report.json`.
//!
//! The formats crate reads and writes one checkpoint; this module knows which one a run means.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kiln_formats::checkpoint::{self, step_dir_name, Manifest};
use kiln_formats::fsutil::write_atomic;
use kiln_formats::interop::{self, Imported};

/// The newest complete checkpoint of a run directory, or a checkpoint directory itself.
/// The rule a run's quantization-aware training quantized with (`train.json`'s `qat`), read
/// from the checkpoint `path` resolves to; `None` for a run without QAT or a path that is not
/// a kiln checkpoint.
pub fn qat_rule(path: &Path) -> Option<kiln_core::quant::PackRule> {
    let manifest = checkpoint::read_manifest(&resolve(path).ok()?).ok()?;
    serde_json::from_value(manifest.train.get("qat")?.clone()).ok()?
}

/// The data directory a run trained on (`train.json`'s `data`), from the checkpoint `path`
/// resolves to; `None` when it does not say.
pub fn train_data(path: &Path) -> Option<PathBuf> {
    let manifest = checkpoint::read_manifest(&resolve(path).ok()?).ok()?;
    Some(PathBuf::from(manifest.train.get("data")?.as_str()?))
}

pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join("manifest.json").exists() {
        return Ok(path.to_path_buf());
    }
    let checkpoints = path.join("checkpoints");
    match checkpoint::list(&checkpoints)?.pop() {
        Some((_, dir)) => Ok(dir),
        None => bail!(
            "{} holds no checkpoint (looked for {}/step_*/manifest.json)",
            path.display(),
            checkpoints.display()
        ),
    }
}

/// The best checkpoint by validation loss, as recorded in `best.json`.
pub fn best(run_dir: &Path) -> Result<PathBuf> {
    let path = run_dir.join("checkpoints").join("best.json");
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "{} has no best checkpoint yet ({})",
            run_dir.display(),
            path.display()
        )
    })?;
    let best: Best =
        serde_json::from_str(&text).with_context(|| format!("{} is malformed", path.display()))?;
    Ok(run_dir.join("checkpoints").join(step_dir_name(best.step)))
}

/// `checkpoints/best.json`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Best {
    step: u64,
    val_loss: f64,
}

/// After a save: records the best checkpoint by validation loss, deletes all but the newest
/// `keep_last` and the best, and sweeps temporary directories left by crashed saves.
pub fn rotate(checkpoints_dir: &Path, keep_last: usize, newest: &Manifest) -> Result<()> {
    let best_path = checkpoints_dir.join("best.json");
    let previous_best: Option<Best> = fs::read_to_string(&best_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let mut best_step = previous_best.as_ref().map(|b| b.step);
    if let Some(loss) = newest.val_loss {
        if previous_best.is_none_or(|best| loss < best.val_loss) {
            let best = Best {
                step: newest.step,
                val_loss: loss,
            };
            write_atomic(&best_path, serde_json::to_string(&best)?.as_bytes())?;
            best_step = Some(newest.step);
        }
    }
    let all = checkpoint::list(checkpoints_dir)?;
    let cut = all.len().saturating_sub(keep_last.max(1));
    for (step, dir) in &all[..cut] {
        if Some(*step) != best_step {
            fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove old checkpoint {}", dir.display()))?;
        }
    }
    for entry in fs::read_dir(checkpoints_dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(".step_") && !name.ends_with(&format!("-{}", std::process::id())) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// Reads a model from anything kiln can read: a Hugging Face directory, a llama2.c `.bin`, a
/// checkpoint directory, or a run directory (its newest checkpoint, with the run's tokenizer).
pub fn import(path: &Path, tokenizer: Option<&Path>) -> Result<Imported> {
    let is_run =
        path.is_dir() && !path.join("config.json").exists() && !path.join("manifest.json").exists();
    let path = if is_run {
        resolve(path)?
    } else {
        path.to_path_buf()
    };
    // A checkpoint's tokenizer lives in its run directory, two levels up.
    let run_dir = path
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    interop::import(&path, tokenizer, &[&path, &run_dir])
}
