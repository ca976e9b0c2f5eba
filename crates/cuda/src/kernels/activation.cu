// ---- element-wise (reference: swiglu.rs, activation.rs) --------------------------------------

extern "C" __global__ void swiglu_forward(float* out, const float* gate, const float* up, i64 n) {
    GRID_STRIDE(i, n) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

extern "C" __global__ void swiglu_backward(float* dgate, float* dup, const float* dout,
                                           const float* gate, const float* up, i64 n) {
    GRID_STRIDE(i, n) {
        float g = gate[i], sig = 1.0f / (1.0f + expf(-g));
        float silu = g * sig;
        dgate[i] = dout[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
        dup[i] = dout[i] * silu;
    }
}

extern "C" __global__ void relu2_forward(float* out, const float* inp, float slope, i64 n) {
    GRID_STRIDE(i, n) {
        float x = inp[i], r = x > 0.0f ? x : slope * x;
        out[i] = r * r;
    }
}

extern "C" __global__ void relu2_backward(float* dinp, const float* dout, const float* inp,
                                          float slope, i64 n) {
    GRID_STRIDE(i, n) {
        float x = inp[i];
        dinp[i] = x > 0.0f ? dout[i] * 2.0f * x : dout[i] * 2.0f * slope * slope * x;
    }
}

extern "C" __global__ void softcap_forward(float* out, const float* inp, float cap, i64 n) {
    GRID_STRIDE(i, n) { out[i] = cap * tanhf(inp[i] / cap); }
}

extern "C" __global__ void softcap_backward(float* dinp, const float* dout, const float* out,
                                            float cap, i64 n) {
    GRID_STRIDE(i, n) {
        float t = out[i] / cap;
        dinp[i] = dout[i] * (1.0f - t * t);
    }
}

extern "C" __global__ void residual_forward(float* out, const float* a, const float* b, i64 n) {
    GRID_STRIDE(i, n) { out[i] = a[i] + b[i]; }
}

extern "C" __global__ void accumulate(float* out, const float* inp, i64 n) {
    GRID_STRIDE(i, n) { out[i] += inp[i]; }
}

// EngramHash's gate: a warp per row.
extern "C" __global__ void gate_forward(float* out, const float* a, const float* b, i64 rows,
                                        i64 dim, float scale) {
    i64 row = blockIdx.x * (i64)(blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    float dot = 0.0f;
    for (i64 c = lane; c < dim; c += WARP) dot += a[row * dim + c] * b[row * dim + c];
    dot = warp_sum(dot);
    if (lane == 0) out[row] = 1.0f / (1.0f + expf(-(dot * scale)));
}

extern "C" __global__ void gate_backward(float* da, float* db, const float* dout,
                                         const float* out, const float* a, const float* b,
                                         i64 rows, i64 dim, float scale) {
    GRID_STRIDE(i, rows * dim) {
        i64 row = i / dim;
        float g = out[row];
        float ds = dout[row] * g * (1.0f - g) * scale;
        da[i] = ds * b[i];
        db[i] = ds * a[i];
    }
}

// Exclusive self attention (reference: xsa.rs): a warp per (row, kv head).
extern "C" __global__ void xsa_forward(float* out, const float* y, const float* v, i64 rows,
                                       i64 heads, i64 kv_heads, i64 dim) {
    i64 task = blockIdx.x * (i64)(blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (task >= rows * kv_heads) return;
    i64 row = task / kv_heads, kvh = task % kv_heads, group = heads / kv_heads;
    const float* vr = v + (row * kv_heads + kvh) * dim;
    float nn = 0.0f;
    for (i64 d = lane; d < dim; d += WARP) nn += vr[d] * vr[d];
    float norm = sqrtf(warp_sum(nn));
    float inv = 1.0f / fmaxf(norm, 1e-12f);
    for (i64 h = kvh * group; h < (kvh + 1) * group; h++) {
        const float* yh = y + (row * heads + h) * dim;
        float p = 0.0f;
        for (i64 d = lane; d < dim; d += WARP) p += yh[d] * vr[d] * inv;
        p = warp_sum(p);
        for (i64 d = lane; d < dim; d += WARP) out[(row * heads + h) * dim + d] = yh[d] - p * vr[d] * inv;
    }
}

extern "C" __global__ void xsa_backward(float* dy, float* dv, const float* dz, const float* y,
                                        const float* v, i64 rows, i64 heads, i64 kv_heads,
                                        i64 dim) {
    i64 task = blockIdx.x * (i64)(blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (task >= rows * kv_heads) return;
    i64 row = task / kv_heads, kvh = task % kv_heads, group = heads / kv_heads;
    const float* vr = v + (row * kv_heads + kvh) * dim;
    float nn = 0.0f;
    for (i64 d = lane; d < dim; d += WARP) nn += vr[d] * vr[d];
    float norm = sqrtf(warp_sum(nn));
    float inv = 1.0f / fmaxf(norm, 1e-12f);
    float active = norm > 1e-12f ? inv : 0.0f;
    float g[MAXJ];
    for (int j = 0; j < MAXJ; j++) g[j] = 0.0f;
    for (i64 h = kvh * group; h < (kvh + 1) * group; h++) {
        const float* yh = y + (row * heads + h) * dim;
        const float* dzh = dz + (row * heads + h) * dim;
        float p = 0.0f, qq = 0.0f;
        for (i64 d = lane; d < dim; d += WARP) {
            p += yh[d] * vr[d] * inv;
            qq += dzh[d] * vr[d] * inv;
        }
        p = warp_sum(p);
        qq = warp_sum(qq);
        for (int j = 0; j < MAXJ; j++) {
            i64 d = lane + WARP * j;
            if (d < dim) {
                dy[(row * heads + h) * dim + d] = dzh[d] - qq * vr[d] * inv;
                g[j] -= qq * yh[d] + p * dzh[d];
            }
        }
    }
    float r = 0.0f;
    for (int j = 0; j < MAXJ; j++) {
        i64 d = lane + WARP * j;
        if (d < dim) r += g[j] * vr[d] * inv;
    }
    r = warp_sum(r);
    for (int j = 0; j < MAXJ; j++) {
        i64 d = lane + WARP * j;
        if (d < dim) dv[(row * kv_heads + kvh) * dim + d] = (g[j] - r * vr[d] * inv) * active;
    }
}

// ---- learnable scales (reference: scale.rs) -------------------------------------------------

extern "C" __global__ void scale_forward(float* out, const float* inp, const float* s,
                                         i64 groups, i64 inner, i64 n, int add) {
    GRID_STRIDE(i, n) {
        float v = inp[i] * s[(i / inner) % groups];
        if (add) out[i] += v; else out[i] = v;
    }
}
