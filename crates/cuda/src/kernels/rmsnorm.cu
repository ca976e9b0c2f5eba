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
