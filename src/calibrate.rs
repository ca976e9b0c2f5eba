//! Per-tensor calibration of a packed export (`kiln export --calibrate`; `"calibrate": true`
//! in an ablation's export): each quantized tensor's scales may be multiplied by one of a few
//! factors, and a ternary tensor's rounding threshold moved, chosen by the loss of the whole
//! exported model on text from the training split, never the validation split the artifact
//! is scored on.
//!
//! First each quantized tensor's effect is measured: the calibration loss with every tensor
//! quantized, less the loss with that one tensor left unquantized. Then, most harmful first,
//! each tensor takes the factor (of [`MULTIPLIERS`], 1 first), then, if ternary, the
//! threshold (of [`THRESHOLDS`], 0.5 first) that gives the lowest loss with the tensors
//! before it already calibrated, keeping its own rule unless another is strictly better.
//! The artifact's format is unchanged: the choices are in its scales and codes.

use anyhow::{ensure, Result};
use kiln_core::backend::Backend;
use kiln_core::layout::ParamLayout;
use kiln_core::model::Model;
use kiln_core::quant::{export_round_trip, Calibrated, ExportQuant, Scheme};
use kiln_formats::interop::Imported;
use kiln_formats::packed::{PackOptions, PackRule};

/// The factors tried on each tensor's scales, the scheme's own first.
pub const MULTIPLIERS: [f32; 8] = [1.0, 0.7, 0.8, 0.9, 1.1, 1.25, 1.5, 2.0];

/// The rounding thresholds (of |w|/scale) tried on each ternary tensor after its factor,
/// rounding to nearest (0.5) first.
pub const THRESHOLDS: [f32; 5] = [0.5, 0.35, 0.4, 0.6, 0.7];

/// What a calibration chose and measured.
#[derive(Clone, Debug)]
pub struct Calibration {
    /// Per parameter tensor (`layout.specs` order): its scales' factor and threshold.
    pub choices: Vec<Calibrated>,
    /// Quantized tensors by their effect on the calibration loss (nats), most harmful first.
    pub effects: Vec<(String, f64)>,
    /// The calibration loss unquantized, quantized plainly, and quantized as calibrated.
    pub loss_f32: f64,
    pub loss_plain: f64,
    pub loss_calibrated: f64,
}

/// Calibrates `imported`'s export under `rule` and `options` on `tokens` (the model's ids):
/// windows of `seq`, `batch` at a time, as many whole batches as `tokens` holds.
pub fn calibrate<B: Backend>(
    backend: B,
    imported: &Imported,
    (rule, options): (PackRule, PackOptions),
    tokens: &[u32],
    (batch, seq): (usize, usize),
) -> Result<Calibration> {
    let per_batch = batch * seq;
    let batches = tokens.len().saturating_sub(1) / per_batch;
    ensure!(
        batches > 0,
        "calibration needs at least {} training tokens, got {}",
        per_batch + 1,
        tokens.len()
    );
    let model = Model::for_inference(backend, imported.config.clone())?;
    let acts = model.loss_activations(batch, seq)?;
    let loss = |weights: &[f32]| -> Result<f64> {
        model.upload_params(weights)?;
        let mut sum = 0.0;
        for b in 0..batches {
            let x = &tokens[b * per_batch..(b + 1) * per_batch];
            let y = &tokens[b * per_batch + 1..(b + 1) * per_batch + 1];
            sum += model.forward(&acts, x, Some(y))?.unwrap_or(f32::NAN) as f64;
        }
        Ok(sum / batches as f64)
    };
    let layout = ParamLayout::new(&imported.config);
    let quant = ExportQuant {
        rule,
        search: options.clip_search,
        rotate: rule.hadamard || options.hadamard,
    };
    let original = &imported.weights;
    let mut current = original.clone();
    export_round_trip(&layout, &quant, &[], &mut current)?;
    let loss_f32 = loss(original)?;
    let loss_plain = loss(&current)?;
    // Each quantized tensor's effect: the loss with it alone left as trained.
    let mut effects = Vec::new();
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("calibrating {bar:40} {pos}/{len} tensors")
            .expect("valid template"),
    );
    // The tensors stored as codes with scales (f16 and f32 ones have none to calibrate).
    let quantized: Vec<usize> = (0..layout.specs.len())
        .filter(|&i| {
            let spec = &layout.specs[i];
            let scheme = rule.scheme_for(spec.kind, spec.region.len);
            matches!(scheme, Scheme::Ternary | Scheme::Int { .. })
        })
        .collect();
    bar.set_length(2 * quantized.len() as u64);
    for &i in &quantized {
        let r = layout.specs[i].region;
        let stored = current[r.offset..][..r.len].to_vec();
        current[r.offset..][..r.len].copy_from_slice(&original[r.offset..][..r.len]);
        effects.push((i, loss_plain - loss(&current)?));
        current[r.offset..][..r.len].copy_from_slice(&stored);
        bar.inc(1);
    }
    effects.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut choices = vec![Calibrated::PLAIN; layout.specs.len()];
    let mut best_loss = loss_plain;
    for &(i, _) in &effects {
        let spec = &layout.specs[i];
        let r = spec.region;
        let values = &original[r.offset..][..r.len];
        // Stores the tensor as `cal` quantizes it if that lowers the loss; else restores it.
        let mut better = |cal: Calibrated| -> Result<bool> {
            let Some(stored) = quant.round_trip(spec, values, cal)? else {
                return Ok(false);
            };
            let kept = current[r.offset..][..r.len].to_vec();
            current[r.offset..][..r.len].copy_from_slice(&stored);
            let l = loss(&current)?;
            if l < best_loss {
                best_loss = l;
                return Ok(true);
            }
            current[r.offset..][..r.len].copy_from_slice(&kept);
            Ok(false)
        };
        // The factor, then (ternary) the threshold at the chosen factor.
        let mut chosen = Calibrated::PLAIN;
        for &scale in &MULTIPLIERS[1..] {
            let cal = Calibrated { scale, ..chosen };
            if better(cal)? {
                chosen = cal;
            }
        }
        if rule.scheme_for(spec.kind, r.len) == Scheme::Ternary {
            let scale = chosen.scale;
            for &threshold in &THRESHOLDS[1..] {
                let cal = Calibrated { scale, threshold };
                if better(cal)? {
                    chosen = cal;
                }
            }
        }
        choices[i] = chosen;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(Calibration {
        choices,
        effects: (effects.into_iter())
            .map(|(i, e)| (layout.specs[i].name.clone(), e))
            .collect(),
        loss_f32,
        loss_plain,
        loss_calibrated: best_loss,
    })
}

/// The first `count` tokens of a data directory's training split (its first shards), in the
/// model's ids when the run compacted its vocabulary.
pub fn training_tokens(
    data: &std::path::Path,
    imported: &Imported,
    count: usize,
) -> Result<Vec<u32>> {
    use kiln_formats::data::{read_shard, Dataset, Split};
    let dataset = Dataset::open(data)?;
    let mut tokens = Vec::new();
    for shard in dataset.shard_paths(Split::Train) {
        if tokens.len() >= count {
            break;
        }
        tokens.extend(read_shard(&shard, dataset.manifest.vocab_size)?);
    }
    tokens.truncate(count);
    Ok(match &imported.vocab_map {
        Some(map) => map.to_model(&tokens)?,
        None => tokens,
    })
}

/// Windows of the calibration: 4 batches of 8 × 256 tokens (shorter windows for a model with
/// a shorter context).
pub const BATCHES: usize = 4;
pub const BATCH: usize = 8;
pub const SEQ: usize = 256;

/// Calibrates an export on the training split of `data`, printing what it found.
pub fn calibrate_export<B: Backend>(
    backend: B,
    imported: &Imported,
    (rule, options): (PackRule, PackOptions),
    data: &std::path::Path,
) -> Result<Calibration> {
    let seq = SEQ.min(imported.config.max_seq_len);
    let tokens = training_tokens(data, imported, BATCHES * BATCH * seq + 1)?;
    let c = calibrate(backend, imported, (rule, options), &tokens, (BATCH, seq))?;
    println!(
        "calibration on {} training tokens of {}: loss {:.4} unquantized, {:.4} quantized, \
         {:.4} calibrated",
        tokens.len() - 1,
        data.display(),
        c.loss_f32,
        c.loss_plain,
        c.loss_calibrated
    );
    let layout = ParamLayout::new(&imported.config);
    for (name, effect) in c.effects.iter().take(8) {
        let i = layout
            .specs
            .iter()
            .position(|s| &s.name == name)
            .unwrap_or(0);
        let cal = c.choices[i];
        println!(
            "  {name:<44} costs {effect:+.4} nats quantized; scales × {}, threshold {}",
            cal.scale, cal.threshold
        );
    }
    Ok(c)
}
