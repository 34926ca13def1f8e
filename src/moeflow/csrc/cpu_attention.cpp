// Decode attention on the CPU over a host KV cache (the pipeline engine's, MoE-Lightning arXiv 2411.11217):
// one query token per sequence, grouped-query heads, fp32 or bf16 K/V, fp32 math. Work is split over
// (sequence, KV head) pairs across threads; each pair reads its K/V rows once for the whole query group.
// Dot products and the V accumulation use AVX-512 or AVX2 where the CPU has them (chosen at run time), else scalar.
// Legend: B = sequences, Hq/Hkv = heads, G = Hq / Hkv, D = head dim, T = attended positions.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

enum Kernel { SCALAR = 0, AVX2 = 1, AVX512 = 2 };

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename KV>
inline float load(const KV* p, int i);
template <>
inline float load<float>(const float* p, int i) { return p[i]; }
template <>
inline float load<uint16_t>(const uint16_t* p, int i) { return bf16_to_f32(p[i]); }

// -- q . k and acc += w * v over D, per instruction set ---------------------------------------------------------
template <typename KV>
float dot_scalar(const float* q, const KV* k, int D) {
  float s = 0.f;
  for (int i = 0; i < D; ++i) s += q[i] * load(k, i);
  return s;
}
template <typename KV>
void axpy_scalar(float* acc, float w, const KV* v, int D) {
  for (int i = 0; i < D; ++i) acc[i] += w * load(v, i);
}

__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <typename KV>
__attribute__((target("avx2,fma"))) float dot_avx2(const float* q, const KV* k, int D) {
  __m256 s = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= D; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), s);
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  r = _mm_hadd_ps(r, r);
  r = _mm_hadd_ps(r, r);
  float out = _mm_cvtss_f32(r);
  for (; i < D; ++i) out += q[i] * load(k, i);
  return out;
}
template <typename KV>
__attribute__((target("avx2,fma"))) void axpy_avx2(float* acc, float w, const KV* v, int D) {
  __m256 wv = _mm256_set1_ps(w);
  int i = 0;
  for (; i + 8 <= D; i += 8) _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(wv, load8(v + i), _mm256_loadu_ps(acc + i)));
  for (; i < D; ++i) acc[i] += w * load(v, i);
}

__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 load16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <typename KV>
__attribute__((target("avx512f"))) float dot_avx512(const float* q, const KV* k, int D) {
  __m512 s = _mm512_setzero_ps();
  int i = 0;
  for (; i + 16 <= D; i += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + i), s);
  float out = _mm512_reduce_add_ps(s);
  for (; i < D; ++i) out += q[i] * load(k, i);
  return out;
}
template <typename KV>
__attribute__((target("avx512f"))) void axpy_avx512(float* acc, float w, const KV* v, int D) {
  __m512 wv = _mm512_set1_ps(w);
  int i = 0;
  for (; i + 16 <= D; i += 16)
    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(wv, load16(v + i), _mm512_loadu_ps(acc + i)));
  for (; i < D; ++i) acc[i] += w * load(v, i);
}

struct Args {
  const float* q;  // [B, Hq, D]
  const void* k;   // [S, Tmax, Hkv, D]
  const void* v;
  int64_t slot_stride;  // elements between slots
  const int32_t *slots, *firsts, *ends;  // per sequence: slot, first and one-past-last attended position
  int B, Hq, Hkv, D;
  float scale;
  float* out;  // [B, Hq, D]
};

// One (sequence, KV head) pair: its G query heads over positions [first, end).
template <typename KV, float (*DOT)(const float*, const KV*, int), void (*AXPY)(float*, float, const KV*, int)>
void pair(const Args& a, int b, int h, std::vector<float>& p) {
  const int G = a.Hq / a.Hkv, D = a.D, first = a.firsts[b], T = a.ends[b] - first;
  const int64_t row = int64_t(a.Hkv) * D;
  const KV* K = static_cast<const KV*>(a.k) + a.slots[b] * a.slot_stride + int64_t(first) * row + int64_t(h) * D;
  const KV* V = static_cast<const KV*>(a.v) + a.slots[b] * a.slot_stride + int64_t(first) * row + int64_t(h) * D;
  p.resize(size_t(T));
  for (int g = 0; g < G; ++g) {
    const int hq = h * G + g;
    const float* q = a.q + (int64_t(b) * a.Hq + hq) * D;
    float m = -INFINITY;
    for (int t = 0; t < T; ++t) m = std::max(m, p[t] = DOT(q, K + t * row, D) * a.scale);
    float sum = 0.f;
    for (int t = 0; t < T; ++t) sum += p[t] = std::exp(p[t] - m);
    float* o = a.out + (int64_t(b) * a.Hq + hq) * D;
    std::fill(o, o + D, 0.f);
    for (int t = 0; t < T; ++t) AXPY(o, p[t] / sum, V + t * row, D);
  }
}

template <typename KV, float (*DOT)(const float*, const KV*, int), void (*AXPY)(float*, float, const KV*, int)>
void run(const Args& a, int threads) {
  const int pairs = a.B * a.Hkv;
  threads = std::max(1, std::min(threads, pairs));
  auto work = [&](int w) {
    std::vector<float> p;
    for (int i = w; i < pairs; i += threads) pair<KV, DOT, AXPY>(a, i / a.Hkv, i % a.Hkv, p);
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < threads; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& t : pool) t.join();
}

template <typename KV>
int dispatch(int kernel, const Args& a, int threads) {
  if (kernel == AVX512) run<KV, dot_avx512<KV>, axpy_avx512<KV>>(a, threads);
  else if (kernel == AVX2) run<KV, dot_avx2<KV>, axpy_avx2<KV>>(a, threads);
  else run<KV, dot_scalar<KV>, axpy_scalar<KV>>(a, threads);
  return 0;
}

}  // namespace

extern "C" {

// Bit 1: AVX2 + FMA, bit 2: AVX-512F.
int attn_features() {
  __builtin_cpu_init();
  return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0) |
         (__builtin_cpu_supports("avx512f") ? 2 : 0);
}

// kernel: 0 scalar, 1 AVX2, 2 AVX-512; bf16: K/V in bf16 (else fp32). Returns 0, or -1 on bad arguments.
int attn_decode(int kernel, int threads, int bf16, const float* q, const void* k, const void* v, int64_t slot_stride,
                const int32_t* slots, const int32_t* firsts, const int32_t* ends, int B, int Hq, int Hkv, int D,
                float scale, float* out) {
  if (B < 0 || Hkv <= 0 || Hq % Hkv != 0 || D <= 0) return -1;
  Args a{q, k, v, slot_stride, slots, firsts, ends, B, Hq, Hkv, D, scale, out};
  return bf16 ? dispatch<uint16_t>(kernel, a, threads) : dispatch<float>(kernel, a, threads);
}
}
