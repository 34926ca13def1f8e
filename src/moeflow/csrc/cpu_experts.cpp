// One MoE layer's routed experts on the CPU: bf16 weights, fp32 accumulation, bandwidth-first.
//
// A call gets a list of jobs (expert, its tokens and weights, intermediate rows r0:r1) and runs, on its own
// thread pool, a preparation of the tokens (gathered, converted or packed per job) and two parallel phases:
//   A  gate/up: row chunks of all jobs claimed by the threads in turn (Chunks); each streams its gate and up
//      rows once for all of the job's tokens and writes act = silu(gate) * up.
//      Biased experts (GPT-OSS, experts/biased.py): the block is followed by its biases [gate I | up I | down H];
//      act is then the clamped SwiGLU of the biased sums, and the part holding row 0 adds w * the down bias.
//   B  down: H split into column chunks (multiples of 64 columns, so no two threads share a cache line of
//      the output); each thread streams its columns of down_t for every job and adds w * act @ down_t
//      into out. No reduction across threads is needed.
// Host layout of an expert block: [gate (I x H) | up (I x H) | down_t (I x H)], all row-major, so a
// row range is three contiguous runs.
//
// Kernels (chosen per call): 0 scalar, 1 AVX2+FMA (bf16 -> fp32 by a 16-bit shift), 2 AVX512-BF16
// (vdpbf16ps for gate/up), 3 AMX-BF16 tiles, 4 the AMX tiling with the tile ops emulated in scalar code
// (tests only). Everything ISA-specific is compiled under a target pragma and dispatched at run time, so
// the file builds with plain -O3 on any x86-64 compiler that knows the intrinsics.
//
// Legend: n = tokens of a job, R = rows of a job (r1 - r0), Rp = R rounded up to 32, H = hidden.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cpuid.h>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <sys/syscall.h>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

typedef uint16_t bf16;

enum Kernel { SCALAR = 0, AVX2 = 1, AVX512 = 2, AMX = 3, AMX_EMU = 4 };

static inline float bf2f(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Nearest integer, ties to even (the default rounding mode, as std::nearbyint), inline: cvtss2si is SSE.
static inline int round_even(float v) { return _mm_cvtss_si32(_mm_set_ss(v)); }

static inline bf16 f2bf(float f) {  // round to nearest even, as PyTorch does
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

// ---------------------------------------------------------------------------------------------------
// Thread pool (cpu_experts_pool.inc, with cpu_relax): the calling thread is worker 0.

#include "cpu_experts_pool.inc"

// ---------------------------------------------------------------------------------------------------
// Row chunks of one call's jobs, claimed by the threads from an atomic counter: a thread that starts late
// (woken last, or sharing its core with the GPU driver) takes fewer, so a call does not wait for its slowest
// thread. The cut depends on the jobs and the thread count alone, and down sums are kept per chunk and
// reduced in chunk order: a result does not depend on which thread ran which chunk.

struct Chunks {
    std::vector<int> job, r0, r1;  // chunk c: rows r0:r1 of job job[c]
    std::vector<int> first;        // job k's chunks: first[k]:first[k + 1]
    std::vector<size_t> soff;      // chunk c's sums at soff[c] floats into the call's sums
    size_t sums = 0;               // floats of every chunk's sums
    std::atomic<int> next{0};
    int claim() { return next.fetch_add(1, std::memory_order_relaxed); }
    int size() const { return (int)job.size(); }
};

// The jobs (anything with rows R and tokens n) in chunks of whole 16-row blocks of about equal cost (16 + 1.5 n
// a block): about four a thread where every job has at most 16 tokens (the sums stay small: decode), else one.
// Each of job j's chunks keeps sum_floats(j) floats of sums.
template <class J, class SumFloats>
static void cut_chunks(Chunks& c, const std::vector<J>& jobs, int threads, SumFloats sum_floats) {
    double total = 0;
    int max_n = 0;
    for (const J& j : jobs) total += (j.R + 15) / 16 * (16 + 1.5 * j.n), max_n = std::max(max_n, j.n);
    const int per_thread = max_n <= 16 ? 4 : 1;
    const double target = total / std::max(threads * per_thread, 1);
    c.first.assign(1, 0);
    for (size_t k = 0; k < jobs.size(); ++k) {
        const J& j = jobs[k];
        const int step = 16 * std::max(1, (int)std::lround(target / (16 + 1.5 * j.n)));
        for (int r = 0; r < j.R; r += step) {
            c.job.push_back((int)k), c.r0.push_back(r), c.r1.push_back(std::min(j.R, r + step));
            c.soff.push_back(c.sums);
            c.sums += sum_floats(j);
        }
        c.first.push_back(c.size());
    }
}

// ---------------------------------------------------------------------------------------------------
// One job as the kernels see it.

struct Job {
    const bf16 *gate, *up, *down;  // row r0 of each matrix; rows are H apart
    int n, R, Rp;                   // tokens, rows, rows padded to 32
    const int32_t* tok;             // [n] rows of out
    const float* w;                 // [n] routing weights
    const void* x;                  // the job's tokens: fp32 [n, H], bf16 [n, H], or AMX-packed (pack_tokens)
    void* act;                      // silu(gate) * up: fp32 [n, R] or, for AMX, bf16 tiles (pack_tokens)
    bool tiles;                     // AMX tiles (else the vector kernel)
    bool fused;                     // down by rows, into its chunk's sums, in the gate/up pass
    const bf16 *bias_g, *bias_u;    // biased: the gate and up biases of row r0 (else null)
    const bf16* bias_d;             // biased, where r0 = 0: the down bias [H] (else null)
    float alpha, limit;             // biased: the clamped SwiGLU's
};

// act of one (token, row r of the job) from its gate and up sums: silu(g) * u or, biased, GPT-OSS's
// (clamp(u + bu, -limit, limit) + 1) * g' * sigmoid(alpha g') with g' = min(g + bg, limit).
static inline float activation(const Job& j, int r, float g, float u) {
    if (!j.bias_g) return silu(g) * u;
    g = std::min(g + bf2f(j.bias_g[r]), j.limit);
    u = std::clamp(u + bf2f(j.bias_u[r]), -j.limit, j.limit);
    return (u + 1.0f) * (g / (1.0f + std::exp(-j.alpha * g)));
}

static inline int groups16(int n) { return (n + 15) / 16; }

static inline float h2f(uint16_t h) {  // IEEE half to float (exact)
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    uint32_t u;
    if (e == 0x1f) u = sign | 0x7f800000u | (m << 13);
    else if (e) u = sign | ((e + 112) << 23) | (m << 13);
    else if (m == 0) u = sign;
    else {  // subnormal: m * 2^-24
        float f = (float)m * 5.9604644775390625e-8f;
        std::memcpy(&u, &f, 4);
        u |= sign;
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// A quantized row's layout (quant/format.py): [q: H * bits / 8][scales: G x 2 bytes][zero points: G x 2, asym].
struct QFormat {
    int bits, group, groups, sym, fp16;
    int64_t record, q_bytes;
    float half(const uint8_t* p) const {
        uint16_t v;
        std::memcpy(&v, p, 2);
        return fp16 ? h2f(v) : bf2f(v);
    }
    float scale(const uint8_t* rec, int G) const { return half(rec + q_bytes + 2 * G); }
    float zero(const uint8_t* rec, int G) const {
        return sym ? (float)(1 << (bits - 1)) : half(rec + q_bytes + 2 * (size_t)groups + 2 * G);
    }
};

// One quantized job: records of row r0 of each matrix, its tokens (fp32, natural or chunk order), their group
// sums [n, G] and activations [n, R].
struct QJob {
    const QFormat* f;
    const uint8_t *gate, *up, *down;
    int n, R, H;
    const int32_t* tok;
    const float* w;
    float *x, *xs, *act;  // x: fp32 tokens, or (bf16 mode) bf16 tokens in block-of-64 order
    int idot = 0;       // AVX2 integer dot products: x holds int8 tokens [n, H] then their chunk scales [n, H / 32]
    int vnni = 0;       // with idot, one token (int4): gate/up and down 1 by AVX512-VNNI, 2 emulated (Opts.quant_vnni)
    int pf = 0;         // integer dots: gate/up streams prefetched this many bytes ahead (Opts.quant_prefetch; 0 none)
};

// The call's settings (CpuKernelConfig on the Python side), read from an int64 array in this order.
struct Opts {
    int amx_min_tokens;       // jobs of at least this many tokens go to the AMX tiles
    int64_t fused_max_bytes;  // vector path: down fused into gate/up while all chunks' sums take at most this
    int amx_down_rows, amx_gu_hidden, amx_gu_rows;  // the AMX blocking (AmxBlocking), rounded to 32, 32, 16
    int gemv_rows;            // vector path, AVX-512: gate/up rows per pass (1, 2 or 4)
    int prefetch;             // vector path: software prefetch this many bytes ahead of each weight stream (0: none)
    int pin;                  // pin worker i to the i-th core of the process's CPUs
    int spin;                 // pause iterations idle workers spin before they sleep
    int down_direct;          // vector path, fused down: weights widened in registers, not through an L1 buffer
    int int4_bf16;            // AVX-512, int4 groups of 64k: gate/up codes looked up as bf16, vdpbf16ps on bf16 tokens
    int quant_avx512;         // int4/int8 on the AVX-512 code where the kernel is avx512 or amx (else the AVX2 code)
    int biased;               // bf16 blocks followed by their biases, the clamped SwiGLU (vector paths only)
    float alpha, limit;       // biased: the activation's, passed as float32 bits
    int quant_int8_tokens;    // AVX2 int4: jobs of up to this many tokens take int8 tokens, integer dots
    int quant_int8_on_int8;   // the same for int8 experts
    int quant_vnni;           // AVX2 int4, one token: 0 AVX2, 1 AVX512-VNNI (+ VBMI) where the CPU has it, 2 emulated
    int quant_prefetch;       // integer dots: gate/up rows prefetched this many bytes ahead (0: none)
};
static const int N_OPTS = 19;

static float float_bits(int64_t v) {
    const uint32_t u = (uint32_t)v;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static Opts read_opts(const int64_t* o) {
    return Opts{(int)o[0], o[1], (int)o[2], (int)o[3], (int)o[4], std::clamp((int)o[5], 1, 4), (int)std::max<int64_t>(o[6], 0),
                (int)o[7], (int)std::max<int64_t>(o[8], 0), (int)o[9], (int)o[10], (int)o[11], (int)o[12],
                float_bits(o[13]), float_bits(o[14]), (int)std::max<int64_t>(o[15], 0), (int)o[16], (int)o[17],
                (int)std::max<int64_t>(o[18], 0)};
}

// ---------------------------------------------------------------------------------------------------
// Scalar (reference and any-CPU fallback).

static void gateup_scalar(const Job& j, int b0, int b1, int H) {
    const float* x = (const float*)j.x;
    float* act = (float*)j.act;
    for (int r = b0; r < b1; ++r) {
        const bf16 *g = j.gate + (size_t)r * H, *u = j.up + (size_t)r * H;
        for (int t = 0; t < j.n; ++t) {
            const float* xt = x + (size_t)t * H;
            float sg = 0, su = 0;
            for (int h = 0; h < H; ++h) {
                sg += xt[h] * bf2f(g[h]);
                su += xt[h] * bf2f(u[h]);
            }
            act[(size_t)t * j.R + r] = activation(j, r, sg, su);
        }
    }
}

static void down_scalar(const Job& j, int c0, int c1, int H, float* acc, float* out) {
    const float* act = (const float*)j.act;
    int cw = c1 - c0;
    std::memset(acc, 0, sizeof(float) * (size_t)j.n * cw);
    for (int r = 0; r < j.R; ++r) {
        const bf16* d = j.down + (size_t)r * H + c0;
        for (int t = 0; t < j.n; ++t) {
            float a = act[(size_t)t * j.R + r];
            float* at = acc + (size_t)t * cw;
            for (int c = 0; c < cw; ++c) at[c] += a * bf2f(d[c]);
        }
    }
    for (int t = 0; t < j.n; ++t)
        for (int c = 0; c < cw; ++c) out[(size_t)j.tok[t] * H + c0 + c] += j.w[t] * acc[(size_t)t * cw + c];
}

// Rows r0:r1 of down_t (full width, one contiguous run) into this thread's sums acc [n, H].
static void down_rows_scalar(const Job& j, int r0, int r1, int H, float* acc) {
    const float* act = (const float*)j.act;
    for (int r = r0; r < r1; ++r) {
        const bf16* d = j.down + (size_t)r * H;
        for (int t = 0; t < j.n; ++t) {
            float a = act[(size_t)t * j.R + r];
            float* at = acc + (size_t)t * H;
            for (int c = 0; c < H; ++c) at[c] += a * bf2f(d[c]);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// AVX512-VNNI: one token's int4 experts (cpu_experts_vnni.inc), on the instructions and emulated.

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma")
#define VNNI_NS vnni
#include "cpu_experts_vnni.inc"
#undef VNNI_NS
#pragma GCC pop_options
#define VNNI_NS vnni_emu
#define VNNI_EMULATED
#include "cpu_experts_vnni.inc"
#undef VNNI_EMULATED
#undef VNNI_NS

// ---------------------------------------------------------------------------------------------------
// AVX2 and AVX512-BF16 (cpu_experts_vec.inc, once per vector width).

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define VEC_NS avx2
#define VEC_W 8
#include "cpu_experts_vec.inc"
#include "cpu_experts_quant.inc"
#include "cpu_experts_qdot.inc"
#undef VEC_W
#undef VEC_NS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")
#define VEC_NS avx512
#define VEC_W 16
#include "cpu_experts_vec.inc"
#include "cpu_experts_quant.inc"
#undef VEC_W
#undef VEC_NS
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------
// AMX: the same tiling twice, once on the hardware tiles and once with the tile ops emulated in scalar
// code, so the blocking and packing logic runs (and is tested) on any CPU.

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

static TileConfig full_tiles() {  // every tile 16 rows x 64 bytes
    TileConfig c;
    for (int i = 0; i < 8; ++i) c.colsb[i] = 64, c.rows[i] = 16;
    return c;
}

// The AMX blocking, in k-steps of 32 (moe_experts' amx_* arguments). Per-thread buffers, in KiB:
// gate/up 2 * gu_tiles * (gu_steps + groups), down (DOWN_COLS / 16) * (down_steps + groups).
struct AmxBlocking {
    int down_steps;  // down: k-steps (32 rows of down_t) repacked per chunk
    int gu_steps;    // gate/up: k-steps (32 of H) copied per slice
    int gu_tiles;    // gate/up: row tiles (16 rows) per block
};
static const int DOWN_COLS = 256;  // down: columns per chunk (a thread's columns: Mixtral's H / 16 threads)

static size_t amx_scratch_bytes(const AmxBlocking& b, int groups) {
    const size_t gu = (size_t)2 * b.gu_tiles * (b.gu_steps + groups);
    const size_t down = (size_t)(DOWN_COLS / 16) * (b.down_steps + groups);
    return std::max(gu, down) * 1024;
}

// Layouts of a tiled job (tiles of 1 KiB): packed tokens [groups][H / 32][16 pairs][16 tokens] bf16 pairs (B of
// gate/up); act [groups][Rp / 32][16 tokens][32 rows] bf16 (A of down).
// Tokens 16g:16g + 16 of the job (rows tok of x [N, H] fp32) into its packed tokens; missing tokens are zeros.
static void pack_tokens(const Job& j, const float* x, int g, int H) {
    const int KS = H / 32;
    uint32_t* o = (uint32_t*)j.x + (size_t)g * KS * 256;
    for (int k = 0; k < KS; ++k, o += 256)
        for (int t = 0; t < 16; ++t) {
            const int tt = g * 16 + t;
            if (tt >= j.n) {
                for (int p = 0; p < 16; ++p) o[p * 16 + t] = 0;
                continue;
            }
            const float* xr = x + (size_t)j.tok[tt] * H + k * 32;  // 32 contiguous floats into a 1 KiB tile
            for (int p = 0; p < 16; ++p)
                o[p * 16 + t] = (uint32_t)f2bf(xr[2 * p]) | ((uint32_t)f2bf(xr[2 * p + 1]) << 16);
        }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")
#define AMX_NS amx_hw
#define AMX_HW 1
#include "cpu_experts_amx.inc"
#undef AMX_HW
#undef AMX_NS
#pragma GCC pop_options

#define AMX_NS amx_emu
#define AMX_HW 0
#include "cpu_experts_amx.inc"
#undef AMX_HW
#undef AMX_NS

// ---------------------------------------------------------------------------------------------------
// CPU features and AMX permission.

static bool os_saves(uint64_t mask) {
    unsigned a, b, c, d;
    __cpuid(1, a, b, c, d);
    if (!(c & (1u << 27))) return false;  // OSXSAVE
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((((uint64_t)hi << 32) | lo) & mask) == mask;
}

static int detect_features() {  // bit 0 avx2+fma, 1 avx512-bf16, 2 amx-bf16, 3 avx512-vnni+vbmi
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, nullptr) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    unsigned b7 = b, c7 = c, d7 = d;
    __cpuid_count(7, 1, a, b, c, d);
    unsigned a71 = a;
    __cpuid(1, a, b, c, d);
    int f = 0;
    bool ymm = os_saves(0x6), zmm = os_saves(0xe6);
    if ((b7 & (1u << 5)) && (c & (1u << 12)) && ymm) f |= 1;
    const unsigned avx512 = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31);  // F, DQ, BW, VL
    if ((b7 & avx512) == avx512 && (a71 & (1u << 5)) && zmm) f |= 2;
    if ((d7 & (1u << 22)) && (d7 & (1u << 24)) && (f & 2) && os_saves(0x60000ull | 0xe6)) f |= 4;
    if ((c7 & (1u << 11)) && (c7 & (1u << 1)) && (f & 2)) f |= 8;  // VNNI and VBMI (vpermt2b)
    return f;
}

static int cpu_features() {  // cpuid is slow under a hypervisor (a VM exit): once per process
    static const int f = detect_features();
    return f;
}

static int amx_permitted() {  // the kernel hands out tile data state only on request, once per process
    static int ok = -1;
    if (ok < 0) {
        const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
    return ok;
}

// ---------------------------------------------------------------------------------------------------
// The call.

struct Scratch {
    std::vector<char> buf;
    char* get(size_t n) {
        if (buf.size() < n + 64) buf.resize(n + 64);
        return (char*)(((uintptr_t)buf.data() + 63) & ~(uintptr_t)63);
    }
};

static std::mutex g_call;
static Pool g_pool("moeflow-expert");
static std::vector<Scratch> g_thread_acc;   // down by columns: [n, 256] sums
static std::vector<Scratch> g_thread_tiles; // AMX: each thread's weight tiles and sums (amx_scratch_bytes)

static inline size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static double g_phase_s[3];  // the last call: preparation, gate/up, down (seconds)

static inline double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Streaming reads, scalar (avx2::read and avx512::read are the vector ones): the read ceiling the kernel is
// held against (moe_read).
static uint64_t read64(const char* p, size_t n) {
    uint64_t acc = 0, v;
    for (size_t i = 0; i + 8 <= n; i += 8) std::memcpy(&v, p + i, 8), acc ^= v;
    return acc;
}

extern "C" {

int moe_features() { return cpu_features(); }

int moe_amx_ready() { return (cpu_features() & 4) && amx_permitted(); }

void moe_last_phases(double* s) { std::memcpy(s, g_phase_s, sizeof(g_phase_s)); }

// Seconds of each of `reps` passes of `threads` threads reading p[0:bytes] (a slice each) into secs.
void moe_read(int threads, const char* p, int64_t bytes, int reps, double* secs) {
    std::lock_guard<std::mutex> lock(g_call);
    const int feat = cpu_features();
    std::vector<double> sink(std::max(threads, 1));  // a value of what each thread read, so the loads stay
    auto pass = [&](int id, int nt) {
        const size_t a = (size_t)bytes * id / nt / 64 * 64, e = (size_t)bytes * (id + 1) / nt / 64 * 64;
        sink[id] = (feat & 2) ? avx512::read(p + a, e - a) : (feat & 1) ? avx2::read(p + a, e - a)
                                                           : (double)read64(p + a, e - a);
    };
    for (int r = 0; r < reps; ++r) {
        double t = now_s();
        g_pool.run(std::max(threads, 1), pass);
        secs[r] = now_s() - t;
    }
    static volatile double keep;
    keep = sink[0];
}

}  // extern "C"

#include "cpu_experts_call.inc"
#include "cpu_experts_qcall.inc"

extern "C" {

// Seconds of `threads` threads each running iters rounds of four tile dot products (32768 flops each), their
// operands loaded from a per-thread buffer of span bytes (L1- or L2-sized): never (loads 0: the tile units'
// peak), four before the four products (1), in the AMX path's order (2), and with its sums stored and reloaded
// every 16 rounds (3). -2 where this CPU has no AMX.
double moe_amx_peak(int threads, int64_t iters, int loads, int64_t span) {
    if (!((cpu_features() & 4) && amx_permitted())) return -2;
    std::lock_guard<std::mutex> lock(g_call);
    threads = std::max(threads, 1);
    std::vector<std::unique_ptr<char[]>> bufs(threads);
    const size_t bytes = std::max<size_t>((size_t)span, 4096) + 64;
    for (auto& b : bufs) {
        b.reset(new char[bytes]);
        uint32_t r = 12345;  // random bf16 in about [-2, 2], as weights are (not one repeated value)
        for (size_t i = 0; i + 2 <= bytes; i += 2) {
            r = r * 1664525u + 1013904223u;
            const bf16 v = f2bf(((int)(r >> 8) % 4096 - 2048) / 1024.0f);
            std::memcpy(b.get() + i, &v, 2);
        }
    }
    std::vector<double> sink(threads);
    auto work = [&](int id, int) {
        char* p = (char*)(((uintptr_t)bufs[id].get() + 63) & ~(uintptr_t)63);
        sink[id] = amx_hw::peak(iters, loads, p, bytes - 64);
    };
    g_pool.run(threads, work);  // warm-up: wakes the workers and grants the tile state
    const double t = now_s();
    g_pool.run(threads, work);
    return now_s() - t;
}

// The same from a router's choice: ids [N, K] int64 (an id outside 0..E-1 is skipped), weights [N, K] fp32.
// Groups the (token, slot) pairs by expert here, so a layer costs Python one call. qfmt: moe_experts_q's format
// (w then points at quantized records), or null for bf16 blocks.
int moe_experts_topk(int kernel, int threads, const void* w, int64_t expert_stride, int H, int I, const float* x,
                     int N, int K, int E, const int64_t* ids, const float* weights, float* out, const int64_t* opts,
                     const int64_t* qfmt) {
    std::vector<int32_t> count(E + 1, 0), job_expert, job_r0, job_r1, job_off{0}, tok(N * K);
    std::vector<float> tok_w(N * K);
    for (int i = 0; i < N * K; ++i)
        if (ids[i] >= 0 && ids[i] < E) ++count[ids[i] + 1];
    for (int e = 0; e < E; ++e) {
        if (count[e + 1]) {
            job_expert.push_back(e), job_r0.push_back(0), job_r1.push_back(I);
            job_off.push_back(job_off.back() + count[e + 1]);
        }
        count[e + 1] += count[e];  // now: where expert e's pairs start
    }
    for (int i = 0; i < N * K; ++i)
        if (ids[i] >= 0 && ids[i] < E) {
            int at = count[ids[i]]++;
            tok[at] = i / K, tok_w[at] = weights[i];
        }
    if (qfmt)
        return moe_experts_q(kernel, threads, (const uint8_t*)w, expert_stride, H, I, x, N, (int)job_expert.size(),
                             job_expert.data(), job_r0.data(), job_r1.data(), job_off.data(), tok.data(),
                             tok_w.data(), out, opts, qfmt);
    return moe_experts(kernel, threads, (const bf16*)w, expert_stride, H, I, x, N, (int)job_expert.size(),
                       job_expert.data(), job_r0.data(), job_r1.data(), job_off.data(), tok.data(), tok_w.data(),
                       out, opts);
}

}  // extern "C"

#include "cpu_experts_async.inc"
