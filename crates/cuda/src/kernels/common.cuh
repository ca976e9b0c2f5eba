// kiln's CUDA kernels, one file per kernel family (kernels/*.cu) after these shared helpers,
// concatenated into one translation unit (compile.rs) and compiled at start-up by NVRTC (no
// headers, so that it compiles wherever libnvrtc alone is installed). Every kernel computes
// in f32 and matches the reference backend's kernel of the same name (crates/reference/src):
// the conformance suite holds each one to it. Matrix products are not here: they go through
// cuBLASLt (src/gemm.rs).
//
// Conventions: row-major; `n` counts elements; `add` selects `+=` over `=` (the trait's
// Accumulate); reductions use warp shuffles, then shared memory across a block's warps.

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;

#define WARP 32
#define FULL 0xffffffffu
#define INF __int_as_float(0x7f800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    v = warp_sum(v);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x / WARP) ? part[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

__device__ float block_max(float v) {
    __shared__ float part[32];
    __shared__ float total;
    v = warp_max(v);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x / WARP) ? part[lane] : -INF;
        s = warp_max(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

// f32 to bf16 bits, rounded to nearest even (as the `half` crate); NaN stays a quiet NaN.
__device__ __forceinline__ u16 bf16_bits(float x) {
    u32 bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (u16)((bits >> 16) | 0x40);
    u32 rounding = 0x7fffu + ((bits >> 16) & 1u);
    return (u16)((bits + rounding) >> 16);
}

#define GRID_STRIDE(i, n) for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)
