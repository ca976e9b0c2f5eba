// ---- quantization-aware training's round trips (reference: kiln_core::quant::round_trip) --------
//
// Bit for bit the host's arithmetic, so QAT's weights on the GPU equal the export's: f16
// scales rounded to nearest even (by hand, no headers), group sums in the host's order (one
// thread per ternary group, sequentially), the row percentile an exact selection, and the
// code `(float)(signed char)clamp(roundf(w / s), -m, m) * s` (roundf: half away from zero,
// as Rust's `round`; the division IEEE-exact under NVRTC's default --prec-div).

// The nearest f16 value of `x` (ties to even), as an f32; beyond f16's range ±inf.
__device__ float f16_round(float x) {
    float a = fabsf(x);
    if (!(a == a)) return x;                       // NaN
    if (a >= 65520.0f) return x > 0.0f ? INF : -INF;  // rounds past 65504
    float q;
    if (a < 6.103515625e-05f) {                    // subnormal: steps of 2^-24
        q = rintf(a * 16777216.0f) * 5.9604644775390625e-08f;
    } else {
        int e = (int)((__float_as_uint(a) >> 23) & 0xff) - 127;
        float step = ldexpf(1.0f, e - 10);
        q = rintf(a / step) * step;
    }
    return x < 0.0f ? -q : q;
}

__device__ __forceinline__ float coded(float w, float s, float m) {
    if (!(s > 0.0f)) return 0.0f;
    float r = roundf(w / s);
    if (!(r == r)) r = 0.0f;  // NaN: Rust's `as i8` gives 0
    r = fminf(fmaxf(r, -m), m);
    return (float)(signed char)r * s;
}

extern "C" __global__ void f16_round_trip(float* dst, const float* src, i64 n) {
    GRID_STRIDE(i, n) { dst[i] = f16_round(src[i]); }
}

// One thread per group of `group` values (the last may be shorter).
extern "C" __global__ void ternary_round_trip(float* dst, const float* src, i64 n, i64 group) {
    i64 groups = (n + group - 1) / group;
    GRID_STRIDE(gi, groups) {
        i64 start = gi * group, end = min(n, start + group);
        float sum = 0.0f;
        for (i64 i = start; i < end; i++) sum += fabsf(src[i]);
        float s = f16_round(sum / (float)(end - start));
        for (i64 i = start; i < end; i++) dst[i] = coded(src[i], s, 1.0f);
    }
}

// One block per row of `cols`: |w|'s `index`-th smallest value (by bit pattern: for values
// without sign, their order) found by bisection on the bits, then the row's codes.
extern "C" __global__ void int_round_trip(float* dst, const float* src, i64 cols, i64 index,
                                          float m) {
    const float* row = src + blockIdx.x * cols;
    float* out = dst + blockIdx.x * cols;
    u32 lo = 0, hi = 0xffffffffu;  // the answer's bits lie in [lo, hi]
    while (lo < hi) {
        u32 mid = lo + (hi - lo) / 2;
        float below = 0.0f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x)
            below += (__float_as_uint(fabsf(row[c])) <= mid) ? 1.0f : 0.0f;
        below = block_sum(below);
        if (below >= (float)(index + 1)) hi = mid; else lo = mid + 1;
    }
    float s = f16_round(__uint_as_float(lo) / m);
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) out[c] = coded(row[c], s, m);
}

// In place, one block per chunk of `block` values (a power of two, at most 1024): the fast
// Walsh–Hadamard transform in the host's butterfly order, then × `norm` (1/√block, from the
// host). Reference: kiln_core::quant::hadamard_rows.
extern "C" __global__ void hadamard_blocks(float* x, i64 block, float norm) {
    extern __shared__ float v[];
    float* chunk = x + blockIdx.x * block;
    for (i64 i = threadIdx.x; i < block; i += blockDim.x) v[i] = chunk[i];
    __syncthreads();
    for (i64 h = 1; h < block; h *= 2) {
        for (i64 t = threadIdx.x; t < block / 2; t += blockDim.x) {
            i64 i = (t / h) * 2 * h + t % h;
            float a = v[i], b = v[i + h];
            v[i] = a + b;
            v[i + h] = a - b;
        }
        __syncthreads();
    }
    for (i64 i = threadIdx.x; i < block; i += blockDim.x) chunk[i] = v[i] * norm;
}
