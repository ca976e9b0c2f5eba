//! Checkpoints: model weights and optimizer state as safetensors, plus `manifest.json` (the
//! configs, step, data position, tokenizer hash, kiln version, validation loss).
//!
//! A checkpoint is a directory `checkpoints/step_NNNNNNNN/`. It is written under a temporary
//! name, every file flushed to disk, then renamed into place and the parent directory flushed:
//! a crash at any moment leaves either the complete new checkpoint or none, and the previous
//! ones untouched. Temporary directories a crash leaves behind are ignored and swept.
//! Which checkpoints a run keeps, and where a run directory's newest or best one is, are the
//! application's (`kiln::rundir`); this module reads and writes one checkpoint directory.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use std::cell::RefCell;

use kiln_core::backend::{Backend, BackendError, View};
use kiln_core::bytes::{le_floats, FloatWidth};
use kiln_core::config::ModelConfig;
use kiln_core::layout::{ParamLayout, Region};
use kiln_core::model::Model;

use crate::data::DataPosition;
use crate::fsutil::{sync_dir, write_atomic};

/// `manifest.json` of a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub kiln_version: String,
    pub step: u64,
    /// Optimizer steps taken (AdamW bias correction); lower than `step` if steps were skipped.
    pub optimizer_steps: u64,
    pub tokens_seen: u64,
    pub skipped_steps: u64,
    pub elapsed_seconds: f64,
    pub data_position: DataPosition,
    /// The run's seed. The training loop draws no random numbers after initialisation (data is
    /// read in order), so the seed and the data position are the whole random state.
    pub seed: u64,
    pub tokenizer_sha256: String,
    pub model: ModelConfig,
    /// The training configuration, as `train.json` holds it.
    pub train: serde_json::Value,
    pub val_loss: Option<f64>,
    pub val_bpb: Option<f64>,
    /// With vocabulary compaction: the full-vocabulary id of each model token.
    pub vocab_map: Option<Vec<u32>>,
    /// With loss scaling: the scaler's state (the scale and its count of clean steps), so a
    /// resumed run scales as the uninterrupted one would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<kiln_core::optim::LossScaler>,
}

/// A tensor still in backend memory: `safetensors` asks for its bytes when it writes it, so
/// a checkpoint streams to disk one tensor at a time instead of holding a host copy of the
/// whole model and optimizer (at Qwen3-0.6B scale that copy alone is 7 GB).
struct DeviceTensor<'a, B: Backend> {
    backend: &'a B,
    memory: &'a B::Memory,
    region: Region,
    shape: Vec<usize>,
    /// A download that failed (safetensors' `data` cannot return an error): the writer
    /// checks it after serializing and discards the file.
    failed: &'a RefCell<Option<BackendError>>,
}

impl<B: Backend> safetensors::View for DeviceTensor<'_, B> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let mut host = vec![0f32; self.region.len];
        let view = View::new(self.memory, self.region.offset, self.region.len);
        if let Err(e) = self.backend.download(view, &mut host) {
            self.failed.borrow_mut().get_or_insert(e);
        }
        Cow::Owned(host.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.region.len * 4
    }
}

/// Streams tensors from backend memory into a safetensors file and flushes it to disk.
fn write_tensors<B: Backend>(
    path: &Path,
    backend: &B,
    memory: &B::Memory,
    tensors: Vec<(String, Vec<usize>, Region)>,
) -> Result<()> {
    let failed = RefCell::new(None);
    let views = tensors.into_iter().map(|(name, shape, region)| {
        (
            name,
            DeviceTensor {
                backend,
                memory,
                region,
                shape,
                failed: &failed,
            },
        )
    });
    safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    if let Some(e) = failed.into_inner() {
        return Err(e).with_context(|| format!("cannot read the tensors for {}", path.display()));
    }
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot flush {}", path.display()))
}

/// Tensors by name: each one's shape and values.
pub type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Reads every f32 tensor of a safetensors file into a map.
pub fn read_f32_tensors(path: &Path) -> Result<Tensors> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let tensors = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let mut out = HashMap::new();
    for (name, t) in tensors.tensors() {
        ensure!(
            t.dtype() == Dtype::F32,
            "{}: tensor '{name}' is {:?}, expected F32",
            path.display(),
            t.dtype()
        );
        let values = le_floats(t.data(), FloatWidth::F32);
        out.insert(name, (t.shape().to_vec(), values));
    }
    Ok(out)
}

/// The name of step `step`'s checkpoint directory.
pub fn step_dir_name(step: u64) -> String {
    format!("step_{step:08}")
}

/// Writes a checkpoint of `model` into `checkpoints_dir` atomically; returns its path.
pub fn save<B: Backend>(
    model: &Model<B>,
    manifest: &Manifest,
    checkpoints_dir: &Path,
) -> Result<PathBuf> {
    fs::create_dir_all(checkpoints_dir)
        .with_context(|| format!("cannot create {}", checkpoints_dir.display()))?;
    let final_dir = checkpoints_dir.join(step_dir_name(manifest.step));
    let tmp = checkpoints_dir.join(format!(
        ".{}.tmp-{}",
        step_dir_name(manifest.step),
        std::process::id()
    ));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    // A failed write (a full disk, a quota) leaves the earlier checkpoints as they were and
    // takes its partial files with it, so the space they held is free again.
    if let Err(e) = write_checkpoint(model, manifest, &tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "cannot write checkpoint {} (is the disk full?); the earlier checkpoints in {} \
             are intact",
            final_dir.display(),
            checkpoints_dir.display()
        )));
    }
    if final_dir.exists() {
        // A checkpoint of the same step (a rerun after a resume): replace it.
        fs::remove_dir_all(&final_dir)?;
    }
    fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move {} into place", tmp.display()))?;
    sync_dir(checkpoints_dir)?;
    Ok(final_dir)
}

/// The checkpoint's files, into `tmp`.
fn write_checkpoint<B: Backend>(model: &Model<B>, manifest: &Manifest, tmp: &Path) -> Result<()> {
    let tensors = model
        .layout
        .specs
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone(), s.region))
        .collect();
    if let Some((_, ema)) = &model.ema {
        // The moving average of the weights, under the same names: what exports and
        // `kiln eval` use (see `interop::import`).
        write_tensors(
            &tmp.join(EMA_FILE),
            &model.backend,
            ema,
            model
                .layout
                .specs
                .iter()
                .map(|s| (s.name.clone(), s.shape.clone(), s.region))
                .collect(),
        )?;
    }
    write_tensors(
        &tmp.join("model.safetensors"),
        &model.backend,
        &model.params,
        tensors,
    )?;
    let n = model.param_count();
    let mut moments = Vec::new();
    for s in &model.layout.specs {
        moments.push((format!("m.{}", s.name), s.shape.clone(), s.region));
        moments.push((
            format!("v.{}", s.name),
            s.shape.clone(),
            Region {
                offset: n + s.region.offset,
                len: s.region.len,
            },
        ));
    }
    write_tensors(
        &tmp.join("optimizer.safetensors"),
        &model.backend,
        &model.optimizer,
        moments,
    )?;
    write_atomic(
        &tmp.join("manifest.json"),
        serde_json::to_string_pretty(manifest)?.as_bytes(),
    )
}

/// Reads a checkpoint's manifest.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "{} is not a kiln checkpoint (no manifest.json)",
            dir.display()
        )
    })?;
    let manifest: Manifest =
        serde_json::from_str(&text).with_context(|| format!("{} is malformed", path.display()))?;
    manifest
        .model
        .validate()
        .with_context(|| format!("{}: the model shape is invalid", path.display()))?;
    Ok(manifest)
}

/// Lists what differs between two model configs, field by field ("dim: 288 vs 512").
pub fn config_differences(a: &ModelConfig, b: &ModelConfig) -> Vec<String> {
    let (a, b) = (
        serde_json::to_value(a).unwrap(),
        serde_json::to_value(b).unwrap(),
    );
    let mut keys: Vec<&String> = a.as_object().unwrap().keys().collect();
    keys.extend(b.as_object().unwrap().keys());
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for key in keys {
        let (va, vb) = (&a[key], &b[key]);
        if va != vb {
            out.push(format!("{key}: {va} vs {vb}"));
        }
    }
    out
}

/// The weights a checkpoint delivers (to evaluation, sampling, export): the moving average
/// when the run kept one (`--ema`), else `model.safetensors`.
pub fn weights_file(dir: &Path) -> PathBuf {
    let ema = dir.join(EMA_FILE);
    if ema.exists() {
        ema
    } else {
        dir.join("model.safetensors")
    }
}

/// Every parameter of `layout` from a safetensors file, in arena order, refusing a missing
/// tensor or a wrong shape by name.
pub fn read_weights(path: &Path, layout: &ParamLayout) -> Result<Vec<f32>> {
    let tensors = read_f32_tensors(path)?;
    // Every tensor checked before the arena is allocated: its size then comes from the file.
    for spec in &layout.specs {
        let (shape, _) = tensors
            .get(&spec.name)
            .with_context(|| format!("{}: no tensor '{}'", path.display(), spec.name))?;
        ensure!(
            shape == &spec.shape,
            "{}: '{}' has shape {shape:?}, expected {:?}",
            path.display(),
            spec.name,
            spec.shape
        );
    }
    let mut host = vec![0f32; layout.total_len()];
    for spec in &layout.specs {
        let values = &tensors[&spec.name].1;
        host[spec.region.offset..][..spec.region.len].copy_from_slice(values);
    }
    Ok(host)
}

/// The moving average of the weights, beside `model.safetensors` in a checkpoint of a run
/// trained with `--ema`.
pub const EMA_FILE: &str = "ema.safetensors";

/// Loads a checkpoint's weights (and optimizer state, if `with_optimizer`) into `model`,
/// refusing one made for another model shape or tokenizer. Without the optimizer (inference)
/// the weights are the moving average when the checkpoint has one.
pub fn load_into<B: Backend>(
    model: &mut Model<B>,
    dir: &Path,
    tokenizer_sha256: Option<&str>,
    with_optimizer: bool,
) -> Result<Manifest> {
    let manifest = read_manifest(dir)?;
    let differences = config_differences(&manifest.model, &model.config);
    if !differences.is_empty() {
        bail!(
            "checkpoint {} was made for another model (checkpoint vs this run): {}",
            dir.display(),
            differences.join(", ")
        );
    }
    if let Some(hash) = tokenizer_sha256 {
        ensure!(
            manifest.tokenizer_sha256 == hash,
            "checkpoint {} was trained with another tokenizer (sha256 {} vs this run's {hash})",
            dir.display(),
            manifest.tokenizer_sha256
        );
    }
    let file = if with_optimizer {
        dir.join("model.safetensors")
    } else {
        weights_file(dir)
    };
    let host = read_weights(&file, &model.layout)?;
    model.upload_params(&host)?;
    if with_optimizer {
        let moments = read_f32_tensors(&dir.join("optimizer.safetensors"))?;
        let n = model.param_count();
        let mut host = vec![0f32; 2 * n];
        for spec in &model.layout.specs {
            for (prefix, base) in [("m", 0), ("v", n)] {
                let name = format!("{prefix}.{}", spec.name);
                let (_, values) = moments.get(&name).with_context(|| {
                    format!("{}: optimizer.safetensors has no '{name}'", dir.display())
                })?;
                ensure!(
                    values.len() == spec.region.len,
                    "{}: '{name}' has the wrong size",
                    dir.display()
                );
                host[base + spec.region.offset..][..spec.region.len].copy_from_slice(values);
            }
        }
        model.upload_optimizer(&host)?;
        model.step = manifest.optimizer_steps;
        if let Some((_, ema)) = &model.ema {
            let path = dir.join(EMA_FILE);
            if path.exists() {
                let host = read_weights(&path, &model.layout)?;
                model.backend.upload(View::whole(ema), &host)?;
            } else {
                // A checkpoint from before --ema was used: the average starts here.
                model
                    .backend
                    .copy(View::whole(ema), View::whole(&model.params));
            }
        }
    }
    model.refresh_weights()?;
    Ok(manifest)
}

/// Complete checkpoints in a run's `checkpoints/` directory, oldest first. Temporary
/// directories (a crash mid-save) and directories without a manifest are passed over.
pub fn list(checkpoints_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(checkpoints_dir) else {
        return Ok(found);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(step) = name
            .strip_prefix("step_")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if entry.path().join("manifest.json").exists() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}
