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

// ---- causal attention through batched GEMMs (attention.rs, AttentionPath::Gemm) ---------------
//
// One head at a time, the (T, T) scores of every sequence come from a strided batch of cuBLASLt
// products on the tensor cores (S = Q·Kᵀ, O = P·V; backward dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K,
// dK = dSᵀ·Q); these kernels turn S into the probabilities P and P with dP into dS, in place
// in the (B, T, T) buffers. The same arithmetic as the flash kernels above (reference:
// attention.rs), with the products' rounding.

// P = softmax over the keys s ≤ t of scale·S (0 past t), in place; lse[(b·H + h)·T + t] the
// row's logsumexp, as the flash forward saves it. A warp per row (b, t).
extern "C" __global__ void causal_softmax(float* p, float* lse, i64 batch, i64 seq, i64 heads,
                                          i64 h, float scale) {
    i64 row = blockIdx.x * (i64)(blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= batch * seq) return;
    i64 b = row / seq, t = row % seq;
    float* r = p + row * seq;
    float m = -INF;
    for (i64 s = lane; s <= t; s += WARP) m = fmaxf(m, r[s] * scale);
    m = warp_max(m);
    float l = 0.0f;
    for (i64 s = lane; s <= t; s += WARP) l += expf(r[s] * scale - m);
    l = warp_sum(l);
    float inv = 1.0f / l;
    for (i64 s = lane; s < seq; s += WARP) r[s] = s <= t ? expf(r[s] * scale - m) * inv : 0.0f;
    if (lane == 0) lse[(b * heads + h) * seq + t] = m + logf(l);
}

// P from S and the forward's logsumexp, in place: exp(scale·S − lse) for s ≤ t, else 0.
// A warp per row (b, t).
extern "C" __global__ void causal_probabilities(float* p, const float* lse, i64 batch, i64 seq,
                                                i64 heads, i64 h, float scale) {
    i64 row = blockIdx.x * (i64)(blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= batch * seq) return;
    i64 b = row / seq, t = row % seq;
    float* r = p + row * seq;
    float m = lse[(b * heads + h) * seq + t];
    for (i64 s = lane; s < seq; s += WARP) r[s] = s <= t ? expf(r[s] * scale - m) : 0.0f;
}

// dS = P ⊙ (dP − Σ_s P·dP) per row, in place over dP (the softmax's backward; 0 where P is).
// A warp per row.
extern "C" __global__ void softmax_rows_backward(float* dp, const float* p, i64 rows, i64 seq) {
    i64 row = blockIdx.x * (i64)(blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    float* d = dp + row * seq;
    const float* r = p + row * seq;
    float dot = 0.0f;
    for (i64 s = lane; s < seq; s += WARP) dot += r[s] * d[s];
    dot = warp_sum(dot);
    for (i64 s = lane; s < seq; s += WARP) d[s] = r[s] * (d[s] - dot);
}
