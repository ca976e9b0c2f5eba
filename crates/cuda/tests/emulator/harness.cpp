// A lane-by-lane CPU emulation of the tensor-core attention kernels (kernels/attention.cu,
// `attention_forward_mma`, `attention_delta_mma`, `attention_backward_mma`), for
// tests/emulated_attention.rs: one OS thread per CUDA thread, barriers for __syncthreads and
// for the warp-wide instructions. `mma.sync.m16n8k16`, `ldmatrix .x4 .trans` and the shuffles
// are emulated from the PTX ISA's fragment layouts (groupID = lane / 4, threadID_in_group =
// lane % 4): a kernel that indexes its fragments or tiles wrongly computes wrong numbers here,
// as on a GPU. `kern.inc` is the kernels' source with those instructions swapped for the
// functions below, and `common.inc` the helpers they take from kernels/common.cuh (the test
// writes both).
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;
#define WARP 32
#define FULL 0xffffffffu

static inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
static inline u32 __float_as_uint(float x) { u32 u; memcpy(&u, &x, 4); return u; }
#define INF __int_as_float(0x7f800000)

struct float4 { float x, y, z, w; };
static inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
struct Dim3 { i64 x, y, z; };
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;
static inline i64 min(i64 a, i64 b) { return a < b ? a : b; }

// One block's shared memory and its barriers; per warp, the slots its lanes exchange through.
struct Block {
    std::vector<unsigned char> smem;
    std::unique_ptr<std::barrier<>> all;
    std::unique_ptr<std::barrier<>> warp[32];
    float floats[32][32];
    u32 words[32][32][6];
    const u16* rows[32][32];
};
thread_local Block* blk;
static void* blk_smem() { return (void*)(((unsigned long long)blk->smem.data() + 15) & ~15ull); }
static int warp_of() { return (int)threadIdx.x / 32; }
static int lane_of() { return (int)threadIdx.x % 32; }
static void warp_sync() { blk->warp[warp_of()]->arrive_and_wait(); }
static void emu_sync() { blk->all->arrive_and_wait(); }

static float emu_shfl_xor(float v, int o) {
    blk->floats[warp_of()][lane_of()] = v;
    warp_sync();
    float r = blk->floats[warp_of()][lane_of() ^ o];
    warp_sync();
    return r;
}

static inline float warp_sum(float v) {
    for (int o = 16; o > 0; o /= 2) v += emu_shfl_xor(v, o);
    return v;
}

// The kernels' own rounding to bf16 (`bf16_bits`, from kernels/common.cuh).
#include "common.inc"
static float bf16_value(u32 bits16) { u32 b = bits16 << 16; float f; memcpy(&f, &b, 4); return f; }

// cvt.rn.bf16x2.f32 d, hi, lo.
static inline u32 emu_pack(float lo, float hi) { return (u32)bf16_bits(lo) | ((u32)bf16_bits(hi) << 16); }

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: A's registers hold (row g, cols 2t, 2t+1),
// (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..); B's (rows 2t, 2t + 1, col g), (2t + 8.., g);
// C's (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1); low half first.
static void emu_mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    u32* mine = blk->words[warp_of()][lane_of()];
    mine[0] = a0; mine[1] = a1; mine[2] = a2; mine[3] = a3; mine[4] = b0; mine[5] = b1;
    warp_sync();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; l++) {
        const u32* f = blk->words[warp_of()][l];
        int g = l >> 2, t = l & 3;
        int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
        for (int r = 0; r < 4; r++) {
            A[rows[r]][cols[r]] = bf16_value(f[r] & 0xffff);
            A[rows[r]][cols[r] + 1] = bf16_value(f[r] >> 16);
        }
        B[2 * t][g] = bf16_value(f[4] & 0xffff);
        B[2 * t + 1][g] = bf16_value(f[4] >> 16);
        B[2 * t + 8][g] = bf16_value(f[5] & 0xffff);
        B[2 * t + 9][g] = bf16_value(f[5] >> 16);
    }
    int g = lane_of() >> 2, t = lane_of() & 3;
    for (int e = 0; e < 4; e++) {
        int row = g + (e < 2 ? 0 : 8), col = 2 * t + (e & 1);
        float acc = c[e];
        for (int k = 0; k < 16; k++) acc += A[row][k] * B[k][col];
        c[e] = acc;
    }
    warp_sync();
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lane 8j + i gives row i of matrix j; register
// j of lane L gets rows 2(L%4), 2(L%4) + 1 of column L/4 of matrix j.
static void emu_ldmatrix(u32* r, const u16* row) {
    if (((unsigned long long)row & 15) != 0) {
        fprintf(stderr, "ldmatrix: a row address not 16-byte aligned\n");
        abort();
    }
    blk->rows[warp_of()][lane_of()] = row;
    warp_sync();
    int g = lane_of() >> 2, t = lane_of() & 3;
    for (int j = 0; j < 4; j++) {
        const u16* r0 = blk->rows[warp_of()][8 * j + 2 * t];
        const u16* r1 = blk->rows[warp_of()][8 * j + 2 * t + 1];
        r[j] = (u32)r0[g] | ((u32)r1[g] << 16);
    }
    warp_sync();
}

static std::mutex atomic_lock;
static void atomicAdd(float* p, float v) {
    std::lock_guard<std::mutex> guard(atomic_lock);
    *p += v;
}

#include "kern.inc"

template <class F> static void launch(Dim3 grid, int threads, size_t shared, F kernel) {
    blockDim = {threads, 1, 1};
    gridDim = grid;
    for (i64 by = 0; by < grid.y; by++) {
        for (i64 bx = 0; bx < grid.x; bx++) {
            Block b;
            b.smem.assign(shared + 16, 0xAB);  // garbage, as on a GPU
            b.all = std::make_unique<std::barrier<>>(threads);
            for (int w = 0; w < threads / 32; w++) b.warp[w] = std::make_unique<std::barrier<>>(32);
            std::vector<std::thread> lanes;
            for (int t = 0; t < threads; t++) {
                lanes.emplace_back([&, t] {
                    blk = &b;
                    threadIdx = {t, 0, 0};
                    blockIdx = {bx, by, 0};
                    kernel();
                });
            }
            for (auto& l : lanes) l.join();
        }
    }
}

static std::vector<float> read_floats(const std::string& path, size_t n) {
    std::vector<float> v(n);
    FILE* f = fopen(path.c_str(), "rb");
    if (!f || fread(v.data(), 4, n, f) != n) { fprintf(stderr, "cannot read %s\n", path.c_str()); exit(2); }
    fclose(f);
    return v;
}

static void write_floats(const std::string& path, const std::vector<float>& v) {
    FILE* f = fopen(path.c_str(), "wb");
    if (!f || fwrite(v.data(), 4, v.size(), f) != v.size()) { fprintf(stderr, "cannot write %s\n", path.c_str()); exit(2); }
    fclose(f);
}

// Usage: harness DIR B T H HKV D: reads DIR/{q,k,v,do}.bin, writes DIR/{out,dq,dk,dv}.bin.
int main(int argc, char** argv) {
    if (argc != 7) { fprintf(stderr, "usage: harness DIR B T H HKV D\n"); return 2; }
    std::string dir = argv[1];
    i64 B = atoll(argv[2]), T = atoll(argv[3]), H = atoll(argv[4]), Hk = atoll(argv[5]), D = atoll(argv[6]);
    auto q = read_floats(dir + "/q.bin", B * T * H * D), dout = read_floats(dir + "/do.bin", B * T * H * D);
    auto k = read_floats(dir + "/k.bin", B * T * Hk * D), v = read_floats(dir + "/v.bin", B * T * Hk * D);
    std::vector<float> out(B * T * H * D), saved(B * H * T + B * T * H * D), delta(B * H * T);
    std::vector<float> dq(B * T * H * D, 0.0f), dk(B * T * Hk * D, NAN), dv(B * T * Hk * D, NAN);
    i64 blocks = (T + MMA_ROWS - 1) / MMA_ROWS;
    launch({B * H * blocks, 1, 1}, 128, 2 * MMA_ROWS * MMA_LD * 2, [&] {
        attention_forward_mma(out.data(), saved.data(), q.data(), k.data(), v.data(), T, H, Hk, D);
    });
    i64 rows = B * H * T;
    launch({(rows + 7) / 8, 1, 1}, 256, 0, [&] {
        attention_delta_mma(delta.data(), dout.data(), saved.data(), B, T, H, D);
    });
    launch({B * Hk * blocks, 1, 1}, 128, 4 * MMA_ROWS * MMA_LD * 2 + 2 * MMA_ROWS * 4, [&] {
        attention_backward_mma(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(),
                               v.data(), saved.data(), delta.data(), T, H, Hk, D);
    });
    write_floats(dir + "/out.bin", out);
    write_floats(dir + "/dq.bin", dq);
    write_floats(dir + "/dk.bin", dk);
    write_floats(dir + "/dv.bin", dv);
    return 0;
}
