// Decode attention on the CPU over a host KV cache (the pipeline engine's, MoE-Lightning arXiv 2411.11217):
// one query token per sequence, grouped-query heads, fp32 or bf16 K/V, q and output, fp32 math. The kernel
// also writes each sequence's new K/V row, so the caller makes one call per micro-batch. Work is split over
// sequences (a sequence's KV heads too when sequences are fewer than threads), taken in turn by the threads;
// each unit reads its K and V rows once, in position order (as llama.cpp's CPU flash-attention decode does
// per head; the rows of one position are adjacent here, so a whole sequence streams).
// The body (csrc/cpu_attention_body.inc) is compiled for AVX-512, AVX2 + FMA and scalar, chosen at run time.
// Legend: B = sequences, Hq/Hkv = heads, D = head dim, P = arena positions, W = floats per vector.
#include <immintrin.h>

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

// The expert kernel's thread pool (its own copy in this library): a call per micro-batch wakes sleeping
// workers where starting threads cost about as much as a small micro-batch's attention.
#include "cpu_experts_pool.inc"

Pool g_pool("moeflow-attn");
std::mutex g_pool_lock;  // one call at a time in the pool (callers on several threads take turns)

enum Kernel { SCALAR = 0, AVX2 = 1, AVX512 = 2, AVX512BF16 = 3 };

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void store_as(float* p, float x) { *p = x; }
inline void store_as(uint16_t* p, float x) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &x, 4);
  *p = uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

struct Args {
  const void* q;                 // [B, Hq, D] fp32 or bf16
  void *k, *v;                   // [P, Hkv, D] arenas; sequence b's run starts at position runs[b]
  const void *k_new, *v_new;     // [B, Hkv, D] in the arenas' dtype, written at runs[b] + starts[b]; or null
  const int32_t *runs, *starts;  // per sequence: its run, and the new token's position in it
  int window;                    // attend to the last `window` positions; 0: all
  int B, Hq, Hkv, D;
  float scale;
  void* out;                     // [B, Hq, D] fp32 or bf16
  int kv_bf16, q_bf16, out_bf16;
  const float* sinks;            // [Hq]: a logit per head that joins each softmax and adds no value; or null
};

}  // namespace

namespace scalar {
struct Vec {
  using V = float;
  static constexpr int W = 1;
  static constexpr int TILE = 1;  // K rows per score tile, V vectors per accumulation tile (registers)
  static constexpr bool BF16_DOT = false;  // bf16 scores by vdpbf16ps (avx512bf16::Vec)
  static V zero() { return 0.f; }
  static V set1(float x) { return x; }
  static V load(const float* p) { return *p; }
  static V load(const uint16_t* p) { return bf16_to_f32(*p); }
  static void store(float* p, V v) { *p = v; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static float sum(V v) { return v; }
  static void sum4(V a, V b, V c, V d, float* r) { r[0] = a, r[1] = b, r[2] = c, r[3] = d; }
  static V exp(V x) { return std::exp(x); }
};
#include "cpu_attention_body.inc"
}  // namespace scalar

// exp(x) for x <= 0: 2^n * e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its Taylor series to r^6
// (relative error ~1e-7); below -87 the result is the smallest normal's neighbourhood, as exp's is ~0.
#define EXP_POLY(FMA, SET1, r)                                                                                   \
  FMA(FMA(FMA(FMA(FMA(FMA(SET1(1.f / 720), r, SET1(1.f / 120)), r, SET1(1.f / 24)), r, SET1(1.f / 6)), r,    \
                  SET1(0.5f)), r, SET1(1.f)), r, SET1(1.f))

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct Vec {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int TILE = 2;  // 4 heads x 2: 8 accumulators of 16 ymm
  static constexpr bool BF16_DOT = false;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const uint16_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static float sum(V v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
  }
  static void sum4(V a, V b, V c, V d, float* r) {
    const V abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // [a b c d] in each half
    _mm_storeu_ps(r, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
  }
  static V exp(V x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    const V n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    const V p = EXP_POLY(_mm256_fmadd_ps, _mm256_set1_ps, r);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
};
#include "cpu_attention_body.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {
struct Vec {
  using V = __m512;
  static constexpr int W = 16;
  static constexpr int TILE = 4;  // 4 heads x 4: 16 accumulators of 32 zmm
  static constexpr bool BF16_DOT = false;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
  static __m256 half(V v) {  // its two halves added
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
  static void sum4(V a, V b, V c, V d, float* r) { avx2::Vec::sum4(half(a), half(b), half(c), half(d), r); }
  static V exp(V x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    return _mm512_scalef_ps(EXP_POLY(_mm512_fmadd_ps, _mm512_set1_ps, r), n);
  }
};
#include "cpu_attention_body.inc"
}  // namespace avx512
#pragma GCC pop_options

// AVX-512 with the bf16 dot product: bf16 q . bf16 K rows two products per lane and instruction (exact in fp32),
// where K/V and q are bf16; the rest as avx512.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")
namespace avx512bf16 {
alignas(64) constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                   8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
struct Vec : avx512::Vec {
  static constexpr bool BF16_DOT = true;
  using B = __m512i;  // 32 bf16
  static B loadb(const uint16_t* p) { return _mm512_loadu_si512(p); }
  static V dotb(V acc, B a, B b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
  static B interleave(const uint16_t* a, const uint16_t* b) {  // a0 b0 a1 b1 ... a15 b15
    const __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
    return _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), ab);
  }
  static B pair(const uint16_t* p) {  // (p[0], p[1]) in every 32-bit lane
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
};
#include "cpu_attention_body.inc"
}  // namespace avx512bf16
#pragma GCC pop_options

extern "C" {

// Bit 1: AVX2 + FMA, bit 2: AVX-512F, bit 4: AVX-512 with BF16 (and BW, VL).
int attn_features() {
  __builtin_cpu_init();
  const bool bf16 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0) |
         (__builtin_cpu_supports("avx512f") ? 2 : 0) | (bf16 ? 4 : 0);
}

// kernel: 0 scalar, 1 AVX2, 2 AVX-512, 3 AVX-512 with BF16; *_bf16: that tensor in bf16 (else fp32); k_new/v_new may be null (no
// write); sinks [Hq] fp32 or null (GPT-OSS). Returns 0, or -1 on bad arguments.
int attn_decode(int kernel, int threads, int kv_bf16, int q_bf16, int out_bf16, const void* q, void* k, void* v,
                const void* k_new, const void* v_new, const int32_t* runs, const int32_t* starts, int window,
                int B, int Hq, int Hkv, int D, float scale, void* out, const float* sinks) {
  if (B < 0 || Hkv <= 0 || Hq % Hkv != 0 || D <= 0 || window < 0 || (k_new == nullptr) != (v_new == nullptr))
    return -1;
  for (int b = 0; b < B; ++b)
    if (starts[b] < 0 || runs[b] < 0) return -1;
  const Args a{q, k, v, k_new, v_new, runs, starts, window, B, Hq, Hkv, D, scale, out, kv_bf16, q_bf16, out_bf16,
               sinks};
  if (kernel == AVX512BF16) avx512bf16::decode(a, threads);
  else if (kernel == AVX512) avx512::decode(a, threads);
  else if (kernel == AVX2) avx2::decode(a, threads);
  else scalar::decode(a, threads);
  return 0;
}
}
