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

// `dlogits` may be `z` itself.
extern "C" __global__ void cross_entropy_backward(float* dlogits, const float* z,
                                                  const float* logsumexp, const u32* targets,
                                                  i64 vocab, float dloss, float cap) {
    i64 row = blockIdx.x;
    float lse = logsumexp[row];
    u32 target = targets[row];
    for (i64 c = threadIdx.x; c < vocab; c += blockDim.x) {
        dlogits[row * vocab + c] = xent_gradient(z[row * vocab + c], lse, c == target, dloss, cap);
    }
}

// The same, written as bf16 (rounded to nearest even, as f32_to_bf16) for the products that
// read it on bf16 operands.
extern "C" __global__ void cross_entropy_backward_bf16(u16* dlogits, const float* z,
                                                       const float* logsumexp, const u32* targets,
                                                       i64 vocab, float dloss, float cap) {
    i64 row = blockIdx.x;
    float lse = logsumexp[row];
    u32 target = targets[row];
    for (i64 c = threadIdx.x; c < vocab; c += blockDim.x) {
        float d = xent_gradient(z[row * vocab + c], lse, c == target, dloss, cap);
        dlogits[row * vocab + c] = bf16_bits(d);
    }
}
