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
