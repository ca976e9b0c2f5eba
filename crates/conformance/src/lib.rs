//! The conformance suite: one set of checks, written against [`Backend`], that every backend
//! must pass (the reference backend's own tests run it; a fast CPU or CUDA backend runs the
//! very same functions on itself, with its own per-kernel tolerances).
//!
//! - [`check_kernels`]: every case of the kernel table ([`cases`], shared with
//!   `kiln bench kernels`), forward and backward, against the reference kernels evaluated in
//!   f64 on the same inputs;
//! - [`check_memory`]: allocation, f32 and bf16 transfers, conversions, `synchronize`;
//! - [`check_fixture`]: the whole model against PyTorch (`scripts/make_fixtures.py`): logits,
//!   loss, every parameter gradient, and the losses of ten AdamW steps;
//! - [`check_training_smoke`]: twenty training steps on a tiny model make the loss fall.
//!
//! Each check returns `Err` with a message naming the quantity, the worst element and the
//! tolerance, so a failing backend says exactly where it strays.

use std::path::Path;

pub mod cases;

use anyhow::{anyhow, bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensors};

use kiln_core::backend::{Backend, DType, Kernel, Tolerance, View};
use kiln_core::bytes::{le_values, FloatWidth};
use kiln_core::config::ModelConfig;
use kiln_core::model::Model;
use kiln_core::optim::{adamw_step, AdamW};

pub use cases::{cases, Case, Dims, Work};

/// `|got - want| <= atol + rtol * |want|` for every element, else an error naming the worst.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: Tolerance) -> Result<()> {
    ensure!(
        got.len() == want.len(),
        "{what}: {} values, expected {}",
        got.len(),
        want.len()
    );
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = (g as f64 - w).abs() - (tol.atol + tol.rtol * w.abs());
        if !(excess <= 0.0) && worst.is_none_or(|(_, e)| excess > e || excess.is_nan()) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        bail!(
            "{what}: element {i} is {} but the reference is {} (|diff| {:.3e} > {:.1e} + {:.1e}·|ref|)",
            got[i],
            want[i],
            (got[i] as f64 - want[i]).abs(),
            tol.atol,
            tol.rtol
        );
    }
    Ok(())
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// `len` deterministic values in [−0.5, 0.5) from `seed` (a linear congruential generator,
/// Numerical Recipes' constants): test inputs that need no random-number crate.
pub fn test_values(len: usize, seed: u32) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

/// The loosest of a backend's per-kernel tolerances: what a whole-model check (many kernels
/// composed) starts from.
pub fn model_tolerance<B: Backend>(backend: &B) -> Tolerance {
    KERNELS.iter().fold(
        Tolerance {
            atol: 0.0,
            rtol: 0.0,
        },
        |t, &k| {
            let k = backend.tolerance(k);
            Tolerance {
                atol: t.atol.max(k.atol),
                rtol: t.rtol.max(k.rtol),
            }
        },
    )
}

/// The whole-model fixtures `scripts/make_fixtures.py` writes (`tests/fixtures/model_*.safetensors`),
/// each one of kiln's presets.
pub const FIXTURES: [&str; 11] = [
    "tiny-mha",
    "tiny-gqa",
    "tiny-golf",
    "tiny-golf-recurrent",
    "tiny-golf-engram",
    "tiny-golf-parallel",
    "tiny-golf-moe",
    "tiny-golf-capsules",
    "tiny-golf-koopman",
    "tiny-golf-koopman-clamp",
    "tiny-golf-feedback",
];

/// Every kernel family.
pub const KERNELS: [Kernel; 20] = [
    Kernel::Memory,
    Kernel::Matmul,
    Kernel::Embedding,
    Kernel::RmsNorm,
    Kernel::Rope,
    Kernel::Attention,
    Kernel::SwiGlu,
    Kernel::Relu2,
    Kernel::Softcap,
    Kernel::Gate,
    Kernel::Xsa,
    Kernel::Scale,
    Kernel::Residual,
    Kernel::CrossEntropy,
    Kernel::ClassifierLoss,
    Kernel::FakeQuant,
    Kernel::SumSquares,
    Kernel::AdamW,
    Kernel::Ema,
    Kernel::Muon,
];

/// A case's buffers on a backend, uploaded from host values.
pub struct Placed<B: Backend> {
    memories: Vec<B::Memory>,
}

impl<B: Backend> Placed<B> {
    /// Allocates every buffer of `case` (f32) and uploads `inputs` into those that have values.
    pub fn new(backend: &B, case: &Case, inputs: &[Vec<f64>]) -> Result<Self> {
        let mut memories = Vec::new();
        for (len, values) in case.lengths(backend).into_iter().zip(inputs) {
            let memory = backend.alloc(len, DType::F32)?;
            if !values.is_empty() {
                backend.upload(View::whole(&memory), &to_f32(values))?;
            }
            memories.push(memory);
        }
        Ok(Placed { memories })
    }

    pub fn views(&self) -> Vec<View<'_, B>> {
        self.memories.iter().map(View::whole).collect()
    }

    pub fn download(&self, backend: &B, index: usize) -> Result<Vec<f32>> {
        let view = View::whole(&self.memories[index]);
        let mut host = vec![0.0; view.len()];
        backend.download(view, &mut host)?;
        Ok(host)
    }
}

/// Runs one case on `backend` and compares every output with the reference in f64, within
/// the backend's tolerance for the case's kernel (times the case's own factor, if it has one).
pub fn check_case<B: Backend>(backend: &B, case: &Case, seed: u64) -> Result<()> {
    let inputs = case.inputs(seed);
    let placed = Placed::new(backend, case, &inputs)?;
    let views = placed.views();
    case.prepare(backend, &views);
    case.run(backend, &views)?;
    backend.synchronize()?;
    let mut tol = backend.tolerance(case.kernel);
    if let Some((factor, _why)) = case.tolerance_factor {
        tol.atol *= factor;
        tol.rtol *= factor;
    }
    for (i, want) in case.expected(&inputs).into_iter().enumerate() {
        if let Some(want) = want {
            let what = format!("{} · {}", case.name, case.buffers[i].name);
            assert_close(&what, &placed.download(backend, i)?, &want, tol)?;
        }
    }
    Ok(())
}

/// What [`check_kernels`] ran.
#[derive(Debug)]
pub struct KernelReport {
    /// Cases run and matched.
    pub passed: usize,
    /// Cases the backend declined through `supports`, with its reason (a fast backend hands
    /// those shapes to a slower path; its own tests say which it may decline).
    pub declined: Vec<(String, String)>,
}

/// Every case of the table at the conformance sizes ([`Dims::conformance`]): each trait
/// method, forward and backward, with its accumulation modes, against the reference kernels
/// in f64. A case the backend declines through `supports` is reported, not run.
pub fn check_kernels<B: Backend>(backend: &B) -> Result<KernelReport> {
    check_cases(backend, &Dims::conformance(), |_| true)
}

/// The cases of `kernels` at `dims` (a model's sizes, where a backend's tiled paths take
/// over from its small-shape ones), as [`check_kernels`].
pub fn check_kernels_at<B: Backend>(
    backend: &B,
    dims: &Dims,
    kernels: &[kiln_core::backend::Kernel],
) -> Result<KernelReport> {
    check_cases(backend, dims, |k| kernels.contains(&k))
}

fn check_cases<B: Backend>(
    backend: &B,
    dims: &Dims,
    wanted: impl Fn(kiln_core::backend::Kernel) -> bool,
) -> Result<KernelReport> {
    let mut report = KernelReport {
        passed: 0,
        declined: Vec::new(),
    };
    for (i, case) in cases(dims).iter().enumerate() {
        if !wanted(case.kernel) {
            continue;
        }
        if let Err(why) = backend.supports(case.kernel, case.hint()) {
            report.declined.push((case.name.clone(), why));
            continue;
        }
        check_case(backend, case, 7 + i as u64)?;
        report.passed += 1;
    }
    Ok(report)
}

/// The memory methods: zero-filled allocation, upload and download of f32 and bf16 (rounded
/// to nearest even, as `half` rounds), `copy` converting both ways, `zero`, a transfer of the
/// wrong length refused, `synchronize`.
pub fn check_memory<B: Backend>(backend: &B) -> Result<()> {
    let values: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.173_205_08).collect();
    let n = values.len();
    let f32_mem = backend.alloc(n, DType::F32)?;
    let bf16_mem = backend.alloc(n, DType::BF16)?;
    let (f, h) = (View::<B>::whole(&f32_mem), View::<B>::whole(&bf16_mem));
    ensure!(
        h.dtype() == DType::BF16 && f.dtype() == DType::F32,
        "alloc: wrong dtype"
    );
    let download = |v: View<B>| -> Result<Vec<f32>> {
        let mut host = vec![f32::NAN; v.len()];
        backend.download(v, &mut host)?;
        Ok(host)
    };
    ensure!(
        download(f)?.iter().all(|&x| x == 0.0),
        "alloc: f32 memory not zeroed"
    );
    ensure!(
        download(h)?.iter().all(|&x| x == 0.0),
        "alloc: bf16 memory not zeroed"
    );
    backend.upload(f, &values)?;
    ensure!(download(f)? == values, "f32 upload/download is not exact");
    let rounded: Vec<f32> = values
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    backend.upload(h, &values)?;
    ensure!(
        download(h)? == rounded,
        "bf16 upload does not round to nearest even"
    );
    backend.zero(h);
    backend.copy(h, f);
    ensure!(
        download(h)? == rounded,
        "copy f32 → bf16 does not round to nearest even"
    );
    backend.zero(f);
    ensure!(download(f)?.iter().all(|&x| x == 0.0), "zero left values");
    backend.copy(f, h);
    ensure!(download(f)? == rounded, "copy bf16 → f32 is not exact");
    let tail = View::<B>::new(&f32_mem, 30, 7);
    backend.upload(tail, &values[..7])?;
    ensure!(
        download(tail)? == values[..7],
        "upload into a sub-view went astray"
    );
    ensure!(
        backend.upload(tail, &values[..6]).is_err(),
        "an upload of the wrong length must be refused"
    );
    backend.synchronize()?;
    Ok(())
}

/// A PyTorch fixture written by `scripts/make_fixtures.py`.
pub struct Fixture {
    pub config: ModelConfig,
    pub adamw: AdamW,
    pub batch: usize,
    pub seq: usize,
    bytes: Vec<u8>,
    path: String,
}

impl Fixture {
    pub const VERSION: &'static str = "1";

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read fixture {}", path.display()))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{} is not a safetensors file", path.display()))?;
        let meta = meta
            .metadata()
            .clone()
            .ok_or_else(|| anyhow!("{}: no metadata", path.display()))?;
        let get = |key: &str| {
            meta.get(key)
                .ok_or_else(|| anyhow!("{}: metadata has no '{key}'", path.display()))
        };
        ensure!(
            get("fixture_version")? == Self::VERSION,
            "{}: fixture version {} (kiln reads {}); rerun scripts/make_fixtures.py",
            path.display(),
            get("fixture_version")?,
            Self::VERSION
        );
        let config: ModelConfig = serde_json::from_str(get("config")?)?;
        let adamw: serde_json::Value = serde_json::from_str(get("adamw")?)?;
        let f = |k: &str| {
            adamw[k]
                .as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| anyhow!("adamw.{k} missing"))
        };
        let adamw = AdamW {
            learning_rate: f("learning_rate")?,
            beta1: f("beta1")?,
            beta2: f("beta2")?,
            eps: f("eps")?,
            weight_decay: f("weight_decay")?,
        };
        let mut fixture = Fixture {
            config,
            adamw,
            batch: 0,
            seq: 0,
            bytes,
            path: path.display().to_string(),
        };
        let shape = fixture.tensors()?.tensor("tokens")?.shape().to_vec();
        (fixture.batch, fixture.seq) = (shape[0], shape[1]);
        Ok(fixture)
    }

    /// Whether the fixture holds a tensor of this name.
    pub fn has(&self, name: &str) -> Result<bool> {
        Ok(self.tensors()?.names().contains(&name))
    }

    fn tensors(&self) -> Result<SafeTensors<'_>> {
        Ok(SafeTensors::deserialize(&self.bytes)?)
    }

    /// A tensor as f64, whatever its stored float or integer type.
    pub fn tensor(&self, name: &str) -> Result<Vec<f64>> {
        let tensors = self.tensors()?;
        let t = tensors
            .tensor(name)
            .with_context(|| format!("{}: no tensor '{name}'", self.path))?;
        let data = t.data();
        Ok(match t.dtype() {
            Dtype::F32 => kiln_core::bytes::le_floats(data, FloatWidth::F32)
                .into_iter()
                .map(f64::from)
                .collect(),
            Dtype::F64 => le_values::<f64>(data),
            Dtype::I64 => le_values::<i64>(data)
                .into_iter()
                .map(|x| x as f64)
                .collect(),
            other => bail!(
                "{}: tensor '{name}' has unsupported dtype {other:?}",
                self.path
            ),
        })
    }

    pub fn tokens(&self, name: &str) -> Result<Vec<u32>> {
        Ok(self.tensor(name)?.into_iter().map(|x| x as u32).collect())
    }

    /// Loads the fixture's weights into a new model on `backend`.
    pub fn model<B: Backend>(&self, backend: B) -> Result<Model<B>> {
        self.model_as(backend, self.config.clone())
    }

    /// The fixture's weights in a model of `config` (the fixture's, with evaluation-time
    /// settings changed).
    pub fn model_as<B: Backend>(&self, backend: B, config: ModelConfig) -> Result<Model<B>> {
        let model = Model::new(backend, config)?;
        for spec in &model.layout.specs {
            model.set_param(&spec.name, &to_f32(&self.tensor(&spec.name)?))?;
        }
        Ok(model)
    }
}

/// How closely a whole model must match its PyTorch fixture.
#[derive(Clone, Copy, Debug)]
pub enum ModelTolerance {
    /// Every element within `atol + rtol·|ref|` (logits and loss), ×10 for gradients, ×10
    /// rtol and ×100 atol for the AdamW trajectory: for f32 backends.
    Elementwise(Tolerance),
    /// The normalized mean squared error `Σ(a − b)² / Σb²` of each tensor (ggml's
    /// `test-backend-ops` measure) within these bounds: for reduced-precision backends,
    /// whose per-element error follows the magnitude of a whole dot product, not of its
    /// result.
    Nmse {
        /// Logits and the loss.
        outputs: f64,
        /// Each parameter's gradient.
        gradients: f64,
        /// The ten AdamW-step losses.
        trajectory: f64,
    },
}

/// `Σ(a − b)² / Σb²`.
pub fn nmse(got: &[f32], want: &[f64]) -> f64 {
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    err / norm.max(f64::MIN_POSITIVE)
}

fn compare(
    what: &str,
    got: &[f32],
    want: &[f64],
    tol: ModelTolerance,
    scale: (f64, f64),
) -> Result<()> {
    match tol {
        ModelTolerance::Elementwise(t) => {
            let t = Tolerance {
                atol: t.atol * scale.0,
                rtol: t.rtol * scale.1,
            };
            assert_close(what, got, want, t)
        }
        ModelTolerance::Nmse { .. } => unreachable!("callers pick the bound"),
    }
}

fn compare_nmse(what: &str, got: &[f32], want: &[f64], bound: f64) -> Result<()> {
    ensure!(
        got.len() == want.len(),
        "{what}: {} values, expected {}",
        got.len(),
        want.len()
    );
    let e = nmse(got, want);
    ensure!(
        e <= bound,
        "{what}: normalized squared error {e:.3e} > {bound:.1e}"
    );
    Ok(())
}

/// The whole model against a PyTorch fixture: logits, loss, every gradient (through the head
/// that keeps the logits and through the fused one), ten AdamW steps (fused head),
/// element-wise within the backend's loosest kernel tolerance (see [`ModelTolerance`]).
pub fn check_fixture<B: Backend + Clone>(backend: B, path: &Path) -> Result<()> {
    let tol = ModelTolerance::Elementwise(model_tolerance(&backend));
    check_fixture_within(backend, path, tol)
}

/// [`check_fixture`] with an explicit tolerance.
pub fn check_fixture_within<B: Backend + Clone>(
    backend: B,
    path: &Path,
    tol: ModelTolerance,
) -> Result<()> {
    let fixture = Fixture::load(path)?;
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let preset_name = name
        .trim_start_matches("model_")
        .trim_end_matches(".safetensors");
    ensure!(
        ModelConfig::preset(preset_name)? == fixture.config,
        "{name}: the fixture's config differs from kiln's preset '{preset_name}'"
    );
    let tokens = fixture.tokens("tokens")?;
    let targets = fixture.tokens("targets")?;
    let mut model = fixture.model(backend.clone())?;
    let acts = model.activations(fixture.batch, fixture.seq)?;
    let check = |what: &str, got: &[f32], want: &[f64], kind: usize| -> Result<()> {
        match tol {
            // Gradients are sums over all positions of products of several kernels' outputs;
            // their rounding error scales with the largest gradient, not each element (×10).
            // Adam divides by sqrt(v), so a gradient near zero turns f32 noise into a
            // full-size step: the trajectory drifts further than one forward (×10, ×100).
            ModelTolerance::Elementwise(_) => {
                let scale = [(1.0, 1.0), (10.0, 10.0), (100.0, 10.0)][kind];
                compare(what, got, want, tol, scale)
            }
            ModelTolerance::Nmse {
                outputs,
                gradients,
                trajectory,
            } => compare_nmse(what, got, want, [outputs, gradients, trajectory][kind]),
        }
    };

    let loss = model
        .forward(&acts, &tokens, Some(&targets))?
        .context("a loss")?;
    let logits = model.download_logits(&acts)?;
    check(
        &format!("{name} logits"),
        &logits,
        &fixture.tensor("logits")?,
        0,
    )?;
    check(
        &format!("{name} loss"),
        &[loss],
        &fixture.tensor("loss")?,
        0,
    )?;
    if fixture.has("carry")? {
        check_carry(backend, &fixture, &tokens, &name, &check)?;
    }

    // The gradients through the head that keeps the logits, then through the fused one
    // (classifier and cross-entropy a vocabulary chunk at a time), as training runs it.
    let fused = model.loss_activations(fixture.batch, fixture.seq)?;
    for (head, acts) in [("", &acts), (" (fused head)", &fused)] {
        let loss = model
            .forward(acts, &tokens, Some(&targets))?
            .context("a loss")?;
        check(
            &format!("{name} loss{head}"),
            &[loss],
            &fixture.tensor("loss")?,
            0,
        )?;
        model.zero_grad();
        model.backward(acts, &tokens, &targets, 1.0).unwrap();
        let grads = model.download_grads()?;
        for spec in &model.layout.specs {
            let got = &grads[spec.region.offset..][..spec.region.len];
            let want = fixture.tensor(&format!("grad.{}", spec.name))?;
            check(&format!("{name} grad.{}{head}", spec.name), got, &want, 1)?;
        }
    }
    let acts = fused;

    // Ten AdamW steps on the same batch.
    let want = fixture.tensor("adamw_losses")?;
    let mut got = Vec::new();
    for _ in 0..want.len() {
        model.zero_grad();
        got.push(
            model
                .forward(&acts, &tokens, Some(&targets))?
                .context("a loss")?,
        );
        model.backward(&acts, &tokens, &targets, 1.0).unwrap();
        adamw_step(&mut model, &fixture.adamw, 1.0).unwrap();
    }

    check(&format!("{name} adamw losses"), &got, &want, 2)
}

/// Capsule carry ([`kiln_core::config::Koopman::carry`]): the fixture's weights in a model
/// built with carry, each row's first pass given the fixture's carry; the logits, and the
/// capsule state that forward leaves, as the fixture's (outputs' tolerance). A second forward
/// without carry gives the plain logits again (rows without a carry run as without it).
fn check_carry<B: Backend + Clone>(
    backend: B,
    fixture: &Fixture,
    tokens: &[u32],
    name: &str,
    check: &dyn Fn(&str, &[f32], &[f64], usize) -> Result<()>,
) -> Result<()> {
    let mut config = fixture.config.clone();
    let koopman = config
        .arch
        .capsules
        .as_mut()
        .and_then(|k| k.koopman.as_mut());
    koopman
        .context("a carry fixture of a model without Koopman capsules")?
        .carry = Some(0.8);
    let model = fixture.model_as(backend, config)?;
    let acts = model.activations(fixture.batch, fixture.seq)?;
    let carry: Vec<f64> = fixture.tensor("carry")?;
    let rows: Vec<Option<Vec<f32>>> = carry
        .chunks_exact(carry.len() / fixture.batch)
        .map(|row| Some(to_f32(row)))
        .collect();
    model.forward_carrying(&acts, tokens, None, &rows)?;
    let logits = model.download_logits(&acts)?;
    check(
        &format!("{name} logits with a carry"),
        &logits,
        &fixture.tensor("carry_logits")?,
        0,
    )?;
    let state: Vec<f32> = model.capsule_state(&acts)?.concat();
    check(
        &format!("{name} capsule state"),
        &state,
        &fixture.tensor("carry_state")?,
        0,
    )?;
    model.forward_carrying(&acts, tokens, None, &vec![None; fixture.batch])?;
    let plain = model.download_logits(&acts)?;
    check(
        &format!("{name} logits, no carry given"),
        &plain,
        &fixture.tensor("logits")?,
        0,
    )
}

/// Twenty AdamW steps of a tiny model on a repeating token pattern: the loss must fall well
/// below its starting value (ln V for a fresh model). Returns the losses.
pub fn check_training_smoke<B: Backend>(backend: B, preset: &str) -> Result<Vec<f32>> {
    let config = ModelConfig::preset(preset)?;
    let vocab = config.vocab_size as u32;
    let mut model = Model::new(backend, config)?;
    model.init_random(42)?;
    let (batch, seq) = (4, 16);
    let acts = model.loss_activations(batch, seq)?;
    // Each sequence counts up from a random start: next token = previous + 1 (mod V), a rule
    // the model can learn in a few steps, unlike noise.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let hp = AdamW {
        learning_rate: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut losses = Vec::new();
    for _ in 0..20 {
        let mut tokens = Vec::new();
        let mut targets = Vec::new();
        for _ in 0..batch {
            let start: u32 = rng.random_range(0..vocab);
            tokens.extend((0..seq as u32).map(|i| (start + i) % vocab));
            targets.extend((0..seq as u32).map(|i| (start + i + 1) % vocab));
        }
        model.zero_grad();
        let loss = model
            .forward(&acts, &tokens, Some(&targets))?
            .context("a loss")?;
        ensure!(loss.is_finite(), "{preset}: loss became {loss}");
        model.backward(&acts, &tokens, &targets, 1.0).unwrap();
        adamw_step(&mut model, &hp, 1.0).unwrap();
        losses.push(loss);
    }
    let first = losses[0];
    let last_mean = losses[15..].iter().sum::<f32>() / 5.0;
    ensure!(
        last_mean < 0.7 * first,
        "{preset}: loss did not fall enough in 20 steps: {first:.3} -> {last_mean:.3} (losses {losses:?})"
    );
    Ok(losses)
}

/// The loss of each of `steps` AdamW steps (warm-up, then a constant rate; gradient clipping
/// at 1) of a fresh `preset` model (seed 42) on batches drawn from a fixed bigram chain: each
/// token is followed by one of two successors (probabilities 0.5 and 0.3) or a uniform token
/// (0.2), so the loss falls from ln V towards the chain's entropy over a few hundred steps
/// instead of collapsing to zero. The same on every backend, so curves can be compared.
pub fn training_curve<B: Backend>(backend: B, preset: &str, steps: usize) -> Result<Vec<f32>> {
    let config = ModelConfig::preset(preset)?;
    let vocab = config.vocab_size;
    let mut model = Model::new(backend, config)?;
    model.init_random(42)?;
    let (batch, seq) = (4, 32);
    let acts = model.loss_activations(batch, seq)?;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let next = |t: usize, rng: &mut ChaCha8Rng| -> usize {
        let u: f64 = rng.random();
        if u < 0.5 {
            (t * 7 + 1) % vocab
        } else if u < 0.8 {
            (t * 13 + 5) % vocab
        } else {
            rng.random_range(0..vocab)
        }
    };
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let (mut tokens, mut targets) = (Vec::new(), Vec::new());
        for _ in 0..batch {
            let mut t = rng.random_range(0..vocab);
            for _ in 0..seq {
                let n = next(t, &mut rng);
                tokens.push(t as u32);
                targets.push(n as u32);
                t = n;
            }
        }
        model.zero_grad();
        let loss = model
            .forward(&acts, &tokens, Some(&targets))?
            .context("a loss")?;
        ensure!(
            loss.is_finite(),
            "{preset}: loss became {loss} at step {step}"
        );
        model.backward(&acts, &tokens, &targets, 1.0).unwrap();
        let norm = model.grad_norm();
        let clip = if norm > 1.0 { (1.0 / norm) as f32 } else { 1.0 };
        let hp = AdamW {
            learning_rate: 3e-3 * ((step + 1) as f32 / 20.0).min(1.0),
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        adamw_step(&mut model, &hp, clip).unwrap();
        losses.push(loss);
    }
    Ok(losses)
}

/// A file of the project's `shared/` directory (beside the checkout; `KILN_SHARED_DIR`
/// overrides), found by walking up from `start`. A test that needs one must not pass silently
/// without it: this panics with what is missing and how to provide it, unless
/// `KILN_ALLOW_MISSING_SHARED=1` says to skip, in which case it returns `None` and the caller
/// prints that it skipped.
pub fn shared_file(start: &Path, relative: &str) -> Option<std::path::PathBuf> {
    let candidates: Vec<std::path::PathBuf> = match std::env::var_os("KILN_SHARED_DIR") {
        Some(dir) => vec![std::path::PathBuf::from(dir).join(relative)],
        None => start
            .ancestors()
            .map(|dir| dir.join("shared").join(relative))
            .collect(),
    };
    if let Some(found) = candidates.iter().find(|p| p.exists()) {
        return Some(found.clone());
    }
    if std::env::var_os("KILN_ALLOW_MISSING_SHARED").is_some_and(|v| v == "1") {
        eprintln!("skipped: shared/{relative} not found (KILN_ALLOW_MISSING_SHARED=1)");
        return None;
    }
    panic!(
        "this test needs shared/{relative}, the project's shared directory beside the checkout \
         (looked in every parent of {}); set KILN_SHARED_DIR to the directory that holds it, or \
         KILN_ALLOW_MISSING_SHARED=1 to skip this test knowingly",
        start.display()
    );
}
