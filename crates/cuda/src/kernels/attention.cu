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

// ---- causal attention on the tensor cores (attention.rs, AttentionPath::Mma) -----------------
//
// FlashAttention-2's blocking (Dao, 2023: "FlashAttention-2", Algorithms 1 and 2) with
// `mma.sync.m16n8k16` bf16 products accumulated in f32 (the PTX ISA's fragment layouts for
// that shape): Q, K, V, dO, the probabilities and dS are rounded to bf16 on their way into a
// product, everything else is f32. Head dims up to MMA_D (padded to a multiple of 16 with
// zeros); the forward saves each row's logsumexp and a copy of O, from which the backward's
// delta = rowsum(dO ⊙ O) comes. A block is 4 warps and 64 rows (queries in the forward, keys in
// the backward), each warp 16 of them; the other side streams through shared memory 64 rows at
// a time.

#define MMA_ROWS 64
#define MMA_D 64
#define MMA_LD (MMA_D + 8)  // shared rows in bf16 elements, padded against bank conflicts

// c (16×8, f32) += a (16×16, bf16, row-major) · b (16×8, bf16, column-major).
__device__ __forceinline__ void mma_bf16(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                         u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two values as a bf16 pair, each rounded to nearest even, the first in the low half (the
// fragments' column order): one `cvt.rn.bf16x2.f32` (its first source goes to the high half).
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Four 8×8 bf16 matrices of shared memory, transposed (`ldmatrix .x4 .trans`): lane 8j + i
// gives the address of row i of matrix j (16-byte aligned); register j of lane L gets rows
// 2(L%4) and 2(L%4) + 1 of column L/4 of matrix j, the pair a B fragment reads down a
// row-major (k, n) tile.
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const u16* row) {
    u32 at;
    asm("{ .reg .u64 p; cvta.to.shared.u64 p, %1; cvt.u32.u64 %0, p; }\n" : "=r"(at) : "l"(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at)
                 : "memory");
}

// O (16 rows × MMA_D) += A (16 × 16, fragments a) · X[k0 .. k0 + 16, :] for a row-major tile X
// in shared memory (MMA_LD apart), two 8-column tiles of X per ldmatrix.
__device__ __forceinline__ void mma_rows_times_tile(float (*o)[4], u32 a0, u32 a1, u32 a2,
                                                    u32 a3, const u16* x, int k0) {
    int lane = threadIdx.x % WARP, j = lane >> 3, i = lane & 7;
#pragma unroll
    for (int dt = 0; dt < MMA_D / 8; dt += 2) {
        u32 b[4];
        ldmatrix_x4_trans(b, x + (k0 + i + 8 * (j & 1)) * MMA_LD + (dt + (j >> 1)) * 8);
        mma_bf16(o[dt], a0, a1, a2, a3, b[0], b[1]);
        mma_bf16(o[dt + 1], a0, a1, a2, a3, b[2], b[3]);
    }
}

// O (16 rows × MMA_D) += P (16 × 64) · X for P in the accumulator layout of a 16 × 64 product
// (`p[nt]`: columns 8nt .. 8nt + 8) and a 64-row tile X in shared memory: each 16-column step
// of P is the A fragment of two of its 8-column accumulators (FlashAttention-2's register
// reuse), rounded to bf16.
__device__ __forceinline__ void mma_accumulators_times_tile(float (*o)[4], float (*p)[4],
                                                            const u16* x) {
#pragma unroll
    for (int kk = 0; kk < MMA_ROWS / 16; kk++) {
        u32 a0 = pack_bf16(p[2 * kk][0], p[2 * kk][1]);
        u32 a1 = pack_bf16(p[2 * kk][2], p[2 * kk][3]);
        u32 a2 = pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]);
        u32 a3 = pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3]);
        mma_rows_times_tile(o, a0, a1, a2, a3, x, kk * 16);
    }
}

// Element (t, d) of one head of a (B, T, heads·D) f32 tensor, 0 outside (T, D).
__device__ __forceinline__ float head_at(const float* x, i64 b, i64 t, i64 seq, i64 heads,
                                         i64 h, i64 d, i64 dim) {
    return (t < seq && d < dim) ? x[((b * seq + t) * heads + h) * dim + d] : 0.0f;
}

// The A fragments (16 rows from `row0`, all MMA_D columns) of one head of x, as bf16.
__device__ __forceinline__ void load_a_rows(u32 (*frag)[4], const float* x, i64 b, i64 row0,
                                            i64 seq, i64 heads, i64 h, i64 dim) {
    int lane = threadIdx.x % WARP, g = lane >> 2, tg = lane & 3;
#pragma unroll
    for (int kd = 0; kd < MMA_D / 16; kd++) {
        i64 c0 = kd * 16 + tg * 2, c1 = c0 + 8;
        i64 r0 = row0 + g, r1 = r0 + 8;
        frag[kd][0] = pack_bf16(head_at(x, b, r0, seq, heads, h, c0, dim),
                                head_at(x, b, r0, seq, heads, h, c0 + 1, dim));
        frag[kd][1] = pack_bf16(head_at(x, b, r1, seq, heads, h, c0, dim),
                                head_at(x, b, r1, seq, heads, h, c0 + 1, dim));
        frag[kd][2] = pack_bf16(head_at(x, b, r0, seq, heads, h, c1, dim),
                                head_at(x, b, r0, seq, heads, h, c1 + 1, dim));
        frag[kd][3] = pack_bf16(head_at(x, b, r1, seq, heads, h, c1, dim),
                                head_at(x, b, r1, seq, heads, h, c1 + 1, dim));
    }
}

// Rows [start, start + MMA_ROWS) of one head into shared `dst` (MMA_ROWS × MMA_LD bf16), zero
// past the sequence and the head dim; four columns a load where the rows are 16-byte aligned.
__device__ void load_rows_bf16(u16* dst, const float* x, i64 b, i64 start, i64 seq, i64 heads,
                               i64 h, i64 dim) {
    const float* head = x + h * dim;
    i64 row_stride = heads * dim;
    if (dim % 4 == 0 && ((unsigned long long)x & 15) == 0) {
        for (int i = threadIdx.x; i < MMA_ROWS * (MMA_D / 4); i += blockDim.x) {
            int r = i / (MMA_D / 4), c = (i % (MMA_D / 4)) * 4;
            i64 t = start + r;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (t < seq && c < dim) v = *(const float4*)(head + (b * seq + t) * row_stride + c);
            u32* d = (u32*)(dst + r * MMA_LD + c);
            d[0] = pack_bf16(v.x, v.y);
            d[1] = pack_bf16(v.z, v.w);
        }
        return;
    }
    for (int i = threadIdx.x; i < MMA_ROWS * MMA_D; i += blockDim.x) {
        int r = i / MMA_D, d = i % MMA_D;
        i64 t = start + r;
        float v = (t < seq && d < dim) ? head[(b * seq + t) * row_stride + d] : 0.0f;
        dst[r * MMA_LD + d] = bf16_bits(v);
    }
}

// grid: B·H · ceil(T / 64) blocks in x (a head's row blocks one after another, so they share
// its keys in L2; x's limit is 2³¹ − 1, y's only 65,535); block 128; shared: 2 · 64 · MMA_LD
// bf16. `saved` holds the
// logsumexps (B·H·T) then a copy of `out`.
extern "C" __global__ void attention_forward_mma(float* out, float* saved, const float* q,
                                                 const float* k, const float* v, i64 seq,
                                                 i64 heads, i64 kv_heads, i64 dim) {
    extern __shared__ __align__(16) u16 mma_smem[];
    u16* ks = mma_smem;
    u16* vs = mma_smem + MMA_ROWS * MMA_LD;
    i64 blocks = (seq + MMA_ROWS - 1) / MMA_ROWS, qb = blockIdx.x % blocks;
    i64 bh = blockIdx.x / blocks, b = bh / heads, h = bh % heads, kvh = h / (heads / kv_heads);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, g = lane >> 2, tg = lane & 3;
    i64 q0 = qb * MMA_ROWS + warp * 16;
    i64 r0 = q0 + g, r1 = r0 + 8;
    float scale = 1.0f / sqrtf((float)dim);
    u32 qa[MMA_D / 16][4];
    load_a_rows(qa, q, b, q0, seq, heads, h, dim);
    float o[MMA_D / 8][4];
#pragma unroll
    for (int dt = 0; dt < MMA_D / 8; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m0 = -INF, m1 = -INF, l0 = 0.0f, l1 = 0.0f;
    i64 end = min(seq, (qb + 1) * MMA_ROWS);
    for (i64 kt = 0; kt < end; kt += MMA_ROWS) {
        __syncthreads();
        load_rows_bf16(ks, k, b, kt, seq, kv_heads, kvh, dim);
        load_rows_bf16(vs, v, b, kt, seq, kv_heads, kvh, dim);
        __syncthreads();
        if (q0 >= seq || kt > q0 + 15) continue;  // no key of this tile is visible to the warp
        float s[MMA_ROWS / 8][4];
#pragma unroll
        for (int nt = 0; nt < MMA_ROWS / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
            const u16* krow = ks + (nt * 8 + g) * MMA_LD + tg * 2;
#pragma unroll
            for (int kd = 0; kd < MMA_D / 16; kd++) {
                u32 b0 = *(const u32*)(krow + kd * 16), b1 = *(const u32*)(krow + kd * 16 + 8);
                mma_bf16(s[nt], qa[kd][0], qa[kd][1], qa[kd][2], qa[kd][3], b0, b1);
            }
        }
        // Scale, mask (key > row), and the rows' running maxima (a row lives in a quad).
        float mx0 = -INF, mx1 = -INF;
#pragma unroll
        for (int nt = 0; nt < MMA_ROWS / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                i64 key = kt + nt * 8 + tg * 2 + (e & 1);
                i64 row = e < 2 ? r0 : r1;
                float x = key <= row ? s[nt][e] * scale : -INF;
                s[nt][e] = x;
                if (e < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
            }
        }
        for (int o2 = 1; o2 < 4; o2 *= 2) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(FULL, mx0, o2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(FULL, mx1, o2));
        }
        float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        float base0 = n0 == -INF ? 0.0f : n0, base1 = n1 == -INF ? 0.0f : n1;
        float c0 = expf(m0 - base0), c1 = expf(m1 - base1);
        float p0 = 0.0f, p1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < MMA_ROWS / 8; nt++) {
            s[nt][0] = expf(s[nt][0] - base0);
            s[nt][1] = expf(s[nt][1] - base0);
            s[nt][2] = expf(s[nt][2] - base1);
            s[nt][3] = expf(s[nt][3] - base1);
            p0 += s[nt][0] + s[nt][1];
            p1 += s[nt][2] + s[nt][3];
        }
        l0 = l0 * c0 + p0;  // this thread's share; the quad's shares are summed at the end
        l1 = l1 * c1 + p1;
        m0 = n0;
        m1 = n1;
#pragma unroll
        for (int dt = 0; dt < MMA_D / 8; dt++) {
            o[dt][0] *= c0;
            o[dt][1] *= c0;
            o[dt][2] *= c1;
            o[dt][3] *= c1;
        }
        // O += P · V.
        mma_accumulators_times_tile(o, s, vs);
    }
    if (q0 >= seq) return;
    for (int o2 = 1; o2 < 4; o2 *= 2) {
        l0 += __shfl_xor_sync(FULL, l0, o2);
        l1 += __shfl_xor_sync(FULL, l1, o2);
    }
    float* copy = saved + (i64)gridDim.x / blocks * seq;  // after the B·H·T logsumexps
#pragma unroll
    for (int dt = 0; dt < MMA_D / 8; dt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            i64 row = e < 2 ? r0 : r1;
            i64 d = dt * 8 + tg * 2 + (e & 1);
            if (row < seq && d < dim) {
                i64 at = ((b * seq + row) * heads + h) * dim + d;
                float x = o[dt][e] / (e < 2 ? l0 : l1);
                out[at] = x;
                copy[at] = x;
            }
        }
    }
    if (tg == 0) {
        if (r0 < seq) saved[bh * seq + r0] = m0 + logf(l0);
        if (r1 < seq) saved[bh * seq + r1] = m1 + logf(l1);
    }
}

// delta[(b·H + h)·T + t] = Σ_d dO·O over one head's row (O the forward's copy in `saved`). A
// warp per (b, t, h) row.
extern "C" __global__ void attention_delta_mma(float* delta, const float* dout,
                                               const float* saved, i64 batch, i64 seq,
                                               i64 heads, i64 dim) {
    i64 row = blockIdx.x * (i64)(blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= batch * seq * heads) return;
    const float* o = saved + batch * heads * seq + row * dim;
    const float* d = dout + row * dim;
    float acc = 0.0f;
    for (i64 c = lane; c < dim; c += WARP) acc += d[c] * o[c];
    acc = warp_sum(acc);
    i64 h = row % heads, bt = row / heads, b = bt / seq, t = bt % seq;
    if (lane == 0) delta[(b * heads + h) * seq + t] = acc;
}

// dK, dV and dQ (dQ added into zeros with atomics). grid: B·Hkv · ceil(T / 64) in x; block 128;
// a warp owns 16 keys and sums over the group's query heads and the queries at or after its
// keys; shared: K, Q and dO tiles and dSᵀ (4 · 64 · MMA_LD bf16), the tile's logsumexps and
// deltas (2 · 64 f32).
extern "C" __global__ void attention_backward_mma(float* dq, float* dk, float* dv,
                                                  const float* dout, const float* q,
                                                  const float* k, const float* v,
                                                  const float* lse, const float* delta,
                                                  i64 seq, i64 heads, i64 kv_heads, i64 dim) {
    extern __shared__ __align__(16) u16 mma_smem[];
    u16* ks = mma_smem;
    u16* qs = ks + MMA_ROWS * MMA_LD;
    u16* dos = qs + MMA_ROWS * MMA_LD;
    u16* dss = dos + MMA_ROWS * MMA_LD;  // dSᵀ: [key][query]
    float* lse_s = (float*)(dss + MMA_ROWS * MMA_LD);
    float* delta_s = lse_s + MMA_ROWS;
    i64 blocks = (seq + MMA_ROWS - 1) / MMA_ROWS;
    i64 bk = blockIdx.x / blocks, b = bk / kv_heads, kvh = bk % kv_heads, group = heads / kv_heads;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, g = lane >> 2, tg = lane & 3;
    i64 first = (blockIdx.x % blocks) * MMA_ROWS;  // the block's first key
    i64 u0 = first + warp * 16;              // the warp's first key
    float scale = 1.0f / sqrtf((float)dim);
    u32 ka[MMA_D / 16][4], va[MMA_D / 16][4];
    load_a_rows(ka, k, b, u0, seq, kv_heads, kvh, dim);
    load_a_rows(va, v, b, u0, seq, kv_heads, kvh, dim);
    __syncthreads();
    load_rows_bf16(ks, k, b, first, seq, kv_heads, kvh, dim);
    float dka[MMA_D / 8][4], dva[MMA_D / 8][4];
#pragma unroll
    for (int dt = 0; dt < MMA_D / 8; dt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) dka[dt][e] = dva[dt][e] = 0.0f;
    }
    for (i64 gi = 0; gi < group; gi++) {
        i64 h = kvh * group + gi, bh = b * heads + h;
        for (i64 qt = first; qt < seq; qt += MMA_ROWS) {
            __syncthreads();
            load_rows_bf16(qs, q, b, qt, seq, heads, h, dim);
            load_rows_bf16(dos, dout, b, qt, seq, heads, h, dim);
            if (threadIdx.x < MMA_ROWS) {
                i64 t = qt + threadIdx.x;
                lse_s[threadIdx.x] = t < seq ? lse[bh * seq + t] : 0.0f;
                delta_s[threadIdx.x] = t < seq ? delta[bh * seq + t] : 0.0f;
            }
            __syncthreads();
            // A warp whose keys are all past the sequence or after the tile's last query
            // sees nothing; its rows of dSᵀ are zero.
            bool active = u0 < seq && u0 <= qt + MMA_ROWS - 1;
            float st[MMA_ROWS / 8][4];
#pragma unroll
            for (int nt = 0; nt < MMA_ROWS / 8; nt++) st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.0f;
            if (active) {
                // Sᵀ = K · Qᵀ (16 keys × 64 queries), then Pᵀ.
#pragma unroll
                for (int nt = 0; nt < MMA_ROWS / 8; nt++) {
                    const u16* qrow = qs + (nt * 8 + g) * MMA_LD + tg * 2;
#pragma unroll
                    for (int kd = 0; kd < MMA_D / 16; kd++) {
                        u32 b0 = *(const u32*)(qrow + kd * 16);
                        u32 b1 = *(const u32*)(qrow + kd * 16 + 8);
                        mma_bf16(st[nt], ka[kd][0], ka[kd][1], ka[kd][2], ka[kd][3], b0, b1);
                    }
                }
#pragma unroll
                for (int nt = 0; nt < MMA_ROWS / 8; nt++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int col = nt * 8 + tg * 2 + (e & 1);
                        i64 t = qt + col, u = u0 + g + (e < 2 ? 0 : 8);
                        st[nt][e] = (t >= u && t < seq) ? expf(st[nt][e] * scale - lse_s[col]) : 0.0f;
                    }
                }
                // dV += Pᵀ · dO.
                mma_accumulators_times_tile(dva, st, dos);
                // dPᵀ = V · dOᵀ, then dSᵀ = Pᵀ ⊙ (dPᵀ − delta) in place of Pᵀ.
#pragma unroll
                for (int nt = 0; nt < MMA_ROWS / 8; nt++) {
                    float dp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    const u16* drow = dos + (nt * 8 + g) * MMA_LD + tg * 2;
#pragma unroll
                    for (int kd = 0; kd < MMA_D / 16; kd++) {
                        u32 b0 = *(const u32*)(drow + kd * 16);
                        u32 b1 = *(const u32*)(drow + kd * 16 + 8);
                        mma_bf16(dp, va[kd][0], va[kd][1], va[kd][2], va[kd][3], b0, b1);
                    }
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int col = nt * 8 + tg * 2 + (e & 1);
                        st[nt][e] = st[nt][e] * (dp[e] - delta_s[col]);
                    }
                }
                // dK += dSᵀ · Q (scaled at the end).
                mma_accumulators_times_tile(dka, st, qs);
            }
            // dSᵀ · scale into shared memory (zeros from an idle warp), for dQ.
#pragma unroll
            for (int nt = 0; nt < MMA_ROWS / 8; nt++) {
                u16* row = dss + (warp * 16 + g) * MMA_LD + nt * 8 + tg * 2;
                *(u32*)row = pack_bf16(st[nt][0] * scale, st[nt][1] * scale);
                *(u32*)(row + 8 * MMA_LD) = pack_bf16(st[nt][2] * scale, st[nt][3] * scale);
            }
            __syncthreads();
            // dQ (the warp's 16 queries of the tile) += dS · K over the block's 64 keys.
            i64 t0 = qt + warp * 16;
            if (t0 < seq) {
                float dqa[MMA_D / 8][4];
#pragma unroll
                for (int dt = 0; dt < MMA_D / 8; dt++) dqa[dt][0] = dqa[dt][1] = dqa[dt][2] = dqa[dt][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < MMA_ROWS / 16; kk++) {
                    // A[query][key] = dSᵀ[key][query]: dSᵀ's 8×8 blocks transposed (keys
                    // +8 for a2, a3; queries +8 for a1, a3).
                    int j = lane >> 3, i = lane & 7;
                    u32 a[4];
                    ldmatrix_x4_trans(a, dss + (kk * 16 + i + 8 * (j >> 1)) * MMA_LD + warp * 16 + 8 * (j & 1));
                    mma_rows_times_tile(dqa, a[0], a[1], a[2], a[3], ks, kk * 16);
                }
#pragma unroll
                for (int dt = 0; dt < MMA_D / 8; dt++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        i64 t = t0 + g + (e < 2 ? 0 : 8);
                        i64 d = dt * 8 + tg * 2 + (e & 1);
                        if (t < seq && d < dim) atomicAdd(&dq[((b * seq + t) * heads + h) * dim + d], dqa[dt][e]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int dt = 0; dt < MMA_D / 8; dt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            i64 u = u0 + g + (e < 2 ? 0 : 8);
            i64 d = dt * 8 + tg * 2 + (e & 1);
            if (u < seq && d < dim) {
                i64 at = ((b * seq + u) * kv_heads + kvh) * dim + d;
                dk[at] = dka[dt][e] * scale;
                dv[at] = dva[dt][e];
            }
        }
    }
}
