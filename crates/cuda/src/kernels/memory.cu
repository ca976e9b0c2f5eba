// ---- memory: f32 <-> bf16 (round to nearest even, as the `half` crate) --------------------

extern "C" __global__ void f32_to_bf16(u16* dst, const float* src, i64 n) {
    if (((unsigned long long)src & 15) == 0 && ((unsigned long long)dst & 7) == 0) {
        // Four at a time (16-byte loads, 8-byte stores), then the tail.
        i64 quads = n / 4;
        GRID_STRIDE(i, quads) {
            float4 v = ((const float4*)src)[i];
            uint2 out;
            out.x = (u32)bf16_bits(v.x) | ((u32)bf16_bits(v.y) << 16);
            out.y = (u32)bf16_bits(v.z) | ((u32)bf16_bits(v.w) << 16);
            ((uint2*)dst)[i] = out;
        }
        i64 tail = blockIdx.x * (i64)blockDim.x + threadIdx.x;
        if (tail < n - 4 * quads) dst[4 * quads + tail] = bf16_bits(src[4 * quads + tail]);
        return;
    }
    GRID_STRIDE(i, n) { dst[i] = bf16_bits(src[i]); }
}

extern "C" __global__ void bf16_to_f32(float* dst, const u16* src, i64 n) {
    GRID_STRIDE(i, n) { dst[i] = __uint_as_float(((u32)src[i]) << 16); }
}
