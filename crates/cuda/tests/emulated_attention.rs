//! The tensor-core attention kernels (`attention_forward_mma`, `attention_delta_mma`,
//! `attention_backward_mma` in kernels/attention.cu) run on the CPU, lane by lane, in an
//! emulation of the warp-wide instructions they use (tests/emulator/harness.cpp: `mma.sync`,
//! `ldmatrix .trans` and the shuffles from the PTX ISA's fragment layouts), against the
//! reference backend's attention in f64. GPU time is rare; this catches a kernel that indexes
//! its fragments, tiles or masks wrongly on every machine with a C++20 compiler (`CXX`, else
//! `g++`; without one the test says so and passes). The kernels' own source is compiled, with
//! only those instructions swapped for the emulated ones.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_core::backend::AttentionShape;

/// The section of the kernels' source that holds the tensor-core attention, with its
/// warp-wide instructions swapped for the emulator's functions.
fn emulated_source() -> String {
    let source = kiln_cuda::compile::SOURCE;
    let start = source
        .find("// ---- causal attention on the tensor cores")
        .expect("the tensor-core section of kernels/attention.cu");
    let end = start
        + source[start + 8..]
            .find("// ---- ")
            .map_or(source.len() - start, |e| e + 8);
    let mut s = source[start..end].to_string();
    // A device function's whole body, swapped for a call of the emulator's.
    let mut swap = |signature: &str, body: &str| {
        let at = s
            .find(signature)
            .unwrap_or_else(|| panic!("{signature} not in the kernels"));
        let close = at + s[at..].find("\n}\n").expect("a function's end") + 3;
        let head = &s[at..at + s[at..].find('{').unwrap()];
        let head = head.replace("__device__ __forceinline__", "static inline");
        s.replace_range(at..close, &format!("{head}{{ {body} }}\n"));
    };
    swap(
        "__device__ __forceinline__ void mma_bf16(",
        "emu_mma(c, a0, a1, a2, a3, b0, b1);",
    );
    swap(
        "__device__ __forceinline__ u32 pack_bf16(",
        "return emu_pack(lo, hi);",
    );
    swap(
        "__device__ __forceinline__ void ldmatrix_x4_trans(",
        "emu_ldmatrix(r, row);",
    );
    for (from, to) in [
        ("extern \"C\" __global__ void", "void"),
        (
            "extern __shared__ __align__(16) u16 mma_smem[];",
            "u16* mma_smem = (u16*)blk_smem();",
        ),
        ("__device__ __forceinline__", "static inline"),
        ("__device__", "static"),
        ("__shfl_xor_sync(FULL, ", "emu_shfl_xor("),
        ("__syncthreads()", "emu_sync()"),
    ] {
        assert!(s.contains(from), "{from:?} not in the kernels");
        s = s.replace(from, to);
    }
    assert!(
        !s.contains("asm"),
        "an instruction the emulator lacks:\n{s}"
    );
    s
}

/// The kernels' shared helpers the emulated section uses (`bf16_bits`), from common.cuh.
fn common_helpers() -> String {
    let source = kiln_cuda::compile::SOURCE;
    let at = source
        .find("__device__ __forceinline__ u16 bf16_bits(")
        .expect("bf16_bits in kernels/common.cuh");
    let end = at + source[at..].find("\n}\n").expect("its end") + 3;
    source[at..end].replace("__device__ __forceinline__", "static inline")
}

/// The C++ compiler, or why there is none.
fn compiler() -> Result<String, String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    match Command::new(&cxx).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(cxx),
        _ => Err(format!("no C++ compiler ({cxx})")),
    }
}

/// Normal-ish values from a seed (the sum of four uniforms, centred): deterministic inputs.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| ((0..4).map(|_| uniform()).sum::<f64>() - 2.0) as f32 * 1.7)
        .collect()
}

fn write(path: &Path, v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn read(path: &Path) -> Vec<f64> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
        .collect()
}

#[test]
fn tensor_core_attention_emulated_lane_by_lane_matches_the_f64_reference() {
    let cxx = match compiler() {
        Ok(c) => c,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("emulated_attention");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kern.inc"), emulated_source()).unwrap();
    std::fs::write(dir.join("common.inc"), common_helpers()).unwrap();
    let harness = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/emulator/harness.cpp");
    let binary = dir.join("harness");
    let built = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-w", "-I"])
        .arg(&dir)
        .arg(&harness)
        .arg("-o")
        .arg(&binary)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{cxx} failed on the emulated kernels:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    // (batch, seq, heads, kv heads, head dim): past one 64-row block with a partial one, GQA,
    // a head dim that fills MMA_D, one padded to a multiple of 16, and one whose rows are not
    // 16-byte aligned (the loads' scalar path).
    for (i, (batch, seq, heads, kv_heads, head_dim)) in
        [(1, 150, 4, 2, 64), (2, 70, 2, 1, 40), (1, 9, 2, 2, 30)]
            .into_iter()
            .enumerate()
    {
        let s = AttentionShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
        };
        let (nq, nkv) = (
            batch * seq * heads * head_dim,
            batch * seq * kv_heads * head_dim,
        );
        let seed = 100 * i as u64;
        let (q, k, v, dout) = (
            values(nq, seed + 1),
            values(nkv, seed + 2),
            values(nkv, seed + 3),
            values(nq, seed + 4),
        );
        for (name, x) in [("q", &q), ("k", &k), ("v", &v), ("do", &dout)] {
            write(&dir.join(format!("{name}.bin")), x);
        }
        let ran = Command::new(&binary)
            .arg(&dir)
            .args([batch, seq, heads, kv_heads, head_dim].map(|x| x.to_string()))
            .output()
            .unwrap();
        assert!(
            ran.status.success(),
            "the emulated kernels failed at {s:?}:\n{}",
            String::from_utf8_lossy(&ran.stderr)
        );
        let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let (q64, k64, v64, do64) = (f64s(&q), f64s(&k), f64s(&v), f64s(&dout));
        let mut out = vec![0.0; nq];
        let mut probs = vec![0.0; batch * heads * seq * seq];
        kiln_reference::attention::attention_forward(&mut out, &mut probs, &q64, &k64, &v64, s);
        let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nkv], vec![0.0; nkv]);
        kiln_reference::attention::attention_backward(
            &mut dq, &mut dk, &mut dv, &do64, &q64, &k64, &v64, &probs, s,
        );
        // bf16 operands (q, k, v, the probabilities, dO, dS rounded to 2⁻⁹ relative) summed
        // in f32: the CUDA backend's attention tolerance, as its conformance cases use.
        let (atol, rtol) = (2e-2, 2e-2);
        for (name, want) in [("out", &out), ("dq", &dq), ("dk", &dk), ("dv", &dv)] {
            let got = read(&dir.join(format!("{name}.bin")));
            assert_eq!(got.len(), want.len());
            let (mut worst, mut nmse_num, mut nmse_den) = (0.0f64, 0.0, 0.0);
            for (j, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
                let excess = (g - w).abs() - (atol + rtol * w.abs());
                assert!(
                    excess <= 0.0,
                    "{name}[{j}] at {s:?}: emulated {g}, reference {w}"
                );
                worst = worst.max((g - w).abs());
                nmse_num += (g - w) * (g - w);
                nmse_den += w * w;
            }
            println!(
                "{s:?} {name}: largest difference {worst:.2e}, normalized squared error {:.1e}",
                nmse_num / nmse_den
            );
        }
    }
}
