use kiln_cpu::gemm::{gemm, Mat, Microkernel, Scratch};
use kiln_cpu::pool::ThreadPool;
use std::time::Instant;
fn main() {
    let pool = ThreadPool::new(2);
    let mut scratch = Scratch::default();
    let (rows, inn, out) = (1024usize, 288usize, 32000usize);
    let dout = vec![0.01f32; rows * out];
    let x = vec![0.02f32; rows * inn];
    let w = vec![0.03f32; out * inn];
    let mut dinp = vec![0f32; rows * inn];
    let mut dw = vec![0f32; out * inn];
    for kernel in [Microkernel::Avx512Bf16, Microkernel::Avx512F32] {
        for _ in 0..3 {
            let t = Instant::now();
            gemm(
                &pool,
                &mut scratch,
                kernel,
                rows,
                inn,
                out,
                Mat {
                    data: &dout,
                    rs: out,
                    cs: 1,
                },
                Mat {
                    data: &w,
                    rs: inn,
                    cs: 1,
                },
                &mut dinp,
                inn,
                false,
            );
            let t1 = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            gemm(
                &pool,
                &mut scratch,
                kernel,
                out,
                inn,
                rows,
                Mat {
                    data: &dout,
                    rs: 1,
                    cs: out,
                },
                Mat {
                    data: &x,
                    rs: inn,
                    cs: 1,
                },
                &mut dw,
                inn,
                true,
            );
            let t2 = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            gemm(
                &pool,
                &mut scratch,
                kernel,
                rows,
                out,
                inn,
                Mat {
                    data: &x,
                    rs: inn,
                    cs: 1,
                },
                Mat {
                    data: &w,
                    rs: 1,
                    cs: inn,
                },
                &mut dout.clone(),
                out,
                false,
            );
            let t3 = t.elapsed().as_secs_f64() * 1e3;
            let g = 2.0 * (rows * inn * out) as f64 / 1e9;
            println!("{kernel:?}: dinp {t1:.1} ms ({:.0} GF/s)  dW {t2:.1} ms ({:.0})  fwd(+clone) {t3:.1}", g / t1 * 1e3, g / t2 * 1e3);
        }
    }
}
