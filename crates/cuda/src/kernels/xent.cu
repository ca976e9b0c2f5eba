// ---- cross-entropy (reference: xent.rs); one block per row -----------------------------------

// Row-wise: optional soft cap in place on `logits`, then the logsumexp and the loss, in one
// pass over the row (each thread keeps a running maximum and its sum of exponentials, merged
// across the block at the end, as the online softmax of Milakov & Gimelshein, 2018).
extern "C" __global__ void cross_entropy_forward(float* losses, float* logsumexp, float* logits,
                                                 const u32* targets, i64 vocab, float cap) {
    i64 row = blockIdx.x;
    float* z = logits + row * vocab;
    float m = -INF, s = 0.0f;
    for (i64 c = threadIdx.x; c < vocab; c += blockDim.x) {
        float x = z[c];
        if (cap > 0.0f) {
            x = cap * tanhf(x / cap);
            z[c] = x;
        }
        if (x > m) {
            s = s * expf(m - x) + 1.0f;
            m = x;
        } else {
            s += expf(x - m);
        }
    }
    float mb = block_max(m);
    s = block_sum(m == -INF ? 0.0f : s * expf(m - mb));
    if (threadIdx.x == 0) {
        float lse = mb + logf(s);
        logsumexp[row] = lse;
        losses[row] = lse - z[targets[row]];
    }
}

// dlogits = (softmax − onehot)·dloss, through the soft cap's backward when `cap` > 0 (`z` then
// holds the capped logits).
__device__ __forceinline__ float xent_gradient(float zc, float lse, bool target, float dloss,
                                               float cap) {
    float d = expf(zc - lse) * dloss;
    if (target) d -= dloss;
    if (cap > 0.0f) {
        float t = zc / cap;
        d *= 1.0f - t * t;
    }
    return d;
}

__device__ __forceinline__ void store_gradient(float* d, i64 at, float v) { d[at] = v; }
__device__ __forceinline__ void store_gradient(u16* d, i64 at, float v) { d[at] = bf16_bits(v); }

// One block per row; `dlogits` f32 (may be `z` itself) or bf16 (rounded to nearest even, as
// f32_to_bf16, for the products that read it on bf16 operands).
template <typename Out>
__device__ void xent_backward_rows(Out* dlogits, const float* z, const float* logsumexp,
                                   const u32* targets, i64 vocab, float dloss, float cap) {
    i64 row = blockIdx.x;
    float lse = logsumexp[row];
    u32 target = targets[row];
    for (i64 c = threadIdx.x; c < vocab; c += blockDim.x) {
        float d = xent_gradient(z[row * vocab + c], lse, c == target, dloss, cap);
        store_gradient(dlogits, row * vocab + c, d);
    }
}

extern "C" __global__ void cross_entropy_backward(float* dlogits, const float* z,
                                                  const float* logsumexp, const u32* targets,
                                                  i64 vocab, float dloss, float cap) {
    xent_backward_rows(dlogits, z, logsumexp, targets, vocab, dloss, cap);
}

extern "C" __global__ void cross_entropy_backward_bf16(u16* dlogits, const float* z,
                                                       const float* logsumexp, const u32* targets,
                                                       i64 vocab, float dloss, float cap) {
    xent_backward_rows(dlogits, z, logsumexp, targets, vocab, dloss, cap);
}
