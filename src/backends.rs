//! The one backend switch. `--backend auto|reference|cpu|cuda` (or `KILN_BACKEND`) and
//! `--precision bf16|f32` (or `KILN_PRECISION`) on every command that computes are resolved
//! here, and only here, into a concrete backend; the commands are generic over `Backend` and
//! run through [`with_backend!`](crate::with_backend).
//!
//! `auto` picks the fastest backend usable on this machine. A backend that is not compiled
//! into this build, or not usable here, is refused with the reason, as candle's stand-in CUDA
//! backend does; nothing falls back silently to another backend than the one asked for.

use anyhow::{bail, Result};
use kiln_cpu::CpuBackend;
use kiln_reference::ReferenceBackend;

/// The backends `--backend` names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// The fastest backend usable on this machine.
    #[default]
    Auto,
    /// The reference CPU backend (f32, rayon, matrixmultiply): the yardstick.
    Reference,
    /// The fast CPU backend with run-time ISA dispatch (AVX2, AVX-512, AVX512-BF16, AMX).
    Cpu,
    /// The CUDA backend.
    Cuda,
}

impl BackendChoice {
    pub const ALL: [BackendChoice; 3] = [
        BackendChoice::Reference,
        BackendChoice::Cpu,
        BackendChoice::Cuda,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Reference => "reference",
            BackendChoice::Cpu => "cpu",
            BackendChoice::Cuda => "cuda",
        }
    }
}

/// Whether a backend can run here, and if not, why.
pub fn availability(choice: BackendChoice) -> Result<(), String> {
    match choice {
        BackendChoice::Auto => Ok(()),
        BackendChoice::Reference => Ok(()),
        BackendChoice::Cpu => kiln_core::cpu::selected_isa().and_then(|isa| match isa {
            Some(_) => Ok(()),
            None => Err("this CPU has no AVX2+FMA, the lowest tier of the fast CPU backend".into()),
        }),
        BackendChoice::Cuda => cuda_availability(),
    }
}

/// Whether the CUDA backend can run here (probed once per process: the probe loads the
/// libraries and starts the driver).
#[cfg(feature = "cuda")]
fn cuda_availability() -> Result<(), String> {
    static PROBED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    PROBED
        .get_or_init(|| kiln_cuda::probe().map(|_| ()))
        .clone()
}

#[cfg(not(feature = "cuda"))]
fn cuda_availability() -> Result<(), String> {
    Err(format!(
        "this kiln {} was compiled without the cuda feature (cargo build --features cuda)",
        env!("CARGO_PKG_VERSION")
    ))
}

/// The matmuls' precision (`--precision`, `KILN_PRECISION`); everything else computes in
/// f32, and master weights, gradients and optimizer state are f32 throughout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// bf16 inputs, f32 accumulation: the cuda backend, and CPU tiers with a native bf16 dot
    /// product.
    Bf16,
    /// f16 inputs, f32 accumulation (the cuda backend): three more mantissa bits than bf16
    /// but a range that small gradients fall out of, so training scales the loss
    /// (`--loss-scale`, dynamic by default with f16).
    F16,
    /// f32 throughout (the cpu and reference backends).
    F32,
}

impl Precision {
    /// The CPU backend's precision, or why it has none such.
    fn cpu(self) -> Result<kiln_cpu::Precision> {
        match self {
            Precision::Bf16 => Ok(kiln_cpu::Precision::Bf16),
            Precision::F32 => Ok(kiln_cpu::Precision::F32),
            Precision::F16 => {
                bail!("f16 products are the cuda backend's: use bf16 or f32 on the CPU")
            }
        }
    }
}

/// The weights' format for inference (`--weights` on `sample`, `eval`, `bench decode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Weights {
    /// f32 matmuls (as `--precision f32`).
    F32,
    /// bf16 copies of the weights, converted once at load (as `--precision bf16`; tiers with
    /// a native bf16 dot product).
    Bf16,
    /// int8 in groups of 64 (32 where a row does not divide by 64) with f32 scales, as
    /// llama2.c's `runq.c`; every forward product runs int8 dot products (cpu backend).
    Int8,
    /// A packed artifact's own codes (ternary, int6, int8) and scales, run by the integer
    /// kernels without widening them to f32; other weights as the precision says (cpu
    /// backend; `--artifact`, where it is the default).
    Packed,
}

/// What `--backend`, `--precision` and `--weights` (or `KILN_BACKEND`, `KILN_PRECISION`,
/// `KILN_WEIGHTS`) ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub backend: BackendChoice,
    /// The matmuls' precision on the CPU backend; `None`: bf16 where the tier has a native
    /// bf16 dot product, f32 elsewhere. The reference backend is f32 only.
    pub precision: Option<Precision>,
    /// The inference weights' format; `None`: as the precision says.
    pub weights: Option<Weights>,
}

impl Selection {
    /// Whether the loader rounds the weights through int8 groups (`--weights int8`).
    pub fn int8(&self) -> bool {
        self.weights == Some(Weights::Int8)
    }

    /// Whether products run an artifact's own codes (`--weights packed`).
    pub fn packed(&self) -> bool {
        self.weights == Some(Weights::Packed)
    }

    /// The selection that runs a packed artifact (`--artifact`): on its own codes
    /// (`--weights packed`) unless `--weights` says otherwise, where the backend is the cpu
    /// one (the one with the integer kernels).
    pub fn for_artifact(mut self, artifact: bool) -> Self {
        let choice = match self.backend {
            BackendChoice::Auto => auto(),
            other => other,
        };
        if artifact && self.weights.is_none() && choice == BackendChoice::Cpu {
            self.weights = Some(Weights::Packed);
        }
        self
    }

    /// The precision `--weights` and `--precision` ask for together, or why they disagree.
    fn effective_precision(&self) -> Result<Option<Precision>> {
        Ok(match (self.weights, self.precision) {
            (Some(Weights::F32), Some(Precision::Bf16))
            | (Some(Weights::Bf16), Some(Precision::F32)) => {
                bail!("--weights and --precision disagree: give one of them")
            }
            (Some(Weights::F32), _) => Some(Precision::F32),
            (Some(Weights::Bf16), _) => Some(Precision::Bf16),
            (Some(Weights::Int8 | Weights::Packed) | None, precision) => precision,
        })
    }
}

impl From<BackendChoice> for Selection {
    fn from(backend: BackendChoice) -> Self {
        Selection {
            backend,
            precision: None,
            weights: None,
        }
    }
}

/// A backend resolved from a [`Selection`]: one variant per backend compiled in.
pub enum Resolved {
    Reference(ReferenceBackend),
    Cpu(CpuBackend),
    #[cfg(feature = "cuda")]
    Cuda(kiln_cuda::CudaBackend),
}

/// The backend `auto` picks: the first usable one, fastest first.
pub fn auto() -> BackendChoice {
    [
        BackendChoice::Cuda,
        BackendChoice::Cpu,
        BackendChoice::Reference,
    ]
    .into_iter()
    .find(|&b| availability(b).is_ok())
    .unwrap_or(BackendChoice::Reference)
}

/// Resolves a selection into a backend, or says why it cannot run here.
pub fn resolve(selection: impl Into<Selection>) -> Result<Resolved> {
    let selection = selection.into();
    let choice = match selection.backend {
        BackendChoice::Auto => auto(),
        other => other,
    };
    if let Err(why) = availability(choice) {
        bail!("backend '{}' is not usable: {why}", choice.name());
    }
    let precision = selection.effective_precision()?;
    if (selection.int8() || selection.packed()) && choice != BackendChoice::Cpu {
        bail!(
            "--weights int8 and packed run on the cpu backend, not '{}'",
            choice.name()
        );
    }
    match (choice, precision) {
        (BackendChoice::Reference, None | Some(Precision::F32)) => {
            Ok(Resolved::Reference(ReferenceBackend))
        }
        (BackendChoice::Reference, Some(Precision::Bf16 | Precision::F16)) => {
            bail!(
                "the reference backend computes in f32 only: use --precision f32 or --backend cpu"
            )
        }
        (BackendChoice::Cpu, precision) => {
            let mut backend = CpuBackend::new().map_err(anyhow::Error::msg)?;
            if let Some(precision) = precision {
                backend = CpuBackend::with(backend.isa(), precision.cpu()?, backend.threads())
                    .map_err(anyhow::Error::msg)?
                    .keeping(backend.logits());
            }
            if selection.int8() {
                backend = backend.with_int8_weights();
            } else if selection.packed() {
                backend = backend.with_given_codes();
            }
            Ok(Resolved::Cpu(backend))
        }
        #[cfg(feature = "cuda")]
        (BackendChoice::Cuda, None | Some(Precision::Bf16)) => Ok(Resolved::Cuda(
            kiln_cuda::CudaBackend::new().map_err(anyhow::Error::msg)?,
        )),
        #[cfg(feature = "cuda")]
        (BackendChoice::Cuda, Some(Precision::F16)) => Ok(Resolved::Cuda(
            kiln_cuda::CudaBackend::new()
                .map_err(anyhow::Error::msg)?
                .with_products(kiln_cuda::Products::F16),
        )),
        #[cfg(feature = "cuda")]
        (BackendChoice::Cuda, Some(Precision::F32)) => {
            bail!("the cuda backend multiplies in bf16 or f16 (f32 accumulation): use --precision bf16 or f16")
        }
        (other, _) => bail!("backend '{}' is not compiled into this kiln", other.name()),
    }
}

/// The register-only probe whose peak a backend's matmuls are measured against for MFU:
/// the CPU backend's own tier and precision; the reference backend computes in f32, so the
/// best f32 FMA this CPU has.
pub fn peak_probe(resolved: &Resolved) -> kiln_cpu::probe::Probe {
    use kiln_cpu::probe::Probe;
    match resolved {
        Resolved::Cpu(cpu) => cpu.peak_probe(),
        _ => match kiln_core::cpu::features().best() {
            Some(isa) if isa >= kiln_core::cpu::Isa::Avx512 => Probe::FmaZmm,
            _ => Probe::FmaYmm,
        },
    }
}

/// What a backend's peak is measured by, for the benchmarks' lines: the CPU probe's name, or
/// the GPU's datasheet.
pub fn peak_label(resolved: &Resolved) -> String {
    match resolved {
        #[cfg(feature = "cuda")]
        Resolved::Cuda(_) => "the GPU's dense bf16 datasheet peak".into(),
        _ => peak_probe(resolved).name().into(),
    }
}

/// The dense bf16 tensor-core peak of a GPU, GFLOP/s, from NVIDIA's datasheets (without
/// sparsity): H100 SXM and H200 989.4 TFLOP/s, H100 PCIe 756, A100 312, L40S 362, RTX 4090
/// 165 (f32 accumulation: 165 is the GeForce figure at f16-accumulate halved).
pub fn gpu_peak_gflops(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    let tflops = if n.contains("H200")
        || (n.contains("H100") && (n.contains("SXM") || n.contains("HBM3")))
    {
        989.4
    } else if n.contains("H100") {
        756.0
    } else if n.contains("A100") {
        312.0
    } else if n.contains("L40S") {
        362.0
    } else if n.contains("4090") {
        165.0
    } else {
        return None;
    };
    Some(tflops * 1e3)
}

/// The hardware peak (GFLOP/s) of the precision `selection` computes in, on the threads it
/// computes on (the cpu backend's pool: `KILN_THREADS`, or every CPU this process may use),
/// from a register-only probe spinning about `seconds`, with the probe's name.
pub fn hardware_peak(selection: Selection, seconds: f64) -> Result<(f64, &'static str)> {
    let resolved = resolve(selection)?;
    #[cfg(feature = "cuda")]
    if let Resolved::Cuda(gpu) = &resolved {
        let name = &gpu.info().name;
        return match gpu_peak_gflops(name) {
            Some(peak) => Ok((peak, "the GPU's dense bf16 datasheet peak")),
            None => bail!("no datasheet peak for {name}: give --peak in GFLOP/s"),
        };
    }
    let probe = peak_probe(&resolved);
    let threads = match &resolved {
        Resolved::Cpu(cpu) => cpu.threads(),
        _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    match kiln_cpu::probe::peak_gflops(probe, threads, seconds) {
        Some(peak) => Ok((peak, probe.name())),
        None => bail!("the {} probe cannot run on this CPU", probe.name()),
    }
}

/// Runs `$body` with `$backend` bound to the backend `$choice` resolves to (one expansion per
/// compiled-in backend, so `$body` may be generic code over `Backend`).
#[macro_export]
macro_rules! with_backend {
    ($choice:expr, |$backend:ident| $body:expr) => {
        match $crate::backends::resolve($choice)? {
            $crate::backends::Resolved::Reference($backend) => $body,
            $crate::backends::Resolved::Cpu($backend) => $body,
            #[cfg(feature = "cuda")]
            $crate::backends::Resolved::Cuda($backend) => $body,
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_resolves_and_a_missing_backend_says_why() -> Result<()> {
        assert!(resolve(BackendChoice::Auto).is_ok());
        assert!(resolve(BackendChoice::Reference).is_ok());
        // Without a GPU (CI's machines) the cuda backend is refused with the reason.
        if let Err(err) = resolve(BackendChoice::Cuda) {
            let err = err.to_string();
            assert!(err.contains("'cuda' is not usable"), "{err}");
            #[cfg(not(feature = "cuda"))]
            assert!(err.contains("without the cuda feature"), "{err}");
        }
        if kiln_core::cpu::features().best().is_some() {
            assert!(matches!(resolve(BackendChoice::Auto)?, Resolved::Cpu(_)));
        }
        let reference_bf16 = Selection {
            backend: BackendChoice::Reference,
            precision: Some(Precision::Bf16),
            weights: None,
        };
        let err = resolve(reference_bf16).err().unwrap().to_string();
        assert!(err.contains("f32 only"), "{err}");
        let reference_int8 = Selection {
            weights: Some(Weights::Int8),
            ..reference_bf16
        };
        let err = resolve(reference_int8).err().unwrap().to_string();
        assert!(err.contains("cpu backend"), "{err}");
        let disagree = Selection {
            backend: BackendChoice::Cpu,
            precision: Some(Precision::Bf16),
            weights: Some(Weights::F32),
        };
        let err = resolve(disagree).err().unwrap().to_string();
        assert!(err.contains("disagree"), "{err}");
        Ok(())
    }
}
