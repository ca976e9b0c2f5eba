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
