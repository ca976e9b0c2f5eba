// ---- rope (reference: rope.rs): half-split pairs, cos/sin tables from the host (f64 angles)

// A thread per (row, head, j) with j < head_dim − rot_dims/2: j < half rotates the pair
// (j, j + half), a larger j copies dimension j + half (past rot_dims) unchanged. Indices in
// 32 bits where they fit (the divisions are most of the work).
template <typename I>
__device__ __forceinline__ void rope_at(float* out, const float* inp, const float* cos_t,
                                        const float* sin_t, I i, I seq, I heads, I head_dim,
                                        I half, float direction) {
    I per = head_dim - half;
    I j = i % per, rh = i / per;
    I t = (rh / heads) % seq;
    I base = rh * head_dim;
    if (j < half) {
        float c = cos_t[t * half + j], s = sin_t[t * half + j] * direction;
        float a = inp[base + j], b = inp[base + j + half];
        out[base + j] = a * c - b * s;
        out[base + j + half] = b * c + a * s;
    } else {
        out[base + j + half] = inp[base + j + half];
    }
}

extern "C" __global__ void rope(float* out, const float* inp, const float* cos_t,
                                const float* sin_t, i64 rows, i64 seq, i64 heads, i64 head_dim,
                                i64 rot_dims, float direction) {
    i64 half = rot_dims / 2;
    i64 n = rows * heads * (head_dim - half);
    if (n < (1ll << 31) && rows * heads * head_dim < (1ll << 31)) {
        GRID_STRIDE(i, n) {
            rope_at<int>(out, inp, cos_t, sin_t, (int)i, (int)seq, (int)heads, (int)head_dim,
                         (int)half, direction);
        }
    } else {
        GRID_STRIDE(i, n) {
            rope_at<i64>(out, inp, cos_t, sin_t, i, seq, heads, head_dim, half, direction);
        }
    }
}
