// ---- memory: f32 <-> bf16 (round to nearest even, as the `half` crate) --------------------

extern "C" __global__ void f32_to_bf16(u16* dst, const float* src, i64 n) {
    GRID_STRIDE(i, n) {
        u32 bits = __float_as_uint(src[i]);
        if ((bits & 0x7fffffffu) > 0x7f800000u) {
            dst[i] = (u16)((bits >> 16) | 0x40);  // NaN stays NaN (quiet)
        } else {
            u32 rounding = 0x7fffu + ((bits >> 16) & 1u);
            dst[i] = (u16)((bits + rounding) >> 16);
        }
    }
}

extern "C" __global__ void bf16_to_f32(float* dst, const u16* src, i64 n) {
    GRID_STRIDE(i, n) { dst[i] = __uint_as_float(((u32)src[i]) << 16); }
}
