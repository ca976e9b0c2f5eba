//! The one backend switch. `--backend auto|reference|cpu|cuda` (or `KILN_BACKEND`) on every
//! command that computes is resolved here, and only here, into a concrete backend; the
//! commands are generic over `Backend` and run through [`with_backend!`](crate::with_backend).
//!
//! `auto` picks the fastest backend usable on this machine. A backend that is not compiled
//! into this build, or not usable here, is refused with the reason, as candle's stand-in CUDA
//! backend does; nothing falls back silently to another backend than the one asked for.

use anyhow::{bail, Result};
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
        BackendChoice::Cpu => Err(format!(
            "not compiled into this kiln {}: the fast CPU backend is not written yet (this CPU's best tier would be {})",
            env!("CARGO_PKG_VERSION"),
            kiln_core::cpu::features()
                .best()
                .map_or("none (no AVX2+FMA)".to_string(), |i| i.to_string())
        )),
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

/// A backend resolved from a [`BackendChoice`]: one variant per backend compiled in.
pub enum Resolved {
    Reference(ReferenceBackend),
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

/// Resolves `choice` into a backend, or says why it cannot run here.
pub fn resolve(choice: BackendChoice) -> Result<Resolved> {
    let choice = match choice {
        BackendChoice::Auto => auto(),
        other => other,
    };
    if let Err(why) = availability(choice) {
        bail!("backend '{}' is not usable: {why}", choice.name());
    }
    match choice {
        BackendChoice::Reference => Ok(Resolved::Reference(ReferenceBackend)),
        other => bail!("backend '{}' is not compiled into this kiln", other.name()),
    }
}

/// Runs `$body` with `$backend` bound to the backend `$choice` resolves to (one expansion per
/// compiled-in backend, so `$body` may be generic code over `Backend`).
#[macro_export]
macro_rules! with_backend {
    ($choice:expr, |$backend:ident| $body:expr) => {
        match $crate::backends::resolve($choice)? {
            $crate::backends::Resolved::Reference($backend) => $body,
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_resolves_and_a_missing_backend_says_why() {
        assert!(resolve(BackendChoice::Auto).is_ok());
        assert!(resolve(BackendChoice::Reference).is_ok());
        let err = resolve(BackendChoice::Cuda).err().unwrap().to_string();
        assert!(
            err.contains("cuda") && err.contains("not compiled"),
            "{err}"
        );
        let err = resolve(BackendChoice::Cpu).err().unwrap().to_string();
        assert!(err.contains("cpu") && err.contains("not compiled"), "{err}");
    }
}
