//! Quantization-aware training's round trips on the device (kernels/quant.cu).

use cudarc::driver::sys::CUdeviceptr;
use kiln_core::backend::FakeQuant;

use super::{Arg::*, CudaBackend, THREADS, V};

impl CudaBackend {
    pub(crate) fn fake_quantize_on_device(
        &self,
        dst: V,
        src: V,
        q: FakeQuant,
        rotation: Option<usize>,
    ) {
        // On the device, bit for bit the export's arithmetic (kernels/quant.cu says how).
        assert_eq!(dst.len(), src.len(), "fake_quantize: lengths");
        assert!(
            !dst.overlaps(&src),
            "fake_quantize: {dst:?} overlaps {src:?}"
        );
        let n = src.len();
        if n == 0 {
            return;
        }
        let (out, Ptr(mut input)) = (self.f(dst), self.f(src)) else {
            unreachable!()
        };
        if let Some(block) = rotation {
            let rotated = self.scratch("qat_rotated", n * 4);
            self.copy_raw(rotated, input, n);
            self.hadamard(rotated, n, block);
            input = rotated;
        }
        match q {
            FakeQuant::F16 => {
                self.elementwise("f16_round_trip", n, &[out, Ptr(input), Int(n as i64)])
            }
            FakeQuant::Ternary { group } => {
                let args = [out, Ptr(input), Int(n as i64), Int(group as i64)];
                self.elementwise("ternary_round_trip", n.div_ceil(group), &args);
            }
            FakeQuant::Int {
                bits,
                percentile,
                cols,
            } => {
                assert!(
                    n.is_multiple_of(cols),
                    "fake_quantize: {n} values in rows of {cols}"
                );
                // The host's nearest rank (kiln_core::quant::abs_percentile), in f32 as there.
                let rank = ((percentile / 100.0) * cols as f32).ceil() as usize;
                let index = rank.clamp(1, cols) - 1;
                let m = ((1i32 << (bits - 1)) - 1) as f32;
                let args = [
                    out,
                    Ptr(input),
                    Int(cols as i64),
                    Int(index as i64),
                    Float(m),
                ];
                self.launch(
                    "int_round_trip",
                    ((n / cols) as u32, 1, 1),
                    THREADS,
                    0,
                    &args,
                );
            }
        }
        if let (Some(block), Ptr(out)) = (rotation, out) {
            self.hadamard(out, n, block);
        }
    }

    /// The block Hadamard rotation of `n` values at `x`, in place (kiln_core::quant::hadamard_rows).
    fn hadamard(&self, x: CUdeviceptr, n: usize, block: usize) {
        assert!(
            block.is_power_of_two() && block <= 1024 && n.is_multiple_of(block),
            "hadamard block {block} for {n} values"
        );
        let norm = 1.0 / (block as f32).sqrt();
        let shared = (block * 4) as u32;
        let args = [Ptr(x), Int(block as i64), Float(norm)];
        self.launch(
            "hadamard_blocks",
            ((n / block) as u32, 1, 1),
            128,
            shared,
            &args,
        );
    }
}
