// nxcore::decode_attention on CPU: attention of a few new queries per row over each row's slot of
// the static KV cache, read in place.
//
// Why: decode attention gathered every row's K and V out of the cache before its two matmuls
// (`index_select` of a length-sliced, hence non-contiguous, cache). Here each (row, KV head) task
// reads its slot's keys and values in place, once, for all the query heads of its group and all
// new positions. With bf16 and head_dim a multiple of 32 on AVX512-BF16, q.k runs on bf16
// dot-product instructions, 16 keys' scores are reduced together and exp is vectorized.
// Measured on the 512x8 peers model at batch 32 (bf16, KV bucket 256), per layer: 0.39 ms, where
// the generic loops below take 0.7-1.1 ms and the torch.compile'd gather and matmuls 3.4 ms. The
// compiled batch-32 decode step went from 16.9-19.2 to 15.0-15.6 ms, the eager one from 34 to 23.
//
// Semantics are those of the Python path (`Attention._attend` after `KVCache.gather`): scores
// q.k * scale, masked positions set to the lowest finite value (an all-masked padding row gets a
// uniform average, never NaN), softmax in float32, then the weighted sum of values. All sums are
// in float32; the output is rounded once to q's dtype.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_features.h"
#include "vec_exp.h"

#ifdef NXCORE_X86_GNU
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

#define NXCORE_INLINE inline __attribute__((always_inline))

NXCORE_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

NXCORE_INLINE void axpy(float* y, float a, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <typename T>
NXCORE_INLINE void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// bfloat16 is the top half of a float32: a shift the compiler vectorizes.
template <>
NXCORE_INLINE void to_float<at::BFloat16>(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits_in = reinterpret_cast<const uint16_t*>(src);
  uint32_t* bits = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) bits[i] = static_cast<uint32_t>(bits_in[i]) << 16;
}

template <typename T>
struct Problem {
  const T* q;
  const T* k;
  const T* v;
  const int64_t* slots;
  const bool* mask;
  T* out;
  int64_t H, Tq, D, KV, S, G, Q;
  int64_t ks0, ks1, ks2, vs0, vs1, vs2;
  float scale;

  // Query i = g * Tq + t of task (row b, KV head h) is head h * G + g at new position t.
  int64_t query_offset(int64_t b, int64_t h, int64_t i) const { return ((b * H + h * G + i / Tq) * Tq + i % Tq) * D; }
  const bool* mask_row(int64_t b, int64_t i) const { return mask + (b * Tq + i % Tq) * S; }
  const T* keys(int64_t b, int64_t h) const { return k + slots[b] * ks0 + h * ks1; }
  const T* values(int64_t b, int64_t h) const { return v + slots[b] * vs0 + h * vs1; }

  // The task's Q output rows from float32 accumulators [Q, D], rounded once.
  void store(int64_t b, int64_t h, const float* acc) const {
    for (int64_t i = 0; i < Q; ++i) {
      T* dst = out + query_offset(b, h, i);
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[i * D + d]);
    }
  }
};

// Tasks [begin, end) of (row, KV head): the query heads of the group at every new position attend
// over the row's slot, read in place. The scratch buffers are the caller's (one set per thread).
// Keys [0, n) a query reads: up to its last allowed key; S when it may read none. The keys past it
// are masked, so skipping them only skips exact zeros of the softmax and of the weighted sum. The
// kernels' order of additions then depends on the mask alone, never on S (the KV bucket) or the
// number of queries, which batch-invariant mode relies on; and no work goes to stale or future keys.
NXCORE_INLINE int64_t keys_used(const bool* mask_row, int64_t S) {
  int64_t last = S - 1;
  while (last >= 0 && !mask_row[last]) --last;
  return last < 0 ? S : last + 1;
}

template <typename T>
NXCORE_INLINE void attend(const Problem<T>& p, int64_t begin, int64_t end, float* qf, float* row, float* scores,
                          float* acc, int64_t* lim) {
  const float lowest = std::numeric_limits<float>::lowest();
  const int64_t D = p.D, S = p.S, Q = p.Q;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / p.KV, h = task % p.KV;
    const T* keys = p.keys(b, h);
    const T* values = p.values(b, h);
    int64_t longest = 0;
    for (int64_t i = 0; i < Q; ++i) {
      to_float(p.q + p.query_offset(b, h, i), qf + i * D, D);
      lim[i] = keys_used(p.mask_row(b, i), S);
      longest = std::max(longest, lim[i]);
    }
    for (int64_t s = 0; s < longest; ++s) {
      to_float(keys + s * p.ks2, row, D);
      for (int64_t i = 0; i < Q; ++i) {
        scores[i * S + s] = s < lim[i] && p.mask_row(b, i)[s] ? dot(qf + i * D, row, D) * p.scale : lowest;
      }
    }
    for (int64_t i = 0; i < Q; ++i) {
      float* sc = scores + i * S;
      const int64_t L = lim[i];
      float peak = lowest;
      for (int64_t s = 0; s < L; ++s) peak = std::max(peak, sc[s]);
      float total = 0.f;
      for (int64_t s = 0; s < L; ++s) total += (sc[s] = std::exp(sc[s] - peak));
      const float inv = 1.f / total;
      for (int64_t s = 0; s < L; ++s) sc[s] *= inv;
      std::fill(sc + L, sc + S, 0.f);
    }
    std::fill(acc, acc + Q * D, 0.f);
    for (int64_t s = 0; s < longest; ++s) {
      to_float(values + s * p.vs2, row, D);
      for (int64_t i = 0; i < Q; ++i) {
        const float w = scores[i * S + s];
        if (w != 0.f) axpy(acc + i * D, w, row, D);
      }
    }
    p.store(b, h, acc);
  }
}

// The same loops compiled for AVX-512 (picked at run time) and for the build's baseline ISA.
#ifdef NXCORE_X86_GNU
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")))
void attend_avx512(const Problem<T>& p, int64_t begin, int64_t end, float* qf, float* row, float* scores, float* acc,
                   int64_t* lim) {
  attend(p, begin, end, qf, row, scores, acc, lim);
}
#endif

template <typename T>
void attend_baseline(const Problem<T>& p, int64_t begin, int64_t end, float* qf, float* row, float* scores, float* acc,
                     int64_t* lim) {
  attend(p, begin, end, qf, row, scores, acc, lim);
}

#ifdef NXCORE_X86_GNU
#define NXCORE_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// Lane j of the result is the sum of the 16 lanes of v[j]: 15 shuffle-and-add steps for 16 keys
// instead of a horizontal reduction per key.
NXCORE_AVX512_BF16 NXCORE_INLINE __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j)  // 512 -> 256 bits: [v2j | v2j+1]
    a[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44), _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
  for (int j = 0; j < 4; ++j)  // 256 -> 128 bits: quarter k holds v4j+k
    b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x88), _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xDD));
  for (int j = 0; j < 2; ++j)  // 128 -> 64 bits, interleaving v8j+k and v8j+4+k
    c[j] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * j], b[2 * j + 1]), _mm512_unpackhi_ps(b[2 * j], b[2 * j + 1]));
  // 64 -> 32 bits: lane 4k + m holds v(4m + k); put it back in key order
  const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x44), _mm512_shuffle_ps(c[0], c[1], 0xEE));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, d);
}

// Software prefetch distance of the key and value streams (each task reads its slot's keys front
// to back, then its values: two short streams the hardware prefetcher keeps restarting on). On an
// Intel Xeon with AMX, 2 threads, 32 rows of 12 heads over 4 KV heads of 64, bf16, 12 layers'
// caches (/tmp harness, alternating runs): 2 KiB ahead (16 keys) took 3.4-3.7 / 7.2-8.0 / 11.6-12.7
// ms per 12 layers at 140 / 300 / 480 positions against 3.8-4.0 / 9.2-9.8 / 14.5-15.8 without;
// 1 and 3 KiB were in between, 4 KiB no better than none. The keys are prefetched by the first
// query's pass only: the group's other heads find them in cache.
constexpr int64_t kPf = 2048;

// The lines of one cache row (key or value, D bf16 elements) kPf bytes further on.
NXCORE_INLINE void prefetch_ahead(const at::BFloat16* row, int64_t D) {
  const char* at = reinterpret_cast<const char*>(row) + kPf;
  for (int64_t off = 0; off < D * 2; off += 64) _mm_prefetch(at + off, _MM_HINT_T0);
}

// The next task's key and value rows, brought into L2 while this task computes: one row of each
// per key this task reads (its first query's scores pass issues the keys, its weighted-sum pass the
// values), so the loads spread over the task instead of stalling on a burst, and each task starts
// on rows already near. Without it every task began two cold streams: on an AMD EPYC (Zen 4,
// 32 rows of 8 query over 4 KV heads of 64, 130-200 positions, bf16, 16 layers' caches cycled, one
// thread; /tmp harness, alternating rounds over three runs) 594-714 us a layer against 386-498 with it; two
// threads and 12 query heads 497-507 against 382-465. Two or four tasks ahead measured no better.
struct NextRows {
  const at::BFloat16* keys = nullptr;
  const at::BFloat16* values = nullptr;
  int64_t ks = 0, vs = 0, n = 0;  // row strides, and the rows that task reads

  NXCORE_INLINE static void to_l2(const at::BFloat16* row, int64_t D) {
    const char* at = reinterpret_cast<const char*>(row);
    for (int64_t off = 0; off < D * 2; off += 64) _mm_prefetch(at + off, _MM_HINT_T1);
  }
  NXCORE_INLINE void key(int64_t s, int64_t D) const {
    if (s < n) to_l2(keys + s * ks, D);
  }
  NXCORE_INLINE void value(int64_t s, int64_t D) const {
    if (s < n) to_l2(values + s * vs, D);
  }
};

// acc[i * D + 16 * c] += scores[i * S + s] * value[s][16 * c ...] for the QN queries from `scores` and
// `acc` on, over keys s < longest, CH vectors of 16 floats per value row (D = 16 * CH): the
// accumulators stay in registers for the whole pass, where the loop over memory below loads and
// stores them for every key (a store-to-load chain per key). The same fused multiply-adds in the
// same order, so the same bits. Measured on an Intel Xeon with AMX (batch 32, 12 query over 4 KV
// heads of 64, 12 layers' caches, /tmp harness, two alternating runs each): 2.6-2.8 / 5.7-6.8 ms
// at 140 / 300 positions on two threads against 3.3-3.5 / 7.0-7.5 with the loop over memory; on one
// thread 5.3-6.5 / 15.6-15.9 against 6.2-6.7 / 16.2-16.7. The compiled batch-32 decode step of the
// small llama moved within its run-to-run noise (21.3-23.6 ms either way).
template <int CH, int QN>
NXCORE_AVX512_BF16 void weighted_values(const at::BFloat16* values, int64_t vs2, int64_t longest, const float* scores, int64_t S,
                                        float* acc, bool prefetch, const NextRows* next) {
  __m512 a[QN][CH];
  for (int q = 0; q < QN; ++q)
    for (int c = 0; c < CH; ++c) a[q][c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < longest; ++s) {
    const at::BFloat16* vr = values + s * vs2;
    if (prefetch) prefetch_ahead(vr, 16 * CH);
    if (next) next->value(s, 16 * CH);
    __m512 vf[CH];
    for (int c = 0; c < CH; ++c)
      vf[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr + 16 * c))), 16));
    for (int q = 0; q < QN; ++q) {
      const float w = scores[q * S + s];
      if (w == 0.f) continue;
      const __m512 wv = _mm512_set1_ps(w);
      for (int c = 0; c < CH; ++c) a[q][c] = _mm512_fmadd_ps(wv, vf[c], a[q][c]);
    }
  }
  for (int q = 0; q < QN; ++q)
    for (int c = 0; c < CH; ++c) _mm512_storeu_ps(acc + q * 16 * CH + 16 * c, a[q][c]);
}

// The weighted sum of values for all Q queries with register accumulators, in groups of up to
// 16 / CH queries (at most 4); the first group also prefetches the next task's values.
template <int CH>
NXCORE_AVX512_BF16 void weighted_values_by_group(const at::BFloat16* values, int64_t vs2, int64_t longest, const float* scores,
                                                 int64_t S, float* acc, int64_t Q, const NextRows& next) {
  constexpr int G = std::min(4, 16 / CH);
  for (int64_t i0 = 0; i0 < Q; i0 += G) {
    const float* sc = scores + i0 * S;
    float* ac = acc + i0 * 16 * CH;
    const bool first = i0 == 0;  // later groups find the values in cache
    switch (std::min<int64_t>(G, Q - i0)) {
      case 1: weighted_values<CH, 1>(values, vs2, longest, sc, S, ac, first, first ? &next : nullptr); break;
      case 2: if constexpr (G >= 2) weighted_values<CH, 2>(values, vs2, longest, sc, S, ac, first, first ? &next : nullptr); break;
      case 3: if constexpr (G >= 3) weighted_values<CH, 3>(values, vs2, longest, sc, S, ac, first, first ? &next : nullptr); break;
      default: if constexpr (G >= 4) weighted_values<CH, 4>(values, vs2, longest, sc, S, ac, first, first ? &next : nullptr); break;
    }
  }
}

// Whether the weighted sum ran with register accumulators: false where D is not 32, 64 or 128
// (the caller's loop over memory runs then).
NXCORE_AVX512_BF16 bool weighted_values_in_registers(const at::BFloat16* values, int64_t vs2, int64_t longest, const float* scores,
                                                     int64_t S, float* acc, int64_t Q, int64_t D, const NextRows& next) {
  switch (D) {
    case 32: weighted_values_by_group<2>(values, vs2, longest, scores, S, acc, Q, next); return true;
    case 64: weighted_values_by_group<4>(values, vs2, longest, scores, S, acc, Q, next); return true;
    case 128: weighted_values_by_group<8>(values, vs2, longest, scores, S, acc, Q, next); return true;
    default: return false;
  }
}

// The bf16 loops for head_dim a multiple of 32: q.k with bf16 dot-product instructions, 16 keys'
// scores reduced together, a vector exp, and values widened to float32 once per key.
NXCORE_AVX512_BF16 void attend_bf16_avx512(const Problem<at::BFloat16>& p, int64_t begin, int64_t end, float* scores,
                                           float* acc) {
  const float lowest = std::numeric_limits<float>::lowest();
  const int64_t D = p.D, S = p.S, Q = p.Q, chunks = D / 32;
  const __m512 scale = _mm512_set1_ps(p.scale);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / p.KV, h = task % p.KV;
    const at::BFloat16* keys = p.keys(b, h);
    const at::BFloat16* values = p.values(b, h);
    NextRows next;
    if (task + 1 < end) {
      const int64_t nb = (task + 1) / p.KV, nh = (task + 1) % p.KV;
      next = {p.keys(nb, nh), p.values(nb, nh), p.ks2, p.vs2, 0};
      for (int64_t i = 0; i < Q; ++i) next.n = std::max(next.n, keys_used(p.mask_row(nb, i), S));
    }
    int64_t longest = 0;  // keys any query of the task reads
    int64_t first = 0;    // and the first query (whose pass prefetched the next task's keys)
    for (int64_t i = 0; i < Q; ++i) {
      const at::BFloat16* qi = p.q + p.query_offset(b, h, i);
      const bool* mi = p.mask_row(b, i);
      float* si = scores + i * S;
      // Keys [0, E) are read (see keys_used): whole blocks of 16 up to V, then one by one.
      const int64_t E = keys_used(mi, S), V = E / 16 * 16;
      longest = std::max(longest, E);
      if (i == 0) first = E;
      __m512bh qv[8];
      for (int64_t c = 0; c < chunks; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(qi + 32 * c);
      for (int64_t s0 = 0; s0 < V; s0 += 16) {
        __m512 part[16];
        for (int j = 0; j < 16; ++j) {
          const at::BFloat16* kr = keys + (s0 + j) * p.ks2;
          if (i == 0) {
            prefetch_ahead(kr, D);
            next.key(s0 + j, D);
          }
          __m512 a = _mm512_setzero_ps();
          for (int64_t c = 0; c < chunks; ++c) a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(kr + 32 * c), qv[c]);
          part[j] = a;
        }
        const __mmask16 keep = _mm_cmpneq_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mi + s0)),
                                                     _mm_setzero_si128());
        _mm512_storeu_ps(si + s0, _mm512_mask_blend_ps(keep, _mm512_set1_ps(lowest), _mm512_mul_ps(hsum16(part), scale)));
      }
      for (int64_t s = V; s < E; ++s) {
        const at::BFloat16* kr = keys + s * p.ks2;
        __m512 a = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(kr + 32 * c), qv[c]);
        si[s] = mi[s] ? _mm512_reduce_add_ps(a) * p.scale : lowest;
      }
      // softmax over the E scores read; the rest weigh exactly 0
      __m512 peak = _mm512_set1_ps(lowest);
      for (int64_t s0 = 0; s0 < V; s0 += 16) peak = _mm512_max_ps(peak, _mm512_loadu_ps(si + s0));
      float top = _mm512_reduce_max_ps(peak);
      for (int64_t s = V; s < E; ++s) top = std::max(top, si[s]);
      const __m512 topv = _mm512_set1_ps(top);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t s0 = 0; s0 < V; s0 += 16) {
        const __m512 e = nxcore::exp16(_mm512_sub_ps(_mm512_loadu_ps(si + s0), topv));
        _mm512_storeu_ps(si + s0, e);
        sum = _mm512_add_ps(sum, e);
      }
      float total = _mm512_reduce_add_ps(sum);
      for (int64_t s = V; s < E; ++s) total += (si[s] = std::exp(si[s] - top));
      const float inv = 1.f / total;
      const __m512 invv = _mm512_set1_ps(inv);
      for (int64_t s0 = 0; s0 < V; s0 += 16) _mm512_storeu_ps(si + s0, _mm512_mul_ps(_mm512_loadu_ps(si + s0), invv));
      for (int64_t s = V; s < E; ++s) si[s] *= inv;
      std::fill(si + E, si + S, 0.f);
    }
    // the next task's keys the first query's blocks of 16 did not reach, and its values past ours
    for (int64_t s = first / 16 * 16; s < next.n; ++s) next.key(s, D);
    for (int64_t s = longest; s < next.n; ++s) next.value(s, D);
    // weighted sum of values: each value row widened once, for every query
    if (weighted_values_in_registers(values, p.vs2, longest, scores, S, acc, Q, D, next)) {
      p.store(b, h, acc);
      continue;
    }
    std::fill(acc, acc + Q * D, 0.f);
    for (int64_t s = 0; s < longest; ++s) {
      const at::BFloat16* vr = values + s * p.vs2;
      prefetch_ahead(vr, D);
      next.value(s, D);
      __m512 vf[16];
      for (int64_t c = 0; c < 2 * chunks; ++c)
        vf[c] = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr + 16 * c))), 16));
      for (int64_t i = 0; i < Q; ++i) {
        const float w = scores[i * S + s];
        if (w == 0.f) continue;
        const __m512 wv = _mm512_set1_ps(w);
        float* ai = acc + i * D;
        for (int64_t c = 0; c < 2 * chunks; ++c)
          _mm512_storeu_ps(ai + 16 * c, _mm512_fmadd_ps(wv, vf[c], _mm512_loadu_ps(ai + 16 * c)));
      }
    }
    p.store(b, h, acc);
  }
}

#endif

template <typename T>
void decode_attention_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& slot_ids, const at::Tensor& mask, double scale, at::Tensor& out) {
  Problem<T> p;
  p.q = q.const_data_ptr<T>();
  p.k = k_cache.const_data_ptr<T>();
  p.v = v_cache.const_data_ptr<T>();
  p.slots = slot_ids.const_data_ptr<int64_t>();
  p.mask = mask.const_data_ptr<bool>();
  p.out = out.mutable_data_ptr<T>();
  p.H = q.size(1), p.Tq = q.size(2), p.D = q.size(3), p.KV = k_cache.size(1), p.S = mask.size(3);
  p.G = p.H / p.KV, p.Q = p.G * p.Tq;
  p.ks0 = k_cache.stride(0), p.ks1 = k_cache.stride(1), p.ks2 = k_cache.stride(2);
  p.vs0 = v_cache.stride(0), p.vs1 = v_cache.stride(1), p.vs2 = v_cache.stride(2);
  p.scale = static_cast<float>(scale);
#ifdef NXCORE_X86_GNU
  const bool avx512 = nxcore::cpu_has_avx512();
  const bool bf16_fast =
      std::is_same_v<T, at::BFloat16> && p.D % 32 == 0 && p.D <= 256 && nxcore::cpu_has_avx512_bf16();
#endif
  at::parallel_for(0, q.size(0) * p.KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(p.Q * p.S), acc(p.Q * p.D);
#ifdef NXCORE_X86_GNU
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (bf16_fast) return attend_bf16_avx512(p, begin, end, scores.data(), acc.data());
    }
#endif
    std::vector<float> qf(p.Q * p.D), row(p.D);  // the generic loops' widened query and key/value rows
    std::vector<int64_t> lim(p.Q);                // and the keys each query reads
#ifdef NXCORE_X86_GNU
    if (avx512) return attend_avx512(p, begin, end, qf.data(), row.data(), scores.data(), acc.data(), lim.data());
#endif
    attend_baseline(p, begin, end, qf.data(), row.data(), scores.data(), acc.data(), lim.data());
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& slot_ids, const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4 && mask.dim() == 4,
              "nxcore::decode_attention: q [B, H, T, D], caches [slots, KV, S, D] and mask [B, 1, T, S], got ",
              q.sizes(), ", ", k_cache.sizes(), ", ", mask.sizes());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k_cache.size(1);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == D && H % KV == 0,
              "nxcore::decode_attention: K/V caches ", k_cache.sizes(), " / ", v_cache.sizes(), " do not fit q ", q.sizes());
  TORCH_CHECK(mask.size(0) == B && mask.size(1) == 1 && mask.size(2) == T && mask.size(3) <= k_cache.size(2),
              "nxcore::decode_attention: mask ", mask.sizes(), " does not fit q ", q.sizes(), " and cache length ",
              k_cache.size(2));
  TORCH_CHECK(slot_ids.dim() == 1 && slot_ids.size(0) == B, "nxcore::decode_attention: slot_ids ", slot_ids.sizes(),
              " for ", B, " rows");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "nxcore::decode_attention: cache dtype ", k_cache.scalar_type(), " differs from q's ", q.scalar_type());
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "nxcore::decode_attention: cache rows must be contiguous");
  const at::Tensor qc = q.contiguous();
  const at::Tensor slots = slot_ids.to(at::kLong).contiguous();
  const at::Tensor m = mask.to(at::kBool).contiguous();
  at::Tensor out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "nxcore::decode_attention", [&] {
    decode_attention_kernel<scalar_t>(qc, k_cache, v_cache, slots, m, scale, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nxcore, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slot_ids, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(nxcore, CPU, m) { m.impl("decode_attention", &decode_attention); }
