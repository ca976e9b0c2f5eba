//! Finding CUDA's shared libraries at run time.
//!
//! cudarc opens `libcuda`, `libnvrtc`, `libcublasLt` and `libnccl` by name, so only the loader's search
//! path is seen, and it panics when a library is missing. Before any cudarc call this module
//! looks for each library where CUDA installs put it (the driver's own folders, a toolkit
//! under /usr/local/cuda, and the `nvidia-*` Python wheels PyTorch and `pip install
//! nvidia-cuda-nvrtc` bring), opens the first found by its full path and keeps it open: the
//! loader then answers cudarc's open-by-name with the library already loaded (it matches the
//! soname). `KILN_CUDA_LIBS` (folders, `:`-separated) is searched first.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One of the libraries the backend needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lib {
    /// The driver API (`libcuda.so.1`, installed with the NVIDIA driver).
    Driver,
    /// The run-time compiler (`libnvrtc.so.13`).
    Nvrtc,
    /// cuBLASLt (`libcublasLt.so.13`).
    CublasLt,
    /// NCCL (`libnccl.so.2`), for data parallel across GPUs.
    Nccl,
}

impl Lib {
    pub fn soname(self) -> &'static str {
        match self {
            Lib::Driver => "libcuda.so.1",
            Lib::Nvrtc => "libnvrtc.so.13",
            Lib::CublasLt => "libcublasLt.so.13",
            Lib::Nccl => "libnccl.so.2",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Where `lib` was loaded from, or `None` when it is not on this machine: searched (and
/// loaded) on its first request, once per process. Each library alone: the backend's probe
/// asks for the driver first, so a machine without one loads none of the others (PyTorch's
/// wheels put cuBLASLt, NVRTC and NCCL on many CPU machines; loading them cost every CPU run
/// about 190 MiB of resident memory).
pub fn location(lib: Lib) -> Option<&'static Path> {
    static FOUND: [OnceLock<Option<PathBuf>>; 4] = [const { OnceLock::new() }; 4];
    static FOLDERS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    FOUND[lib.index()]
        .get_or_init(|| preload(lib, FOLDERS.get_or_init(folders)))
        .as_deref()
}

/// `Ok` when `lib` is loaded, else a sentence saying what is missing and how to get it.
pub fn require(lib: Lib) -> Result<&'static Path, String> {
    location(lib).ok_or_else(|| {
        let how = match lib {
            Lib::Driver => return "no CUDA driver found (libcuda.so.1: no NVIDIA driver on this machine)".into(),
            Lib::Nvrtc => "NVRTC not found (libnvrtc.so.13: `pip install nvidia-cuda-nvrtc`, a CUDA 13 toolkit",
            Lib::CublasLt => "cuBLASLt not found (libcublasLt.so.13: `pip install nvidia-cublas`, a CUDA 13 toolkit",
            Lib::Nccl => "NCCL not found (libnccl.so.2: `pip install nvidia-nccl-cu13`",
        };
        format!("{how}, or KILN_CUDA_LIBS naming its folder)")
    })
}

/// Opens `lib` from the first folder that has it (or by name, through the loader's own
/// search path, last), and keeps it open for the life of the process.
fn preload(lib: Lib, folders: &[PathBuf]) -> Option<PathBuf> {
    let candidates = folders
        .iter()
        .map(|f| f.join(lib.soname()))
        .filter(|p| p.exists())
        .chain(std::iter::once(PathBuf::from(lib.soname())));
    for path in candidates {
        // SAFETY: loading a CUDA library runs its initialisers, which have no preconditions.
        if let Ok(handle) = unsafe { libloading::Library::new(&path) } {
            // Kept open on purpose: cudarc's later open-by-name must find it loaded.
            std::mem::forget(handle);
            return Some(path);
        }
    }
    None
}

/// The folders searched, in order.
fn folders() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::env::var("KILN_CUDA_LIBS")
        .unwrap_or_default()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    for fixed in [
        "/usr/local/nvidia/lib64",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
    ] {
        out.push(PathBuf::from(fixed));
    }
    for site in python_site_folders() {
        out.push(site.join("nvidia/cu13/lib"));
        for sub in ["cuda_nvrtc", "cublas", "nccl"] {
            out.push(site.join("nvidia").join(sub).join("lib"));
        }
    }
    out
}

/// The site-packages folders of the `python3` on the PATH, if there is one (the NVIDIA wheels
/// live there), plus the usual virtual-environment places.
fn python_site_folders() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(output) = std::process::Command::new("python3")
        .args(["-c", "import site, sys; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()] + sys.path))"])
        .stderr(std::process::Stdio::null())
        .output()
    {
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let path = PathBuf::from(line.trim());
            let site = path.ends_with("site-packages") || path.ends_with("dist-packages");
            if site && !out.contains(&path) {
                out.push(path);
            }
        }
    }
    out
}
