//! Optimizer steps over a model's arenas: AdamW for every tensor, or the parameter-golf
//! split (Muon for the blocks' matrices, Adam for the rest). Which group a tensor joins is
//! decided by its typed [`ParamKind`], never by its name. The per-tensor arithmetic is the
//! backend's (`adamw_step`, `muon_step`); this module only walks the layout.
//!
//! The optimizer arena holds the first moments (Muon: its momentum) in its first half and
//! the second moments in its second half, each in the parameter layout.

use crate::backend::{AdamWStep, Backend, MatrixShape, MuonStep, View};
use crate::layout::{ParamKind, Region};
use crate::model::Model;

/// AdamW hyper-parameters for one optimizer step (the schedule lives with the trainer).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub learning_rate: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// Learning rates and constants of [`muon_adam_step`] for one step (the schedule's
/// multiplier already applied to the rates).
#[derive(Clone, Copy, Debug)]
pub struct MuonAdam {
    pub matrix_lr: f32,
    pub momentum: f32,
    pub ns_steps: usize,
    /// MuonEq-R: rows of the update normalized before Newton–Schulz.
    pub row_normalize: bool,
    pub weight_decay: f32,
    pub embed_lr: f32,
    pub head_lr: f32,
    pub scalar_lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

/// The views of one tensor's parameters, gradients and two moments.
struct Slots<'m, B: Backend> {
    params: View<'m, B>,
    grads: View<'m, B>,
    first: View<'m, B>,
    second: View<'m, B>,
}

fn slots<B: Backend>(model: &Model<B>, r: Region) -> Slots<'_, B> {
    let n = model.param_count();
    Slots {
        params: View::new(&model.params, r.offset, r.len),
        grads: View::new(&model.grads, r.offset, r.len),
        first: View::new(&model.optimizer, r.offset, r.len),
        second: View::new(&model.optimizer, n + r.offset, r.len),
    }
}

/// Counts an optimizer step, refusing a model without optimizer state.
fn begin_step<B: Backend>(model: &mut Model<B>) -> crate::Result<()> {
    crate::require!(
        crate::backend::DeviceMemory::len(&model.optimizer) == 2 * model.param_count(),
        Shape,
        "an inference model (Model::for_inference) has no optimizer state"
    );
    model.step += 1;
    Ok(())
}

/// One AdamW step over every parameter; `grad_scale` multiplies the gradients first
/// (clipping, loss-scale removal). Weight decay only where the tensor's kind decays.
pub fn adamw_step<B: Backend>(
    model: &mut Model<B>,
    hp: &AdamW,
    grad_scale: f32,
) -> crate::Result<()> {
    begin_step(model)?;
    for spec in &model.layout.specs {
        let step = AdamWStep {
            learning_rate: hp.learning_rate,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            weight_decay: if spec.decays() { hp.weight_decay } else { 0.0 },
            step: model.step,
            grad_scale,
        };
        let s = slots(model, spec.region);
        model
            .backend
            .adamw_step(s.params, s.grads, s.first, s.second, &step);
    }
    Ok(())
}

/// One step of the parameter-golf baseline's optimizer split: Muon for the blocks' 2-D
/// matrices, Adam (no weight decay) for the embeddings (`embed_lr`), an untied classifier
/// (`head_lr`) and the gains and control tensors (`scalar_lr`). Muon keeps its momentum in
/// the first-moment half of the optimizer arena.
pub fn muon_adam_step<B: Backend>(
    model: &mut Model<B>,
    hp: &MuonAdam,
    grad_scale: f32,
) -> crate::Result<()> {
    begin_step(model)?;
    for spec in &model.layout.specs {
        let s = slots(model, spec.region);
        let lr = match spec.kind {
            ParamKind::BlockMatrix { .. } => {
                let step = MuonStep {
                    learning_rate: hp.matrix_lr,
                    momentum: hp.momentum,
                    nesterov: true,
                    ns_steps: hp.ns_steps,
                    row_normalize: hp.row_normalize,
                    weight_decay: hp.weight_decay,
                    grad_scale,
                };
                let shape = MatrixShape {
                    rows: spec.shape[0],
                    cols: spec.shape[1],
                };
                model
                    .backend
                    .muon_step(s.params, s.grads, s.first, shape, &step);
                continue;
            }
            ParamKind::Embedding => hp.embed_lr,
            ParamKind::Classifier => hp.head_lr,
            ParamKind::NormGain | ParamKind::Control(_) => hp.scalar_lr,
        };
        let step = AdamWStep {
            learning_rate: lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            weight_decay: 0.0,
            step: model.step,
            grad_scale,
        };
        model
            .backend
            .adamw_step(s.params, s.grads, s.first, s.second, &step);
    }
    Ok(())
}

/// Dynamic loss scaling, for products in fp16 (whose smallest normal value, 6.1e-5, and
/// subnormals down to 6e-8, lose small gradients to zero): the loss's gradient is multiplied
/// by `scale` before the backward and the optimizer divides it out again (through its
/// `grad_scale`). A step whose gradients overflow (a non-finite gradient norm with a finite
/// loss) is skipped and the scale halved; after `growth_interval` clean steps in a row the
/// scale doubles (PyTorch's `GradScaler` rule and defaults: 2¹⁶ to start, 2000 steps). A
/// `growth_interval` of 0 keeps the scale fixed (the neural-engine trainer's static 256).
/// Scales are powers of two, so scaling and unscaling are exact in f32.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub scale: f32,
    pub growth_interval: u32,
    /// Clean steps since the scale last changed.
    pub clean_steps: u32,
}

impl LossScaler {
    /// The smallest scale backing off reaches (1: the loss itself).
    pub const MIN_SCALE: f32 = 1.0;
    /// The largest scale growth reaches (2²⁴): beyond it every gradient would overflow f16.
    pub const MAX_SCALE: f32 = 16_777_216.0;

    /// PyTorch's defaults: 2¹⁶, doubling after 2000 clean steps.
    pub fn dynamic() -> Self {
        LossScaler {
            scale: 65_536.0,
            growth_interval: 2000,
            clean_steps: 0,
        }
    }

    /// A fixed scale, never changed except to back off from an overflow.
    pub fn fixed(scale: f32) -> Self {
        LossScaler {
            scale,
            growth_interval: 0,
            clean_steps: 0,
        }
    }

    /// Notes one step's outcome: `finite` when its gradients had no inf or NaN. Returns
    /// whether the optimizer should apply the step. An overflow halves the scale (not below
    /// [`Self::MIN_SCALE`]); a run of `growth_interval` clean steps doubles it (not above
    /// [`Self::MAX_SCALE`]).
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale = (self.scale * 0.5).max(Self::MIN_SCALE);
            self.clean_steps = 0;
            return false;
        }
        self.clean_steps += 1;
        if self.growth_interval > 0 && self.clean_steps >= self.growth_interval {
            self.scale = (self.scale * 2.0).min(Self::MAX_SCALE);
            self.clean_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::LossScaler;

    #[test]
    fn the_scale_backs_off_on_overflow_and_grows_after_clean_steps() {
        let mut s = LossScaler {
            scale: 1024.0,
            growth_interval: 3,
            clean_steps: 0,
        };
        assert!(!s.update(false), "an overflow skips the step");
        assert_eq!(s.scale, 512.0);
        assert!(s.update(true) && s.update(true));
        assert_eq!(
            (s.scale, s.clean_steps),
            (512.0, 2),
            "two clean steps are not enough"
        );
        assert!(s.update(true));
        assert_eq!(
            (s.scale, s.clean_steps),
            (1024.0, 0),
            "the third doubles it"
        );
        // An overflow resets the count of clean steps.
        s.update(true);
        s.update(true);
        s.update(false);
        s.update(true);
        s.update(true);
        assert_eq!(s.scale, 512.0);
        // Bounds.
        let mut low = LossScaler::fixed(1.0);
        low.update(false);
        assert_eq!(low.scale, LossScaler::MIN_SCALE);
        let mut high = LossScaler {
            scale: LossScaler::MAX_SCALE,
            growth_interval: 1,
            clean_steps: 0,
        };
        high.update(true);
        assert_eq!(high.scale, LossScaler::MAX_SCALE);
        let mut fixed = LossScaler::fixed(256.0);
        for _ in 0..10_000 {
            fixed.update(true);
        }
        assert_eq!(fixed.scale, 256.0, "a fixed scale does not grow");
    }
}
