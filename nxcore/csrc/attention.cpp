// nxcore::decode_attention on CPU: attention of a few new queries per row over each row's slot of
// the static KV cache, read in place.
//
// Why: decode attention gathered every row's K and V out of the cache before its two matmuls
// (`index_select` of a length-sliced, hence non-contiguous, cache). Here each (row, KV head) task
// reads its slot's keys and values in place, once, for all the query heads of its group and all
// new positions. Measured on the 512x8 peers model at batch 32 (bf16, KV bucket 256): the eager
// decode step went from 34 to 23 ms; compiled steps, where Inductor fuses the gather into its own
// loops, stayed within this machine's noise (16.9-19.2 ms either way). In isolation at that shape
// the op takes 0.7-1.1 ms a layer, the torch.compile'd gather and matmuls 3.4 ms.
//
// Semantics are those of the Python path (`Attention._attend` after `KVCache.gather`): scores
// q.k * scale, masked positions set to the lowest finite value (an all-masked padding row gets a
// uniform average, never NaN), softmax in float32, then the weighted sum of values. All sums are
// in float32; the output is rounded once to q's dtype.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
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
};

// Tasks [begin, end) of (row, KV head): the query heads of the group at every new position attend
// over the row's slot, read in place. The scratch buffers are the caller's (one set per thread).
template <typename T>
NXCORE_INLINE void attend(const Problem<T>& p, int64_t begin, int64_t end, float* qf, float* row, float* scores,
                          float* acc) {
  const float lowest = std::numeric_limits<float>::lowest();
  const int64_t D = p.D, S = p.S, Q = p.Q, Tq = p.Tq;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / p.KV, h = task % p.KV;
    const T* keys = p.k + p.slots[b] * p.ks0 + h * p.ks1;
    const T* values = p.v + p.slots[b] * p.vs0 + h * p.vs1;
    // query i = g * Tq + t is head h * G + g at new position t
    for (int64_t i = 0; i < Q; ++i) {
      const int64_t g = i / Tq, t = i % Tq;
      to_float(p.q + ((b * p.H + h * p.G + g) * Tq + t) * D, qf + i * D, D);
    }
    for (int64_t s = 0; s < S; ++s) {
      to_float(keys + s * p.ks2, row, D);
      for (int64_t i = 0; i < Q; ++i) {
        const bool keep = p.mask[(b * Tq + i % Tq) * S + s];
        scores[i * S + s] = keep ? dot(qf + i * D, row, D) * p.scale : lowest;
      }
    }
    for (int64_t i = 0; i < Q; ++i) {
      float* sc = scores + i * S;
      float peak = lowest;
      for (int64_t s = 0; s < S; ++s) peak = std::max(peak, sc[s]);
      float total = 0.f;
      for (int64_t s = 0; s < S; ++s) total += (sc[s] = std::exp(sc[s] - peak));
      const float inv = 1.f / total;
      for (int64_t s = 0; s < S; ++s) sc[s] *= inv;
    }
    std::fill(acc, acc + Q * D, 0.f);
    for (int64_t s = 0; s < S; ++s) {
      to_float(values + s * p.vs2, row, D);
      for (int64_t i = 0; i < Q; ++i) {
        const float w = scores[i * S + s];
        if (w != 0.f) axpy(acc + i * D, w, row, D);
      }
    }
    for (int64_t i = 0; i < Q; ++i) {
      const int64_t g = i / Tq, t = i % Tq;
      T* dst = p.out + ((b * p.H + h * p.G + g) * Tq + t) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[i * D + d]);
    }
  }
}

// The same loops compiled for AVX-512 (picked at run time) and for the build's baseline ISA.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")))
void attend_avx512(const Problem<T>& p, int64_t begin, int64_t end, float* qf, float* row, float* scores, float* acc) {
  attend(p, begin, end, qf, row, scores, acc);
}

template <typename T>
void attend_baseline(const Problem<T>& p, int64_t begin, int64_t end, float* qf, float* row, float* scores, float* acc) {
  attend(p, begin, end, qf, row, scores, acc);
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

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
  const bool avx512 = cpu_has_avx512();
  at::parallel_for(0, q.size(0) * p.KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(p.Q * p.D), row(p.D), scores(p.Q * p.S), acc(p.Q * p.D);
    if (avx512) {
      attend_avx512(p, begin, end, qf.data(), row.data(), scores.data(), acc.data());
    } else {
      attend_baseline(p, begin, end, qf.data(), row.data(), scores.data(), acc.data());
    }
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
