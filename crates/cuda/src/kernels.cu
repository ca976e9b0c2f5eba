// kiln's CUDA kernels: one translation unit, compiled at start-up by NVRTC (no headers, so
// that it compiles wherever libnvrtc alone is installed). Every kernel computes in f32 and
// matches the reference backend's kernel of the same name (crates/reference/src): the
// conformance suite holds each one to it. Matrix products are not here: they go through
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

#define GRID_STRIDE(i, n) for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

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

// ---- embedding (reference: embed.rs) ---------------------------------------------------------

extern "C" __global__ void embedding_forward(float* out, const float* table, const u32* tokens,
                                             i64 n_tokens, i64 dim) {
    GRID_STRIDE(i, n_tokens * dim) {
        i64 t = i / dim, c = i % dim;
        out[i] = table[(i64)tokens[t] * dim + c];
    }
}

extern "C" __global__ void embedding_backward(float* dtable, const float* dout, const u32* tokens,
                                              i64 n_tokens, i64 dim) {
    GRID_STRIDE(i, n_tokens * dim) {
        i64 t = i / dim, c = i % dim;
        atomicAdd(&dtable[(i64)tokens[t] * dim + c], dout[i]);
    }
}

// ---- rmsnorm (reference: rmsnorm.rs); one block per row ---------------------------------

extern "C" __global__ void rmsnorm_forward(float* out, float* rstd, const float* inp,
                                           const float* weight, i64 dim, float eps) {
    i64 row = blockIdx.x;
    const float* x = inp + row * dim;
    float ss = 0.0f;
    for (i64 c = threadIdx.x; c < dim; c += blockDim.x) ss += x[c] * x[c];
    ss = block_sum(ss);
    float s = 1.0f / sqrtf(ss / (float)dim + eps);
    if (threadIdx.x == 0) rstd[row] = s;
    for (i64 c = threadIdx.x; c < dim; c += blockDim.x) out[row * dim + c] = x[c] * s * weight[c];
}

extern "C" __global__ void rmsnorm_backward(float* dinp, const float* dout, const float* inp,
                                            const float* weight, const float* rstd, i64 dim,
                                            int add) {
    i64 row = blockIdx.x;
    const float* x = inp + row * dim;
    const float* dy = dout + row * dim;
    float s = rstd[row];
    float dot = 0.0f;
    for (i64 c = threadIdx.x; c < dim; c += blockDim.x) dot += dy[c] * weight[c] * x[c] * s;
    float mean = block_sum(dot) / (float)dim;
    for (i64 c = threadIdx.x; c < dim; c += blockDim.x) {
        float g = dy[c] * weight[c] * s - x[c] * s * s * mean;
        if (add) dinp[row * dim + c] += g; else dinp[row * dim + c] = g;
    }
}

// Column sums over a chunk of rows, added into `dst[col / inner]`: the parameter gradients of
// RMSNorm's weight (`rstd` given: Σ dout·x·rstd) and of the learnable scales (`rstd` null:
// Σ dout·x). Grid: x over columns, y over chunks of `rows_per_block` rows.
extern "C" __global__ void column_dot(float* dst, const float* dout, const float* inp,
                                      const float* rstd, i64 rows, i64 cols, i64 inner,
                                      i64 rows_per_block) {
    i64 col = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (col >= cols) return;
    i64 r0 = blockIdx.y * rows_per_block;
    i64 r1 = min(rows, r0 + rows_per_block);
    float acc = 0.0f;
    for (i64 r = r0; r < r1; r++) {
        float v = dout[r * cols + col] * inp[r * cols + col];
        acc += rstd ? v * rstd[r] : v;
    }
    atomicAdd(&dst[col / inner], acc);
}

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

// ---- causal attention, flash-style (reference: attention.rs) ---------------------------------
//
// No (T, T) matrix is stored: the forward keeps each row's logsumexp (`lse`, (B, H, T)) and the
// backward recomputes the probabilities from it, as FlashAttention-2 does. A warp owns a query
// row (forward, dq) or a key row (dk, dv); the other side streams through shared memory a tile of
// TILE rows at a time, each lane taking one row of the tile. Each lane keeps the head dimensions
// d = lane + 32·j of its warp's row (head_dim at most 32·MAXJ).

#define TILE 32
#define ROWS_PER_BLOCK 4
#define MAXJ 4

// Loads rows [start, start + TILE) of one head of a (B, T, heads·D) tensor into `dst`
// (TILE × (D + 1), padded against bank conflicts); rows past `limit` are zero.
__device__ void load_tile(float* dst, const float* src, i64 b, i64 start, i64 limit, i64 seq,
                          i64 heads, i64 h, i64 dim) {
    for (i64 i = threadIdx.x; i < TILE * dim; i += blockDim.x) {
        i64 r = i / dim, d = i % dim;
        i64 t = start + r;
        dst[r * (dim + 1) + d] = t < limit ? src[((b * seq + t) * heads + h) * dim + d] : 0.0f;
    }
}

// grid: (ceil(T / ROWS_PER_BLOCK), B·H); block: 32·ROWS_PER_BLOCK; shared: 2·TILE·(D+1) floats.
extern "C" __global__ void attention_forward(float* out, float* lse, const float* q,
                                             const float* k, const float* v, i64 seq, i64 heads,
                                             i64 kv_heads, i64 dim) {
    extern __shared__ float smem[];
    float* ks = smem;
    float* vs = smem + TILE * (dim + 1);
    i64 bh = blockIdx.y, b = bh / heads, h = bh % heads, kvh = h / (heads / kv_heads);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    i64 t = blockIdx.x * (i64)ROWS_PER_BLOCK + warp;
    i64 last = min(seq, (i64)(blockIdx.x + 1) * ROWS_PER_BLOCK);  // keys the block needs
    float scale = 1.0f / sqrtf((float)dim);
    float qr[MAXJ], acc[MAXJ];
    for (int j = 0; j < MAXJ; j++) {
        i64 d = lane + WARP * j;
        qr[j] = (t < seq && d < dim) ? q[((b * seq + t) * heads + h) * dim + d] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = -INF, l = 0.0f;
    for (i64 start = 0; start < last; start += TILE) {
        __syncthreads();
        load_tile(ks, k, b, start, seq, seq, kv_heads, kvh, dim);
        load_tile(vs, v, b, start, seq, seq, kv_heads, kvh, dim);
        __syncthreads();
        if (t >= seq) continue;
        // Lane u scores key start + u against the warp's query (broadcast through shuffles).
        float s = 0.0f;
        for (int j = 0; j < MAXJ; j++) {
            for (int src = 0; src < WARP; src++) {
                i64 d = src + WARP * j;
                if (d >= dim) break;
                float qd = __shfl_sync(FULL, qr[j], src);
                s += qd * ks[lane * (dim + 1) + d];
            }
        }
        i64 key = start + lane;
        s = key <= t ? s * scale : -INF;
        float m_new = fmaxf(m, warp_max(s));
        float p = key <= t ? expf(s - m_new) : 0.0f;
        float correction = expf(m - m_new);
        l = l * correction + warp_sum(p);
        for (int j = 0; j < MAXJ; j++) acc[j] *= correction;
        for (int u = 0; u < TILE; u++) {
            float pu = __shfl_sync(FULL, p, u);
            if (pu == 0.0f) continue;
            for (int j = 0; j < MAXJ; j++) {
                i64 d = lane + WARP * j;
                if (d < dim) acc[j] += pu * vs[u * (dim + 1) + d];
            }
        }
        m = m_new;
    }
    if (t >= seq) return;
    for (int j = 0; j < MAXJ; j++) {
        i64 d = lane + WARP * j;
        if (d < dim) out[((b * seq + t) * heads + h) * dim + d] = acc[j] / l;
    }
    if (lane == 0) lse[bh * seq + t] = m + logf(l);
}

// dq, and delta = Σ_u p_u·(dout·v_u) (= dout·out) for the dk/dv pass. Same grid as the forward.
extern "C" __global__ void attention_backward_dq(float* dq, float* delta, const float* dout,
                                                 const float* q, const float* k, const float* v,
                                                 const float* lse, i64 seq, i64 heads,
                                                 i64 kv_heads, i64 dim) {
    extern __shared__ float smem[];
    float* ks = smem;
    float* vs = smem + TILE * (dim + 1);
    i64 bh = blockIdx.y, b = bh / heads, h = bh % heads, kvh = h / (heads / kv_heads);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    i64 t = blockIdx.x * (i64)ROWS_PER_BLOCK + warp;
    i64 last = min(seq, (i64)(blockIdx.x + 1) * ROWS_PER_BLOCK);
    float scale = 1.0f / sqrtf((float)dim);
    float qr[MAXJ], dor[MAXJ], acc[MAXJ];
    for (int j = 0; j < MAXJ; j++) {
        i64 d = lane + WARP * j;
        i64 at = ((b * seq + t) * heads + h) * dim + d;
        bool ok = t < seq && d < dim;
        qr[j] = ok ? q[at] : 0.0f;
        dor[j] = ok ? dout[at] : 0.0f;
        acc[j] = 0.0f;
    }
    float row_lse = t < seq ? lse[bh * seq + t] : 0.0f;
    // Two passes over the keys: delta first (it enters every ds), then dq.
    float dsum = 0.0f;
    for (int pass = 0; pass < 2; pass++) {
        for (i64 start = 0; start < last; start += TILE) {
            __syncthreads();
            load_tile(ks, k, b, start, seq, seq, kv_heads, kvh, dim);
            load_tile(vs, v, b, start, seq, seq, kv_heads, kvh, dim);
            __syncthreads();
            if (t >= seq) continue;
            float s = 0.0f, dp = 0.0f;
            for (int j = 0; j < MAXJ; j++) {
                for (int src = 0; src < WARP; src++) {
                    i64 d = src + WARP * j;
                    if (d >= dim) break;
                    s += __shfl_sync(FULL, qr[j], src) * ks[lane * (dim + 1) + d];
                    dp += __shfl_sync(FULL, dor[j], src) * vs[lane * (dim + 1) + d];
                }
            }
            i64 key = start + lane;
            float p = key <= t ? expf(s * scale - row_lse) : 0.0f;
            if (pass == 0) {
                dsum += p * dp;
            } else {
                float ds = p * (dp - dsum) * scale;
                for (int u = 0; u < TILE; u++) {
                    float du = __shfl_sync(FULL, ds, u);
                    if (du == 0.0f) continue;
                    for (int j = 0; j < MAXJ; j++) {
                        i64 d = lane + WARP * j;
                        if (d < dim) acc[j] += du * ks[u * (dim + 1) + d];
                    }
                }
            }
        }
        if (pass == 0) dsum = warp_sum(dsum);
    }
    if (t >= seq) return;
    for (int j = 0; j < MAXJ; j++) {
        i64 d = lane + WARP * j;
        if (d < dim) dq[((b * seq + t) * heads + h) * dim + d] = acc[j];
    }
    if (lane == 0) delta[bh * seq + t] = dsum;
}

// dk and dv: a warp owns key row u of kv head kvh and sums over the group's query heads and
// the queries t >= u. grid: (ceil(T / ROWS_PER_BLOCK), B·Hkv).
extern "C" __global__ void attention_backward_dkdv(float* dk, float* dv, const float* dout,
                                                   const float* q, const float* k,
                                                   const float* v, const float* lse,
                                                   const float* delta, i64 seq, i64 heads,
                                                   i64 kv_heads, i64 dim) {
    extern __shared__ float smem[];
    float* qs = smem;
    float* dos = smem + TILE * (dim + 1);
    __shared__ float lse_s[TILE], delta_s[TILE];
    i64 bk = blockIdx.y, b = bk / kv_heads, kvh = bk % kv_heads;
    i64 group = heads / kv_heads;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    i64 u = blockIdx.x * (i64)ROWS_PER_BLOCK + warp;
    i64 first = blockIdx.x * (i64)ROWS_PER_BLOCK;  // the block's first key: queries before it are masked
    float scale = 1.0f / sqrtf((float)dim);
    float kr[MAXJ], vr[MAXJ], dk_acc[MAXJ], dv_acc[MAXJ];
    for (int j = 0; j < MAXJ; j++) {
        i64 d = lane + WARP * j;
        i64 at = ((b * seq + u) * kv_heads + kvh) * dim + d;
        bool ok = u < seq && d < dim;
        kr[j] = ok ? k[at] : 0.0f;
        vr[j] = ok ? v[at] : 0.0f;
        dk_acc[j] = 0.0f;
        dv_acc[j] = 0.0f;
    }
    for (i64 g = 0; g < group; g++) {
        i64 h = kvh * group + g;
        i64 bh = b * heads + h;
        for (i64 start = first - first % TILE; start < seq; start += TILE) {
            __syncthreads();
            load_tile(qs, q, b, start, seq, seq, heads, h, dim);
            load_tile(dos, dout, b, start, seq, seq, heads, h, dim);
            if (threadIdx.x < TILE) {
                i64 t = start + threadIdx.x;
                lse_s[threadIdx.x] = t < seq ? lse[bh * seq + t] : 0.0f;
                delta_s[threadIdx.x] = t < seq ? delta[bh * seq + t] : 0.0f;
            }
            __syncthreads();
            if (u >= seq) continue;
            // Lane r takes query start + r.
            float s = 0.0f, dp = 0.0f;
            for (int j = 0; j < MAXJ; j++) {
                for (int src = 0; src < WARP; src++) {
                    i64 d = src + WARP * j;
                    if (d >= dim) break;
                    s += __shfl_sync(FULL, kr[j], src) * qs[lane * (dim + 1) + d];
                    dp += __shfl_sync(FULL, vr[j], src) * dos[lane * (dim + 1) + d];
                }
            }
            i64 t = start + lane;
            bool live = t >= u && t < seq;
            float p = live ? expf(s * scale - lse_s[lane]) : 0.0f;
            float ds = live ? p * (dp - delta_s[lane]) * scale : 0.0f;
            for (int r = 0; r < TILE; r++) {
                float pr = __shfl_sync(FULL, p, r);
                float dr = __shfl_sync(FULL, ds, r);
                if (pr == 0.0f && dr == 0.0f) continue;
                for (int j = 0; j < MAXJ; j++) {
                    i64 d = lane + WARP * j;
                    if (d < dim) {
                        dv_acc[j] += pr * dos[r * (dim + 1) + d];
                        dk_acc[j] += dr * qs[r * (dim + 1) + d];
                    }
                }
            }
        }
    }
    if (u >= seq) return;
    for (int j = 0; j < MAXJ; j++) {
        i64 d = lane + WARP * j;
        i64 at = ((b * seq + u) * kv_heads + kvh) * dim + d;
        if (d < dim) {
            dk[at] = dk_acc[j];
            dv[at] = dv_acc[j];
        }
    }
}

// One decoding step against a KV cache: a warp per (b, h), lanes over cached positions.
extern "C" __global__ void attention_decode(float* out, const float* q, const float* k_cache,
                                            const float* v_cache, i64 len, i64 capacity,
                                            i64 heads, i64 kv_heads, i64 dim, i64 count) {
    int lane = threadIdx.x % WARP;
    i64 bh = blockIdx.x * (i64)(blockDim.x / WARP) + threadIdx.x / WARP;
    if (bh >= count) return;
    i64 b = bh / heads, h = bh % heads, kvh = h / (heads / kv_heads);
    i64 row = kv_heads * dim;
    const float* query = q + bh * dim;
    float scale = 1.0f / sqrtf((float)dim);
    float m = -INF, l = 0.0f, acc[MAXJ];
    for (int j = 0; j < MAXJ; j++) acc[j] = 0.0f;
    for (i64 start = 0; start < len; start += WARP) {
        i64 pos = start + lane;
        float s = -INF;
        if (pos < len) {
            const float* key = k_cache + (b * capacity + pos) * row + kvh * dim;
            float dot = 0.0f;
            for (i64 d = 0; d < dim; d++) dot += query[d] * key[d];
            s = dot * scale;
        }
        float m_new = fmaxf(m, warp_max(s));
        float p = pos < len ? expf(s - m_new) : 0.0f;
        float correction = expf(m - m_new);
        l = l * correction + warp_sum(p);
        for (int j = 0; j < MAXJ; j++) acc[j] *= correction;
        for (int r = 0; r < WARP && start + r < len; r++) {
            float pr = __shfl_sync(FULL, p, r);
            const float* val = v_cache + (b * capacity + start + r) * row + kvh * dim;
            for (int j = 0; j < MAXJ; j++) {
                i64 d = lane + WARP * j;
                if (d < dim) acc[j] += pr * val[d];
            }
        }
        m = m_new;
    }
    for (int j = 0; j < MAXJ; j++) {
        i64 d = lane + WARP * j;
        if (d < dim) out[bh * dim + d] = acc[j] / l;
    }
}

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

// ---- cross-entropy (reference: xent.rs); one block per row -----------------------------------

// Row-wise: optional soft cap in place on `logits`, then the logsumexp and the loss.
extern "C" __global__ void cross_entropy_forward(float* losses, float* logsumexp, float* logits,
                                                 const u32* targets, i64 vocab, float cap) {
    i64 row = blockIdx.x;
    float* z = logits + row * vocab;
    float m = -INF;
    for (i64 c = threadIdx.x; c < vocab; c += blockDim.x) {
        if (cap > 0.0f) z[c] = cap * tanhf(z[c] / cap);
        m = fmaxf(m, z[c]);
    }
    m = block_max(m);
    float s = 0.0f;
    for (i64 c = threadIdx.x; c < vocab; c += blockDim.x) s += expf(z[c] - m);
    s = block_sum(s);
    if (threadIdx.x == 0) {
        float lse = m + logf(s);
        logsumexp[row] = lse;
        losses[row] = lse - z[targets[row]];
    }
}

// dlogits = (softmax − onehot)·dloss, through the soft cap's backward when `cap` > 0 (`z` then
// holds the capped logits). `dlogits` may be `z` itself.
extern "C" __global__ void cross_entropy_backward(float* dlogits, const float* z,
                                                  const float* logsumexp, const u32* targets,
                                                  i64 vocab, float dloss, float cap) {
    i64 row = blockIdx.x;
    float lse = logsumexp[row];
    u32 target = targets[row];
    for (i64 c = threadIdx.x; c < vocab; c += blockDim.x) {
        float zc = z[row * vocab + c];
        float d = expf(zc - lse) * dloss;
        if (c == target) d -= dloss;
        if (cap > 0.0f) {
            float t = zc / cap;
            d *= 1.0f - t * t;
        }
        dlogits[row * vocab + c] = d;
    }
}

// ---- optimizer (reference: adamw.rs, muon.rs) ------------------------------------------------

// Σ x² in f64 into `out[0]` (zeroed by the caller).
extern "C" __global__ void sum_squares(double* out, const float* x, i64 n) {
    double acc = 0.0;
    GRID_STRIDE(i, n) acc += (double)x[i] * (double)x[i];
    for (int o = WARP / 2; o > 0; o /= 2) acc += __shfl_xor_sync(FULL, acc, o);
    if (threadIdx.x % WARP == 0) atomicAdd(out, acc);
}

// `step_size` = lr / (1 − β1^t), `bias2_sqrt` = sqrt(1 − β2^t), `decay` = 1 − lr·wd, each
// computed on the host in f32 exactly as the reference does.
extern "C" __global__ void adamw_step(float* params, const float* grads, float* m, float* v,
                                      float lr, float bias1, float bias2_sqrt, float beta1,
                                      float beta2, float eps, float decay, float grad_scale,
                                      i64 n) {
    GRID_STRIDE(i, n) {
        float g = grads[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        params[i] = params[i] * decay - lr / bias1 * mi / (sqrtf(vi) / bias2_sqrt + eps);
    }
}

extern "C" __global__ void ema_update(float* ema, const float* params, float decay, i64 n) {
    GRID_STRIDE(i, n) { ema[i] = decay * ema[i] + (1.0f - decay) * params[i]; }
}

// Muon's momentum: buf = μ·buf + g·scale; update = nesterov ? g·scale + μ·buf : buf.
extern "C" __global__ void muon_momentum(float* update, float* buf, const float* grads, float mu,
                                         float grad_scale, int nesterov, i64 n) {
    GRID_STRIDE(i, n) {
        float g = grads[i] * grad_scale;
        float b = mu * buf[i] + g;
        buf[i] = b;
        update[i] = nesterov ? g + mu * b : b;
    }
}

// MuonEq-R: each row divided by its norm (at least 1e-7). One block per row.
extern "C" __global__ void normalize_rows(float* m, i64 cols) {
    float* row = m + blockIdx.x * cols;
    float ss = 0.0f;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) ss += row[c] * row[c];
    float inv = 1.0f / fmaxf(sqrtf(block_sum(ss)), 1e-7f);
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) row[c] *= inv;
}

// x = g / (‖g‖ + 1e-7), transposed to (cols, rows) when `transposed`; ‖g‖² from `sum_sq`.
extern "C" __global__ void newton_schulz_start(float* x, const float* g, const double* sum_sq,
                                               i64 rows, i64 cols, int transposed) {
    float inv = 1.0f / ((float)sqrt(sum_sq[0]) + 1e-7f);
    GRID_STRIDE(i, rows * cols) {
        i64 r = i / cols, c = i % cols;
        i64 at = transposed ? c * rows + r : i;
        x[at] = g[i] * inv;
    }
}

// params = params·decay − step·x (x transposed back when `transposed`).
extern "C" __global__ void muon_apply(float* params, const float* x, float decay, float step,
                                      i64 rows, i64 cols, int transposed) {
    GRID_STRIDE(i, rows * cols) {
        i64 r = i / cols, c = i % cols;
        i64 at = transposed ? c * rows + r : i;
        params[i] = params[i] * decay - step * x[at];
    }
}

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
