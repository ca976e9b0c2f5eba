// ---- rope (reference: rope.rs): half-split pairs, cos/sin tables from the host (f64 angles)

extern "C" __global__ void rope(float* out, const float* inp, const float* cos_t,
                                const float* sin_t, i64 rows, i64 seq, i64 heads, i64 head_dim,
                                i64 rot_dims, float direction) {
    i64 half = rot_dims / 2;
    GRID_STRIDE(i, rows * heads * head_dim) {
        i64 d = i % head_dim;
        i64 bt = i / (heads * head_dim);
        i64 base = i - d;
        i64 t = bt % seq;
        if (d >= rot_dims) {
            out[i] = inp[i];
        } else if (d < half) {
            float c = cos_t[t * half + d], s = sin_t[t * half + d] * direction;
            float a = inp[base + d], b = inp[base + d + half];
            out[i] = a * c - b * s;
        } else {
            i64 j = d - half;
            float c = cos_t[t * half + j], s = sin_t[t * half + j] * direction;
            float a = inp[base + j], b = inp[base + d];
            out[i] = b * c + a * s;
        }
    }
}
