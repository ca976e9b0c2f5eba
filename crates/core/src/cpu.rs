//! What this CPU can run, read once from CPUID and the OS (never by trying an instruction),
//! and the ordered ISA tiers a CPU backend dispatches over.
//!
//! The tiers, lowest first ([`Isa`] is `Ord`): AVX2+FMA, AVX-512 (F, BW, VL), AVX512-BF16,
//! AMX-BF16. A tier is usable when CPUID reports its instructions, XCR0 says the OS saves the
//! registers they use, and, for AMX, the kernel granted this process the tile data
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`). `KILN_ISA` caps the tier, so a
//! lower tier can be run and tested on a higher machine (as oneDNN's `ONEDNN_MAX_CPU_ISA`).
//!
//! Hypervisors hide features: a CPU model number does not say what is usable here.

use std::fmt;
use std::sync::OnceLock;

/// An instruction-set tier of the CPU backends, ordered by capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Isa {
    /// AVX2 and FMA: 8-wide f32 FMA; no bf16 arithmetic.
    Avx2,
    /// AVX-512 F, BW and VL: 16-wide f32 FMA.
    Avx512,
    /// AVX-512 with the bf16 dot product (`vdpbf16ps`).
    Avx512bf16,
    /// Intel AMX tiles with bf16 (`tdpbf16ps`).
    Amx,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Avx2, Isa::Avx512, Isa::Avx512bf16, Isa::Amx];

    /// The name `KILN_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }

    pub fn parse(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|isa| isa.name() == name)
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What CPUID and the OS said, once per process.
#[derive(Clone, Debug, Default)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub fma: bool,
    pub f16c: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512vl: bool,
    pub avx512_bf16: bool,
    pub avx512_fp16: bool,
    pub avx512_vnni: bool,
    pub avx_vnni: bool,
    /// CPUID reports AMX tiles with bf16 (leaf 7 EDX bits 24 and 22) and XCR0 enables the
    /// tile state (bits 17 and 18).
    pub amx_bf16: bool,
    pub amx_int8: bool,
    /// The kernel's answer to `ARCH_REQ_XCOMP_PERM`: `Ok` when granted, else why not. Only
    /// asked when CPUID reports AMX.
    pub amx_permission: Option<Result<(), String>>,
}

impl CpuFeatures {
    /// Whether a tier's instructions are usable here (ignoring the cap).
    pub fn supports(&self, isa: Isa) -> bool {
        let avx512 = self.avx512f && self.avx512bw && self.avx512vl && self.fma;
        match isa {
            Isa::Avx2 => self.avx2 && self.fma,
            Isa::Avx512 => avx512,
            Isa::Avx512bf16 => avx512 && self.avx512_bf16,
            // The AMX tier packs its operands and decodes with AVX512-BF16 (every CPU with
            // AMX has it; a hypervisor could hide one and not the other).
            Isa::Amx => {
                avx512
                    && self.avx512_bf16
                    && self.amx_bf16
                    && matches!(self.amx_permission, Some(Ok(())))
            }
        }
    }

    /// The highest usable tier, ignoring the cap; `None` on a CPU without AVX2 and FMA.
    pub fn best(&self) -> Option<Isa> {
        Isa::ALL.into_iter().rev().find(|&isa| self.supports(isa))
    }

    /// Why a tier is not usable here, or `None` when it is.
    pub fn missing(&self, isa: Isa) -> Option<String> {
        if self.supports(isa) {
            return None;
        }
        let mut lacks = Vec::new();
        let mut need = |ok: bool, name: &str| {
            if !ok {
                lacks.push(name.to_string());
            }
        };
        match isa {
            Isa::Avx2 => {
                need(self.avx2, "AVX2");
                need(self.fma, "FMA");
            }
            Isa::Avx512 | Isa::Avx512bf16 | Isa::Amx => {
                need(self.avx512f, "AVX512F");
                need(self.avx512bw, "AVX512BW");
                need(self.avx512vl, "AVX512VL");
                need(self.fma, "FMA");
                if isa >= Isa::Avx512bf16 {
                    need(self.avx512_bf16, "AVX512_BF16");
                }
                if isa == Isa::Amx {
                    need(self.amx_bf16, "AMX-BF16 (CPUID and XCR0)");
                    if let Some(Err(why)) = &self.amx_permission {
                        lacks.push(format!("the OS's AMX permission ({why})"));
                    }
                }
            }
        }
        Some(format!("CPU or OS lacks {}", lacks.join(", ")))
    }

    /// Every feature present, by its /proc/cpuinfo-like name.
    pub fn names(&self) -> Vec<&'static str> {
        let flags = [
            (self.avx2, "avx2"),
            (self.fma, "fma"),
            (self.f16c, "f16c"),
            (self.avx512f, "avx512f"),
            (self.avx512bw, "avx512bw"),
            (self.avx512vl, "avx512vl"),
            (self.avx512_bf16, "avx512_bf16"),
            (self.avx512_fp16, "avx512_fp16"),
            (self.avx512_vnni, "avx512_vnni"),
            (self.avx_vnni, "avx_vnni"),
            (self.amx_bf16, "amx_bf16"),
            (self.amx_int8, "amx_int8"),
        ];
        flags
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| *n)
            .collect()
    }
}

/// This CPU's features, detected on first use.
pub fn features() -> &'static CpuFeatures {
    static FEATURES: OnceLock<CpuFeatures> = OnceLock::new();
    FEATURES.get_or_init(detect)
}

/// The cap from `KILN_ISA`, if set; an unknown name is an error that lists the valid ones.
pub fn isa_cap() -> Result<Option<Isa>, String> {
    match std::env::var("KILN_ISA") {
        Err(_) => Ok(None),
        Ok(name) if name.is_empty() => Ok(None),
        Ok(name) => Isa::parse(&name).map(Some).ok_or_else(|| {
            let names: Vec<_> = Isa::ALL.iter().map(|i| i.name()).collect();
            format!("KILN_ISA={name} is not a tier ({})", names.join(", "))
        }),
    }
}

/// The tier a CPU backend uses: the best usable one, lowered to the cap. `Err` when the cap
/// is malformed; `Ok(None)` when no tier is usable (no AVX2+FMA).
pub fn selected_isa() -> Result<Option<Isa>, String> {
    let best = features().best();
    Ok(match isa_cap()? {
        Some(cap) => Isa::ALL
            .into_iter()
            .rev()
            .find(|&isa| isa <= cap && features().supports(isa)),
        None => best,
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CpuFeatures {
    use std::arch::x86_64::__cpuid_count;
    // std's detection checks CPUID and, for the AVX families, that XCR0 enables the state.
    let mut f = CpuFeatures {
        avx2: is_x86_feature_detected!("avx2"),
        fma: is_x86_feature_detected!("fma"),
        f16c: is_x86_feature_detected!("f16c"),
        avx512f: is_x86_feature_detected!("avx512f"),
        avx512bw: is_x86_feature_detected!("avx512bw"),
        avx512vl: is_x86_feature_detected!("avx512vl"),
        avx512_bf16: is_x86_feature_detected!("avx512bf16"),
        avx512_fp16: is_x86_feature_detected!("avx512fp16"),
        avx512_vnni: is_x86_feature_detected!("avx512vnni"),
        avx_vnni: is_x86_feature_detected!("avxvnni"),
        ..Default::default()
    };
    // AMX is read by hand: leaf 7 EDX bit 24 (AMX-TILE), 22 (AMX-BF16), 25 (AMX-INT8), and
    // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA).
    // CPUID is safe to execute on x86_64; leaf 7 is read only when leaf 0 says it exists.
    let max_leaf = __cpuid_count(0, 0).eax;
    if max_leaf >= 7 {
        let edx = __cpuid_count(7, 0).edx;
        let tile = edx & (1 << 24) != 0;
        let osxsave = __cpuid_count(1, 0).ecx & (1 << 27) != 0;
        let xcr0 = if osxsave { xgetbv0() } else { 0 };
        let tile_state = xcr0 & (0b11 << 17) == 0b11 << 17;
        f.amx_bf16 = tile && tile_state && edx & (1 << 22) != 0;
        f.amx_int8 = tile && tile_state && edx & (1 << 25) != 0;
        if f.amx_bf16 || f.amx_int8 {
            f.amx_permission = Some(request_amx_permission());
        }
    }
    f
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> CpuFeatures {
    CpuFeatures::default()
}

/// XCR0, the OS-enabled register state (only called when CPUID says OSXSAVE).
#[cfg(target_arch = "x86_64")]
fn xgetbv0() -> u64 {
    let (eax, edx): (u32, u32);
    // SAFETY: XGETBV with ECX=0 is valid whenever CPUID.1:ECX.OSXSAVE is set (checked by the
    // caller); it reads a register and touches no memory.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") eax, out("edx") edx,
            options(nomem, nostack, preserves_flags));
    }
    (edx as u64) << 32 | eax as u64
}

/// Asks Linux for the AMX tile data state; without it the first tile instruction raises
/// SIGILL.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_amx_permission() -> Result<(), String> {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM takes two integers and changes only this
    // process's permitted xsave state.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "arch_prctl(ARCH_REQ_XCOMP_PERM) failed: {}",
            std::io::Error::last_os_error()
        ))
    }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_amx_permission() -> Result<(), String> {
    Err("AMX permission is only requested on Linux".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_are_ordered_and_named_for_the_cap() {
        assert!(Isa::Avx2 < Isa::Avx512 && Isa::Avx512 < Isa::Avx512bf16);
        assert!(Isa::Avx512bf16 < Isa::Amx);
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse("sse2"), None);
    }

    #[test]
    fn a_tier_needs_every_feature_below_it() {
        let mut f = CpuFeatures {
            avx2: true,
            fma: true,
            avx512_bf16: true,
            ..Default::default()
        };
        // bf16 without AVX-512F is not the bf16 tier.
        assert_eq!(f.best(), Some(Isa::Avx2));
        assert!(f.missing(Isa::Avx512bf16).unwrap().contains("AVX512F"));
        f.avx512f = true;
        f.avx512bw = true;
        f.avx512vl = true;
        assert_eq!(f.best(), Some(Isa::Avx512bf16));
        // AMX in CPUID without the OS's permission is not usable.
        f.amx_bf16 = true;
        f.amx_permission = Some(Err("denied".into()));
        assert_eq!(f.best(), Some(Isa::Avx512bf16));
        assert!(f.missing(Isa::Amx).unwrap().contains("denied"));
        f.amx_permission = Some(Ok(()));
        assert_eq!(f.best(), Some(Isa::Amx));
        // AMX with AVX512-BF16 hidden (the tier packs with it) is not usable either.
        f.avx512_bf16 = false;
        assert_eq!(f.best(), Some(Isa::Avx512));
        assert!(f.missing(Isa::Amx).unwrap().contains("AVX512_BF16"));
    }
}
