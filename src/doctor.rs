//! `kiln doctor`: the machine as kiln sees it (CPU, ISA features with the OS's AMX permission,
//! cores and SMT siblings, memory, a GPU and driver) and which backends can run here, with
//! the reason for each that cannot.

use crate::backends::{self, BackendChoice};
use crate::machine::{self, Machine};

/// The report `kiln doctor` prints.
pub fn report(m: &Machine) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let has = |f: &str| m.features.contains(&f);
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!("kiln {}", m.kiln_version));
    line(String::new());
    line("machine".into());
    line(format!(
        "  cpu              {} ({}, family {}, model {})",
        m.cpu,
        m.vendor,
        m.family.map_or("?".into(), |v| v.to_string()),
        m.model.map_or("?".into(), |v| v.to_string())
    ));
    line(format!("  logical cpus     {}", m.logical_cpus));
    line(format!(
        "  smt siblings     cpu0 shares its core with cpus {}",
        m.cpu0_smt_siblings
            .as_deref()
            .unwrap_or("? (no sysfs topology)")
    ));
    line(format!(
        "  memory           {} total, {} available",
        m.memory_total_mib
            .map_or("?".into(), |v| format!("{:.1} GiB", v / 1024.0)),
        m.memory_available_mib
            .map_or("?".into(), |v| format!("{:.1} GiB", v / 1024.0))
    ));
    line(format!(
        "  avx2 + fma       {}",
        yes_no(has("avx2") && has("fma"))
    ));
    line(format!(
        "  avx-512          {} (F {}, BW {}, VL {})",
        yes_no(has("avx512f") && has("avx512bw") && has("avx512vl")),
        yes_no(has("avx512f")),
        yes_no(has("avx512bw")),
        yes_no(has("avx512vl"))
    ));
    line(format!("  avx512-bf16      {}", yes_no(has("avx512_bf16"))));
    line(format!("  avx512-fp16      {}", yes_no(has("avx512_fp16"))));
    line(format!(
        "  vnni             avx512 {}, avx {}",
        yes_no(has("avx512_vnni")),
        yes_no(has("avx_vnni"))
    ));
    let amx = match &m.amx_permission {
        None => "no (not in CPUID, or XCR0 does not enable tile state)".to_string(),
        Some(Ok(())) => "yes; the OS granted tile data (ARCH_REQ_XCOMP_PERM)".to_string(),
        Some(Err(why)) => format!("in CPUID, but not usable: {why}"),
    };
    line(format!("  amx-bf16         {amx}"));
    line(format!("  features         {}", m.features.join(" ")));
    line(format!(
        "  cpu tier         best {}; in use {}",
        m.best_isa.as_deref().unwrap_or("none"),
        match &m.selected_isa {
            Ok(Some(isa)) => format!(
                "{isa}{}",
                if std::env::var_os("KILN_ISA").is_some() {
                    " (capped by KILN_ISA)"
                } else {
                    ""
                }
            ),
            Ok(None) => "none".into(),
            Err(e) => e.clone(),
        }
    ));
    line(format!(
        "  gpu              {}",
        match (&m.nvidia_driver, m.nvidia_devices.is_empty()) {
            (Some(driver), _) => format!("{} ({})", m.nvidia_devices.join(", "), driver),
            (None, false) => format!(
                "{} (no driver version readable)",
                m.nvidia_devices.join(", ")
            ),
            (None, true) => "none (no NVIDIA driver loaded)".into(),
        }
    ));
    #[cfg(feature = "cuda")]
    {
        let lib = |l: kiln_cuda::libs::Lib| {
            kiln_cuda::libs::location(l)
                .map_or("not found".to_string(), |p| p.display().to_string())
        };
        use kiln_cuda::libs::Lib;
        line(format!("  libcuda          {}", lib(Lib::Driver)));
        line(format!("  libnvrtc         {}", lib(Lib::Nvrtc)));
        line(format!("  libcublasLt      {}", lib(Lib::CublasLt)));
        line(format!(
            "  libnccl          {}{}",
            lib(Lib::Nccl),
            kiln_cuda::nccl::version().map_or(String::new(), |v| format!(
                " (NCCL {v}; kiln train --gpus N)"
            ))
        ));
        if let Ok(info) = kiln_cuda::probe() {
            let (major, minor) = info.compute_capability;
            line(format!(
                "  cuda device      {}, sm_{major}{minor}, {:.1} GiB, driver API {}.{}, NVRTC {}.{}",
                info.name,
                info.memory_bytes as f64 / (1u64 << 30) as f64,
                info.driver_version / 1000,
                info.driver_version % 1000 / 10,
                info.nvrtc_version.0,
                info.nvrtc_version.1
            ));
        }
        line(format!(
            "  cuda attention   {}",
            match kiln_cuda::AttentionPath::from_env() {
                Ok(path) => format!("{} (KILN_CUDA_ATTENTION: mma, gemm or flash)", path.label()),
                Err(why) => why,
            }
        ));
        line(format!(
            "  cuda operands    {}",
            match std::env::var("KILN_CUDA_OPERANDS").as_deref() {
                Ok("f32") => "f32 (KILN_CUDA_OPERANDS: bf16 or f32)".to_string(),
                Err(_) | Ok("bf16") => "bf16 (KILN_CUDA_OPERANDS: bf16 or f32)".to_string(),
                Ok(other) => format!("KILN_CUDA_OPERANDS must be f32 or bf16, got {other:?}"),
            }
        ));
    }
    line(String::new());
    line("backends".into());
    for choice in BackendChoice::ALL {
        let status = match (backends::availability(choice), choice) {
            (Ok(()), BackendChoice::Cpu) => match kiln_cpu::CpuBackend::new() {
                Ok(cpu) => format!("usable: {}", kiln_core::backend::Backend::name(&cpu)),
                Err(why) => format!("not usable: {why}"),
            },
            (Ok(()), _) => "usable".to_string(),
            (Err(why), _) => format!("not usable: {why}"),
        };
        line(format!("  {:<10} {status}", choice.name()));
    }
    line(format!("  auto       picks '{}'", backends::auto().name()));
    line(String::new());
    line(format!(
        "data parallel    {}",
        crate::distributed::describe()
    ));
    out
}

/// Prints the report for this machine.
pub fn run() {
    print!("{}", report(&machine::describe()));
}
