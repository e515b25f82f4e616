// nxcore::linear_invariant on CPU: y = x @ w.T (+ bias) where every output element is computed
// the same way whatever the number of rows of x, their contents and order: the linear of
// batch-invariant mode (`RuntimeConfig.batch_invariant`, see nxcore/modules/linear.py).
//
// Why its own kernel: oneDNN and BLAS choose their blocking over the inner dimension (and with it
// the order of the float32 additions) from the shape, so a row's bits change with the number of
// rows next to it: the bf16 GEMV of `nxcore::linear` serves 1-2 rows and oneDNN more, MKL picks
// other kernels for other M. Here one micro-kernel shape computes every element:
//
//   acc = 0 (a vector of L float32 lanes); for k in 0, L', 2L', ... (L' = 32 bf16 or 16 float32
//   elements): acc += w[n, k:k+L'] * x[m, k:k+L'] (the tail masked); y[m, n] = sum of acc's lanes
//   (one fixed tree), + bias[n], rounded once to the output dtype.
//
// Tiles of up to 4 rows of x by 4 rows of w share loads, but each (m, n) keeps its own accumulator,
// so its additions do not depend on the tile it lands in; threads split the weight rows, never K.
// Without AVX-512 (other CPUs) a scalar loop in the same spirit (one float32 accumulator, k in
// order) is used: invariant too, slower.
//
// A bf16 weight with a VNNI copy (`_pack_invariant`, made by nxcore.modules.linear.prepack) runs
// `linear_vnni` instead: one float32 lane per output element over the pairs of K in order, as
// invariant and ~1.5x faster (see there). On CPUs without AMX the default mode's `nxcore::linear`
// runs it too (`nxcore::vnni_linear`), so there the mode costs nothing in the linears.
//
// On CPUs with AMX a bf16 weight with an AMX copy (`_pack_amx`) runs nxcore/csrc/amx_linear.cpp
// instead, at every row count: each element one tile lane summed over K in steps of 32 in order,
// as invariant, and the default mode's kernel there for 2-64 rows.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include "cpu_features.h"
#include "vnni_gemm.h"
#include "amx_linear.h"
#include "vnni_linear.h"
#include "weight_registry.h"

#include <algorithm>
#include <optional>
#include <type_traits>

#ifdef NXCORE_X86_GNU
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRowBlock = 64;  // rows of x kept hot (L2) while a task's weight rows stream past them
constexpr int64_t kPanel = 64;     // output features per panel of a VNNI-packed weight (see linear_vnni; vnni_gemm.h)

#ifdef NXCORE_X86_GNU
#define NXCORE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define NXCORE_F32_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// out[m][n] = dot(x[m], w[n]) over K for MR rows of x (stride K) and NR rows of w (stride K).
template <int MR, int NR>
NXCORE_BF16_TARGET inline void tile_bf16(const at::BFloat16* x, const at::BFloat16* w, int64_t K, float out[4][4]) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[NR];
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) wv[n] = (__m512bh)_mm512_loadu_si512(w + n * K + k);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], wv[n], xv);
    }
  }
  if (k < K) {
    const __mmask32 tail = static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512bh wv[NR];
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) wv[n] = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + n * K + k);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * K + k);
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], wv[n], xv);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) out[m][n] = _mm512_reduce_add_ps(acc[m][n]);
}

template <int MR, int NR>
NXCORE_F32_TARGET inline void tile_f32(const float* x, const float* w, int64_t K, float out[4][4]) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NR];
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) wv[n] = _mm512_loadu_ps(w + n * K + k);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_fmadd_ps(wv[n], xv, acc[m][n]);
    }
  }
  if (k < K) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NR];
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) wv[n] = _mm512_maskz_loadu_ps(tail, w + n * K + k);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * K + k);
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_fmadd_ps(wv[n], xv, acc[m][n]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) out[m][n] = _mm512_reduce_add_ps(acc[m][n]);
}

template <typename T, int NR>
void tile_rows(const T* x, const T* w, int64_t K, int64_t mr, float out[4][4]) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    switch (mr) {
      case 1: return tile_bf16<1, NR>(x, w, K, out);
      case 2: return tile_bf16<2, NR>(x, w, K, out);
      case 3: return tile_bf16<3, NR>(x, w, K, out);
      default: return tile_bf16<4, NR>(x, w, K, out);
    }
  } else {
    switch (mr) {
      case 1: return tile_f32<1, NR>(x, w, K, out);
      case 2: return tile_f32<2, NR>(x, w, K, out);
      case 3: return tile_f32<3, NR>(x, w, K, out);
      default: return tile_f32<4, NR>(x, w, K, out);
    }
  }
}

template <typename T>
void tile(const T* x, const T* w, int64_t K, int64_t mr, int64_t nr, float out[4][4]) {
  switch (nr) {
    case 1: return tile_rows<T, 1>(x, w, K, mr, out);
    case 2: return tile_rows<T, 2>(x, w, K, mr, out);
    case 3: return tile_rows<T, 3>(x, w, K, mr, out);
    default: return tile_rows<T, 4>(x, w, K, mr, out);
  }
}

template <typename T>
void linear_avx512(const at::Tensor& x, const at::Tensor& w, const float* bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const int64_t blocks = (N + 3) / 4;
  // At least ~64 KiB of weight per task, so small layers do not pay for waking threads.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (4 * K * static_cast<int64_t>(sizeof(T))));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    float out[4][4];
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t m1 = std::min(M, m0 + kRowBlock);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b * 4, nr = std::min<int64_t>(4, N - n);
        for (int64_t m = m0; m < m1; m += 4) {
          const int64_t mr = std::min<int64_t>(4, m1 - m);
          tile<T>(xp + m * K, wp + n * K, K, mr, nr, out);
          for (int64_t i = 0; i < mr; ++i)
            for (int64_t j = 0; j < nr; ++j) yp[(m + i) * N + n + j] = static_cast<T>(bias ? out[i][j] + bias[n + j] : out[i][j]);
        }
      }
    }
  });
}

// ---- bf16 on a weight packed once (`nxcore::_pack_invariant`) ----
//
// The weight's VNNI copy, in panels of 64 output features: panel p holds w[64p .. 64p + 63, :] as
// [K / 2][64] 32-bit words, word (k / 2, j) = (w[64p + j, k], w[64p + j, k + 1]), zero past N.
// A tile of up to 6 rows of x by one panel keeps 6 x 4 accumulators of 16 lanes, one lane per
// output element, and runs vdpbf16ps over the pairs of K in order:
//
//   acc = 0; for k in 0, 2, 4, ...: acc += w[n, k] * x[m, k] + w[n, k + 1] * x[m, k + 1]
//   y[m, n] = acc + bias[n], rounded once to bf16.
//
// Each element's additions are the same whatever the tile it lands in, the number of rows, or the
// thread's share of panels, so this is as invariant as the dot-product tiles above; and it streams
// the weight once per block of rows with no horizontal sums, at about the speed of oneDNN's GEMM
// (the dot-product tiles ran 1.4-1.5x the default mode's time; see `pack_invariant`).
constexpr int64_t kVnniRowBlock = 96;  // rows of x per pass over a thread's panels (L2-resident)

// A tile's store: + bias, rounded once to bf16.
struct Bf16Out {
  at::BFloat16* y;
  int64_t N;
  const float* bias;
  NXCORE_BF16_TARGET NXCORE_VNNI_INLINE __m512 init(int64_t, int, __mmask16) const { return _mm512_setzero_ps(); }
  NXCORE_BF16_TARGET NXCORE_VNNI_INLINE void store(int64_t r, int v, __mmask16 mask, __m512 acc) const {
    if (bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, bias + 16 * v));
    _mm256_mask_storeu_epi16(y + r * N + 16 * v, mask, (__m256i)_mm512_cvtneps_pbh(acc));
  }
};

void linear_vnni(const at::Tensor& x, const at::Tensor& packed, int64_t N, const float* bias, at::Tensor& y) {
  static_assert(kPanel == nxcore::vnni::kPanel, "the packed panels are the micro-kernel's");
  const int64_t M = x.size(0), K = x.size(1), pairs = K / 2, panels = (N + kPanel - 1) / kPanel;
  const auto* xp = x.const_data_ptr<at::BFloat16>();
  const auto* wp = reinterpret_cast<const uint32_t*>(packed.const_data_ptr<at::BFloat16>());
  auto* yp = y.mutable_data_ptr<at::BFloat16>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t m0 = 0; m0 < M; m0 += kVnniRowBlock) {
      const int64_t rows = std::min(kVnniRowBlock, M - m0);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kPanel;
        nxcore::vnni::panel(rows, K, xp + m0 * K, K, wp + p * pairs * kPanel, kPanel, std::min(kPanel, N - n0),
                            Bf16Out{yp + m0 * N + n0, N, bias ? bias + n0 : nullptr});
      }
    }
  });
}
#endif

// Any CPU, any floating dtype: one float32 accumulator per element, k in order.
template <typename T>
void linear_scalar(const at::Tensor& x, const at::Tensor& w, const float* bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += static_cast<float>(wp[n * K + k]) * static_cast<float>(xp[m * K + k]);
        yp[m * N + n] = static_cast<T>(bias ? acc + bias[n] : acc);
      }
  });
}

// ---- registry of VNNI copies, keyed by the dense weight they were packed from ----
nxcore::WeightRegistry vnni_registry;

std::optional<at::Tensor> vnni_of(const at::Tensor& w) { return vnni_registry.find(w); }

bool vnni_supported() {
#ifdef NXCORE_X86_GNU
  return nxcore::cpu_has_avx512_bf16();
#else
  return false;
#endif
}

// Packs a contiguous 2-D bf16 weight [N, K] (K even) into the panels of linear_vnni and registers
// the copy for it; returns false (nothing registered) where the kernel does not apply. Measured
// with bench.invariance on AMD EPYC (llama 512x8, one thread), see the README.
bool pack_invariant(const at::Tensor& weight) {
  if (!vnni_supported() || weight.dim() != 2 || weight.scalar_type() != at::kBFloat16 || !weight.is_contiguous() || weight.size(1) % 2 != 0 ||
      !weight.device().is_cpu())
    return false;
  const int64_t N = weight.size(0), K = weight.size(1), pairs = K / 2, panels = (N + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({panels * pairs * kPanel * 2}, weight.options());
  const auto* w = reinterpret_cast<const uint32_t*>(weight.const_data_ptr<at::BFloat16>());  // word (n, kp) at n * pairs + kp
  auto* out = reinterpret_cast<uint32_t*>(packed.mutable_data_ptr<at::BFloat16>());
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t j = 0; j < std::min(kPanel, N - p * kPanel); ++j)
        for (int64_t kp = 0; kp < pairs; ++kp) out[(p * pairs + kp) * kPanel + j] = w[(p * kPanel + j) * pairs + kp];
  });
  vnni_registry.put(weight, packed);
  return true;
}

int64_t invariant_packed_count() { return vnni_registry.size(); }

void unpack_invariant(const at::Tensor& weight) { vnni_registry.erase(weight); }

at::Tensor linear_invariant(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, "nxcore::linear_invariant: weight must be 2-D, got ", weight.sizes());
  const int64_t K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "nxcore::linear_invariant: input's last dimension is ", x.size(-1),
              ", the weight takes ", K);
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "nxcore::linear_invariant: input dtype ", x.scalar_type(),
              " differs from the weight's ", weight.scalar_type());
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = N;
  const at::Tensor x2d = x.reshape({-1, K}).contiguous();
  const at::Tensor w = weight.contiguous();
  std::optional<at::Tensor> bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const float* bp = bias_f ? bias_f->const_data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({x2d.size(0), N}, x.options());
  if (x2d.size(0) == 0) return y.view(out_shape);
  // An AMX copy (CPUs with AMX): as invariant, at every row count (nxcore/csrc/amx_linear.cpp).
  if (auto amx = nxcore::amx_linear(x2d, weight, bias, -1)) return amx->view(out_shape);
#ifdef NXCORE_X86_GNU
  if (x.scalar_type() == at::kBFloat16 && nxcore::cpu_has_avx512_bf16()) {
    if (const auto packed = vnni_of(weight)) {
      linear_vnni(x2d, *packed, N, bp, y);
      return y.view(out_shape);
    }
    linear_avx512<at::BFloat16>(x2d, w, bp, y);
    return y.view(out_shape);
  }
  if (x.scalar_type() == at::kFloat && nxcore::cpu_has_avx512()) {
    linear_avx512<float>(x2d, w, bp, y);
    return y.view(out_shape);
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nxcore::linear_invariant",
                                  [&] { linear_scalar<scalar_t>(x2d, w, bp, y); });
  return y.view(out_shape);
}

bool vnni_preferred() {
#ifdef NXCORE_X86_GNU
  return vnni_supported() && !at::native::cpublas::could_pack(at::kBFloat16);
#else
  return false;
#endif
}

}  // namespace

namespace nxcore {

std::optional<at::Tensor> vnni_linear(const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
#ifdef NXCORE_X86_GNU
  if (x2d.scalar_type() != at::kBFloat16 || weight.dim() != 2 || !nxcore::cpu_has_avx512_bf16()) return std::nullopt;
  const auto packed = vnni_of(weight);
  if (!packed) return std::nullopt;
  std::optional<at::Tensor> bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x2d.size(0), weight.size(0)}, x2d.options());
  if (x2d.size(0) > 0) linear_vnni(x2d, *packed, weight.size(0), bias_f ? bias_f->const_data_ptr<float>() : nullptr, y);
  return y;
#else
  return std::nullopt;
#endif
}

}  // namespace nxcore

TORCH_LIBRARY_FRAGMENT(nxcore, m) {
  m.def("linear_invariant(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("_linear_vnni_preferred() -> bool", &vnni_preferred);
  m.def("_pack_invariant(Tensor weight) -> bool", &pack_invariant);
  m.def("_unpack_invariant(Tensor weight) -> ()", &unpack_invariant);
  m.def("_invariant_packed_count() -> int", &invariant_packed_count);
}

TORCH_LIBRARY_IMPL(nxcore, CPU, m) { m.impl("linear_invariant", &linear_invariant); }
