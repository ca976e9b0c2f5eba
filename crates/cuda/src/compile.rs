//! The kernels' source, its compilation by NVRTC and the cache of compiled modules.
//!
//! `kernels/` (one translation unit) is compiled at start-up for the device's own architecture (`compute_XY`
//! PTX, which the driver turns into machine code). The PTX is cached under
//! `$XDG_CACHE_HOME/kiln/cuda` (or `~/.cache/kiln/cuda`), named by a hash of the source, the
//! architecture and NVRTC's version, so a later start skips the compiler.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use crate::libs::{self, Lib};

/// The CUDA C source of every kernel: the shared helpers, then one file per kernel family.
pub const SOURCE: &str = concat!(
    include_str!("kernels/common.cuh"),
    "\n",
    include_str!("kernels/memory.cu"),
    "\n",
    include_str!("kernels/embed.cu"),
    "\n",
    include_str!("kernels/rmsnorm.cu"),
    "\n",
    include_str!("kernels/rope.cu"),
    "\n",
    include_str!("kernels/attention.cu"),
    "\n",
    include_str!("kernels/activation.cu"),
    "\n",
    include_str!("kernels/xent.cu"),
    "\n",
    include_str!("kernels/optim.cu"),
    "\n",
    include_str!("kernels/quant.cu"),
);

/// Every kernel `SOURCE` defines (the backend loads each by name at start-up, so a kernel
/// missing from the module is an error then, not at its first call).
pub const KERNELS: [&str; 45] = [
    "f32_to_bf16",
    "bf16_to_f32",
    "embedding_forward",
    "embedding_backward",
    "rmsnorm_forward",
    "rmsnorm_backward",
    "column_dot",
    "rope",
    "attention_forward",
    "attention_backward_dq",
    "attention_backward_dkdv",
    "attention_decode",
    "attention_forward_mma",
    "attention_delta_mma",
    "attention_backward_mma",
    "causal_softmax",
    "causal_probabilities",
    "softmax_rows_backward",
    "swiglu_forward",
    "swiglu_backward",
    "relu2_forward",
    "relu2_backward",
    "softcap_forward",
    "softcap_backward",
    "residual_forward",
    "accumulate",
    "gate_forward",
    "gate_backward",
    "xsa_forward",
    "xsa_backward",
    "scale_forward",
    "cross_entropy_forward",
    "cross_entropy_backward",
    "cross_entropy_backward_bf16",
    "sum_squares",
    "adamw_step",
    "ema_update",
    "muon_momentum",
    "normalize_rows",
    "newton_schulz_start",
    "muon_apply",
    "f16_round_trip",
    "ternary_round_trip",
    "int_round_trip",
    "hadamard_blocks",
];

/// NVRTC's version, `(major, minor)`, or why NVRTC cannot be used.
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    libs::require(Lib::Nvrtc)?;
    // SAFETY: the library is loaded (checked above), so cudarc will not panic.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("NVRTC was found but could not be opened".into());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| format!("nvrtcVersion: {e:?}"))?;
    Ok((major, minor))
}

/// Compiles the kernels to PTX for `arch` (`"compute_80"`, `"compute_90"`, …), or returns
/// NVRTC's log.
pub fn compile(arch: &'static str) -> Result<String, String> {
    nvrtc_version()?;
    let options = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(SOURCE, options)
        .map(|ptx| ptx.to_src())
        .map_err(|e| format!("NVRTC failed to compile the kernels for {arch}: {e}"))
}

/// Each kernel's register use on `gpu`'s machine code (`"sm_80"`, `"sm_90"`, …): NVRTC
/// compiles the kernels through ptxas (`--ptxas-options=-v`), no GPU needed. (name, registers,
/// bytes spilled to local memory: stores and loads).
pub fn machine_code_report(gpu: &str) -> Result<Vec<(String, u32, u32)>, String> {
    use cudarc::nvrtc::result;
    nvrtc_version()?;
    let source = std::ffi::CString::new(SOURCE).map_err(|e| e.to_string())?;
    let program = result::create_program(&source, None).map_err(|e| format!("{e:?}"))?;
    let options = [
        "--std=c++17".to_string(),
        format!("-arch={gpu}"),
        "--ptxas-options=-v".into(),
    ];
    // SAFETY: the program was created above and is destroyed once, after its log is read.
    let (compiled, log) = unsafe {
        let compiled = result::compile_program(program, &options);
        let log = result::get_program_log(program);
        let _ = result::destroy_program(program);
        (compiled, log)
    };
    let log = log.map_err(|e| format!("{e:?}"))?;
    let log: String = log
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    compiled.map_err(|e| format!("NVRTC failed to compile the kernels for {gpu}: {e:?}\n{log}"))?;
    // ptxas prints, per kernel: "Function properties for NAME", then "N bytes stack frame,
    // S bytes spill stores, L bytes spill loads", then "Used R registers, …".
    let mut report = Vec::new();
    let lines: Vec<&str> = log.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.split("Function properties for ").nth(1) else {
            continue;
        };
        let number_before = |text: &str, what: &str| -> Option<u32> {
            let before = text.split(what).next()?;
            before.split_whitespace().last()?.parse().ok()
        };
        let spills = lines.get(i + 1).and_then(|l| {
            Some(number_before(l, "bytes spill stores")? + number_before(l, "bytes spill loads")?)
        });
        let registers = lines.get(i + 2).and_then(|l| {
            let after = l.split("Used ").nth(1)?;
            after.split_whitespace().next()?.parse().ok()
        });
        match (registers, spills) {
            (Some(r), Some(s)) => report.push((name.trim().to_string(), r, s)),
            _ => return Err(format!("unexpected ptxas report for {name}:\n{log}")),
        }
    }
    Ok(report)
}

/// The PTX for `arch`, from the cache when it has it, else compiled (and cached, best effort:
/// an unwritable cache only costs the next start its compile).
pub fn cached(arch: &'static str) -> Result<String, String> {
    let version = nvrtc_version()?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (SOURCE, arch, version).hash(&mut hasher);
    let path = cache_dir().map(|d| d.join(format!("kernels-{arch}-{:016x}.ptx", hasher.finish())));
    if let Some(ptx) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        return Ok(ptx);
    }
    let ptx = compile(arch)?;
    if let Some(path) = path {
        let _ = std::fs::create_dir_all(path.parent().unwrap());
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(ptx)
}

fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("kiln").join("cuda"))
}
