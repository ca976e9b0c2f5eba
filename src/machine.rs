//! What this machine is, for `kiln doctor`, benchmark JSON and run telemetry: the CPU (model,
//! vendor, family), the ISA features CPUID and the OS grant (`kiln_core::cpu`), the tier a CPU
//! backend would use, cores and SMT siblings, memory, and an NVIDIA GPU and driver if any.
//! Everything is read from /proc, /sys and CPUID; nothing is probed by running it.

use serde::Serialize;

use kiln_core::cpu;

/// A description of the machine.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub vendor: String,
    /// CPUID family and model, as /proc/cpuinfo gives them.
    pub family: Option<u32>,
    pub model: Option<u32>,
    /// The features kiln dispatches on, as CPUID and XCR0 report them.
    pub features: Vec<&'static str>,
    /// The OS's answer to the AMX permission request (`None`: the CPU reports no AMX).
    pub amx_permission: Option<Result<(), String>>,
    /// The best usable tier, ignoring `KILN_ISA`.
    pub best_isa: Option<String>,
    /// The tier a CPU backend uses: the best one lowered to `KILN_ISA`, or why the cap is bad.
    pub selected_isa: Result<Option<String>, String>,
    /// Logical CPUs this process may run on.
    pub logical_cpus: usize,
    /// Logical CPUs sharing cpu0's core (SMT siblings), from sysfs.
    pub cpu0_smt_siblings: Option<String>,
    pub memory_total_mib: Option<f64>,
    pub memory_available_mib: Option<f64>,
    /// The NVIDIA driver's version line, when its kernel module is loaded.
    pub nvidia_driver: Option<String>,
    /// NVIDIA device nodes present (/dev/nvidia0 …).
    pub nvidia_devices: Vec<String>,
    pub kiln_version: &'static str,
}

/// Reads the machine's description.
pub fn describe() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| -> Option<String> {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = |name: &str| -> Option<f64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
    };
    let features = cpu::features();
    let nvidia_devices = (0..16)
        .map(|i| format!("/dev/nvidia{i}"))
        .filter(|p| std::path::Path::new(p).exists())
        .collect();
    Machine {
        cpu: field("model name").unwrap_or_else(|| "unknown".into()),
        vendor: field("vendor_id").unwrap_or_else(|| "unknown".into()),
        family: field("cpu family").and_then(|v| v.parse().ok()),
        model: field("model").and_then(|v| v.parse().ok()),
        features: features.names(),
        amx_permission: features.amx_permission.clone(),
        best_isa: features.best().map(|i| i.to_string()),
        selected_isa: cpu::selected_isa().map(|i| i.map(|i| i.to_string())),
        logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu0_smt_siblings: std::fs::read_to_string(
            "/sys/devices/system/cpu/cpu0/topology/thread_siblings_list",
        )
        .ok()
        .map(|s| s.trim().to_string()),
        memory_total_mib: mem("MemTotal:"),
        memory_available_mib: mem("MemAvailable:"),
        nvidia_driver: std::fs::read_to_string("/proc/driver/nvidia/version")
            .ok()
            .and_then(|s| s.lines().next().map(str::to_string)),
        nvidia_devices,
        kiln_version: env!("CARGO_PKG_VERSION"),
    }
}
