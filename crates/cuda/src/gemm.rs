//! Row-major matrix products through cuBLASLt: f32 in and out, multiplied in bf16 or f16 with
//! f32 accumulation (`CUBLAS_COMPUTE_32F_FAST_16BF` / `_16F`: the library rounds the f32
//! operands on the tensor cores' way in, as PyTorch's autocast rounds its inputs). Each
//! shape's descriptors and the heuristic's algorithm are made once and kept.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::{result, sys};
use cudarc::driver::sys::CUdeviceptr;

/// One product's shape (row-major): `c (m, n) = alpha · op(a) (m, k) · op(b) (k, n) + beta · c`,
/// `op` transposing where `ta`/`tb` say; `lda`, `ldb`, `ldc` are the stored row strides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub ta: bool,
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

/// A strided batch of products of one shape: product i reads `a + i·stride_a`, `b + i·stride_b`
/// and writes `c + i·stride_c` (strides in f32 elements).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Batch {
    pub count: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl Batch {
    /// One product.
    pub const ONE: Batch = Batch {
        count: 1,
        stride_a: 0,
        stride_b: 0,
        stride_c: 0,
    };
}

/// What the tensor cores multiply in (accumulation is f32 either way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Products {
    #[default]
    Bf16,
    /// More mantissa (10 bits against 7), less range: training scales its loss.
    F16,
}

/// How the operands `a` and `b` are stored (`c` is f32 either way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Operands {
    /// f32, rounded by cuBLASLt on the way into the tensor cores (`_FAST_16BF`/`_16F`).
    F32,
    /// bf16 already (the caller rounded them), multiplied with plain f32 accumulation
    /// (`CUBLAS_COMPUTE_32F`); with [`Products::Bf16`] only. The backend's default: cuBLASLt's
    /// products on bf16 operands ran 2–4× faster than on f32 ones at stories110m's shapes on
    /// an H200, rounding included.
    #[default]
    Bf16,
}

impl Operands {
    fn bytes(self) -> u64 {
        match self {
            Operands::F32 => 4,
            Operands::Bf16 => 2,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    shape: GemmShape,
    batch: Batch,
    products: Products,
    operands: Operands,
    /// The pointers' common alignment in bytes (4 to 16): the heuristic must not pick an
    /// algorithm that assumes more than the arena's views give.
    align: u32,
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// A cuBLASLt handle with its workspace and plans.
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: CUdeviceptr,
    workspace_bytes: usize,
    plans: Mutex<HashMap<Key, Plan>>,
}

// SAFETY: the handle and plans are used under the plans' mutex or read-only, and every call
// goes to the one legacy stream; cuBLASLt handles may be used from any thread.
unsafe impl Send for Gemm {}
unsafe impl Sync for Gemm {}

const WORKSPACE: usize = 32 << 20;

fn err(what: &str, e: impl std::fmt::Debug) -> String {
    format!("cuBLASLt {what}: {e:?}")
}

impl Gemm {
    pub fn new() -> Result<Self, String> {
        let handle = result::create_handle().map_err(|e| err("create", e))?;
        // SAFETY: a plain device allocation, freed in Drop.
        let workspace = unsafe { cudarc::driver::result::malloc_sync(WORKSPACE) }
            .map_err(|e| err("workspace", e))?;
        Ok(Gemm {
            handle,
            workspace,
            workspace_bytes: WORKSPACE,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// Runs one product (see [`GemmShape`]) on the legacy default stream.
    ///
    /// # Safety
    /// The pointers must address f32 matrices of the shape's extents on this context's device,
    /// `c` not overlapping `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        s: GemmShape,
        products: Products,
        alpha: f32,
        a: CUdeviceptr,
        b: CUdeviceptr,
        beta: f32,
        c: CUdeviceptr,
    ) -> Result<(), String> {
        // SAFETY: as this function's.
        unsafe {
            self.run_batched(
                s,
                Batch::ONE,
                (products, Operands::F32),
                alpha,
                (a, b),
                beta,
                c,
            )
        }
    }

    /// Runs a strided batch of products of one shape ([`Batch`]), its operands stored as
    /// `operands` says (strides and leading dimensions count their elements).
    ///
    /// # Safety
    /// As [`Gemm::run`], for every product of the batch; no `c` overlaps another's; with
    /// [`Operands::Bf16`], `a` and `b` address bf16 matrices.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_batched(
        &self,
        s: GemmShape,
        batch: Batch,
        (products, operands): (Products, Operands),
        alpha: f32,
        (a, b): (CUdeviceptr, CUdeviceptr),
        beta: f32,
        c: CUdeviceptr,
    ) -> Result<(), String> {
        if s.m == 0 || s.n == 0 || batch.count == 0 {
            return Ok(());
        }
        // Every product's pointers: the bases and, past the first, the strides in bytes.
        assert!(
            operands == Operands::F32 || products == Products::Bf16,
            "bf16 operands multiply in bf16"
        );
        let size = operands.bytes();
        let strides = [
            size * batch.stride_a as u64,
            size * batch.stride_b as u64,
            4 * batch.stride_c as u64,
        ];
        let strides = strides.map(|e| if batch.count > 1 { e } else { 0 });
        let align = [a, b, c]
            .into_iter()
            .chain(strides.into_iter().filter(|&e| e > 0))
            .map(|p| 1u32 << p.trailing_zeros().min(4))
            .min()
            .unwrap();
        let key = Key {
            shape: s,
            batch,
            products,
            operands,
            align,
        };
        let mut plans = self.plans.lock().unwrap();
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(key)?),
        };
        // Row-major c = op(a)·op(b) is column-major cᵀ = op(b)ᵀ·op(a)ᵀ: b's memory is the
        // column-major left operand, a's the right.
        result::matmul(
            self.handle,
            plan.desc,
            (&alpha) as *const f32 as *const c_void,
            (&beta) as *const f32 as *const c_void,
            b as *const c_void,
            plan.a,
            a as *const c_void,
            plan.b,
            c as *const c_void,
            plan.c,
            c as *mut c_void,
            plan.c,
            &plan.algo,
            self.workspace as *mut c_void,
            self.workspace_bytes,
            std::ptr::null_mut(),
        )
        .map_err(|e| err(&format!("matmul {s:?}"), e))
    }

    fn plan(&self, key: Key) -> Result<Plan, String> {
        let s = key.shape;
        let f32_type = sys::cudaDataType_t::CUDA_R_32F;
        let (compute, operand_type) = match (key.products, key.operands) {
            (Products::Bf16, Operands::F32) => (
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
                f32_type,
            ),
            (Products::F16, _) => (
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16F,
                f32_type,
            ),
            (Products::Bf16, Operands::Bf16) => (
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_16BF,
            ),
        };
        let desc =
            result::create_matmul_desc(compute, f32_type).map_err(|e| err("descriptor", e))?;
        // Column-major view: left operand = b's memory (n × k after op), right = a's (k × m).
        let set_op = |attr, transpose: bool| {
            // cublasOperation_t: 0 = N, 1 = T.
            let op = transpose as i32;
            // SAFETY: the descriptor is live; the attribute takes a cublasOperation_t (an i32).
            unsafe {
                result::set_matmul_desc_attribute(
                    desc,
                    attr,
                    (&op) as *const _ as *const c_void,
                    std::mem::size_of_val(&op),
                )
            }
            .map_err(|e| err("transpose", e))
        };
        set_op(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            s.tb,
        )?;
        set_op(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            s.ta,
        )?;
        // A stored row-major (r, c) with stride ld is column-major (c, r) with the same ld.
        let layout = |kind, rows: usize, cols: usize, ld: usize| {
            result::create_matrix_layout(kind, rows as u64, cols as u64, ld as i64)
                .map_err(|e| err("layout", e))
        };
        // b: op(b) is (k, n) row-major; stored (k, n) (no transpose) or (n, k).
        let (b_rows, b_cols) = if s.tb { (s.n, s.k) } else { (s.k, s.n) };
        let (a_rows, a_cols) = if s.ta { (s.k, s.m) } else { (s.m, s.k) };
        let left = layout(operand_type, b_cols, b_rows, s.ldb)?;
        let right = layout(operand_type, a_cols, a_rows, s.lda)?;
        let out = layout(f32_type, s.n, s.m, s.ldc)?;
        if key.batch.count > 1 {
            let batch = key.batch;
            use sys::cublasLtMatrixLayoutAttribute_t as L;
            for (layout, stride) in [
                (left, batch.stride_b),
                (right, batch.stride_a),
                (out, batch.stride_c),
            ] {
                let (count, stride) = (batch.count as i32, stride as i64);
                // SAFETY: the layout is live; the count is an i32, the offset an i64.
                unsafe {
                    result::set_matrix_layout_attribute(
                        layout,
                        L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        (&count) as *const i32 as *const c_void,
                        4,
                    )
                    .and_then(|()| {
                        result::set_matrix_layout_attribute(
                            layout,
                            L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                            (&stride) as *const i64 as *const c_void,
                            8,
                        )
                    })
                }
                .map_err(|e| err("batch", e))?;
            }
        }
        let pref = result::create_matmul_pref().map_err(|e| err("preference", e))?;
        let set_pref = |attr, value: u64| {
            // SAFETY: the preference is live; these attributes take a u64 (workspace) or u32.
            unsafe {
                if attr == sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES {
                    result::set_matmul_pref_attribute(pref, attr, (&value) as *const u64 as *const c_void, 8)
                } else {
                    let v = value as u32;
                    result::set_matmul_pref_attribute(pref, attr, (&v) as *const u32 as *const c_void, 4)
                }
            }
            .map_err(|e| err("preference", e))
        };
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        set_pref(
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            self.workspace_bytes as u64,
        )?;
        for attr in [
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ] {
            set_pref(attr, key.align as u64)?;
        }
        // SAFETY: all descriptors are live.
        let heuristic = unsafe {
            result::get_matmul_algo_heuristic(self.handle, desc, left, right, out, out, pref)
        }
        .map_err(|e| {
            err(
                &format!("no algorithm for {s:?} at {}-byte alignment", key.align),
                e,
            )
        });
        // SAFETY: made above, no longer needed.
        unsafe {
            let _ = result::destroy_matmul_pref(pref);
        }
        Ok(Plan {
            desc,
            a: left,
            b: right,
            c: out,
            algo: heuristic?.algo,
        })
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        // SAFETY: everything here was created by this value and is destroyed once.
        unsafe {
            for plan in self.plans.get_mut().unwrap().values() {
                let _ = result::destroy_matrix_layout(plan.a);
                let _ = result::destroy_matrix_layout(plan.b);
                let _ = result::destroy_matrix_layout(plan.c);
                let _ = result::destroy_matmul_desc(plan.desc);
            }
            let _ = cudarc::driver::result::free_sync(self.workspace);
            let _ = result::destroy_handle(self.handle);
        }
    }
}
