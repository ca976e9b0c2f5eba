//! The one backend switch. `--backend auto|reference|cpu|cuda` (or `KILN_BACKEND`) and
//! `--precision bf16|f32` (or `KILN_PRECISION`) on every command that computes are resolved
//! here, and only here, into a concrete backend; the commands are generic over `Backend` and
//! run through [`with_backend!`](crate::with_backend).
//!
//! `auto` picks the fastest backend usable on this machine. A backend that is not compiled
//! into this build, or not usable here, is refused with the reason, as candle's stand-in CUDA
//! backend does; nothing falls back silently to another backend than the one asked for.

use anyhow::{bail, Result};
use kiln_cpu::{CpuBackend, Precision};
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
        BackendChoice::Cuda => {
            let driver = std::path::Path::new("/proc/driver/nvidia/version").exists();
            Err(format!(
                "not compiled into this kiln {}: there is no CUDA backend in this version ({})",
                env!("CARGO_PKG_VERSION"),
                if driver {
                    "an NVIDIA driver is loaded here"
                } else {
                    "and no NVIDIA driver is loaded here"
                }
            ))
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
        (BackendChoice::Reference, Some(Precision::Bf16)) => {
            bail!(
                "the reference backend computes in f32 only: use --precision f32 or --backend cpu"
            )
        }
        (BackendChoice::Cpu, precision) => {
            let mut backend = CpuBackend::new().map_err(anyhow::Error::msg)?;
            if let Some(precision) = precision {
                backend = CpuBackend::with(backend.isa(), precision, backend.threads())
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
        Resolved::Reference(_) => match kiln_core::cpu::features().best() {
            Some(isa) if isa >= kiln_core::cpu::Isa::Avx512 => Probe::FmaZmm,
            _ => Probe::FmaYmm,
        },
    }
}

/// The hardware peak (GFLOP/s) of the precision `selection` computes in, on the threads it
/// computes on (the cpu backend's pool: `KILN_THREADS`, or every CPU this process may use),
/// from a register-only probe spinning about `seconds`, with the probe's name.
pub fn hardware_peak(selection: Selection, seconds: f64) -> Result<(f64, &'static str)> {
    let resolved = resolve(selection)?;
    let probe = peak_probe(&resolved);
    let threads = match &resolved {
        Resolved::Cpu(cpu) => cpu.threads(),
        Resolved::Reference(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
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
        let err = resolve(BackendChoice::Cuda).err().unwrap().to_string();
        assert!(
            err.contains("cuda") && err.contains("not compiled"),
            "{err}"
        );
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
