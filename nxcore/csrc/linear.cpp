// nxcore::linear on CPU: the kernel behind every `nxcore.modules.linear.Linear`.
//
// Why C++: graphs compiled by AOTInductor call custom ops through their proxy executor. With the
// op written in Python, each call re-entered the interpreter: ~33 us a linear, 1.6 ms of an
// 11.6 ms decode step on the small model (measured here). Registered from C++, the call stays in
// the dispatcher.
//
// What it runs, by measurement on this project's machines (AMD EPYC and Intel Xeon with AMX,
// avx512_bf16, 2 cores):
// - bf16 where `prepack` gave the weight a VNNI copy (by default on CPUs with AVX512-BF16 and no
//   AMX, NXSERVE_BF16_LINEAR in nxcore/modules/linear.py): `nxcore::vnni_linear`
//   (nxcore/csrc/invariant.cpp), at every row count, batch-invariant. Else:
// - bf16, one or two rows on AMD, one on Intel (`gemv_rows_setting`; decode): `gemv_bf16` below,
//   which streams the dense row-major weight once with AVX512-BF16 dot products, one row at a time
//   on AMD and eight at once on Intel. A TinyLlama-shaped chain of decode linears ran at 90-94% of a
//   `torch.sum` read of the same bytes on AMD, where oneDNN's packed GEMV ran at 66-74% and
//   `F.linear` at about 50%; at 83-90% on Intel against oneDNN's 76-86% (`python -m bench.linear`).
// - bf16 on CPUs with AMX, where prepack made an AMX copy: 2-64 rows, and one row over weights of
//   at most 1024 in_features (nxcore/csrc/amx_linear.cpp).
// - bf16, more rows (prefill, batched decode): oneDNN on the weight packed once at load
//   (`mkldnn::_linear_pointwise`, packing registered by `nxcore::_register_packed`).
// - anything else (float32, an unregistered weight, no AVX512-BF16): `at::linear`.
// All paths accumulate in float32 and round once to the output dtype.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cpu_features.h"
#include "amx_linear.h"
#include "vnni_linear.h"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>

#ifdef NXCORE_X86_GNU
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGemvMaxRows = NXCORE_GEMV_MAX_ROWS;  // at most 2: see gemv_bf16
constexpr int64_t kAmxOneRowMaxK = 1024;  // in_features up to which one row runs the AMX copy, see linear()
static_assert(kGemvMaxRows >= 0 && kGemvMaxRows <= 2);

// ---- registry of oneDNN-packed weights, keyed by the dense weight they were packed from ----

struct Key {
  const void* data;
  int64_t out_features;
  int64_t in_features;
  c10::ScalarType dtype;
  bool operator==(const Key& o) const {
    return data == o.data && out_features == o.out_features && in_features == o.in_features && dtype == o.dtype;
  }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = std::hash<const void*>()(k.data);
    h ^= std::hash<int64_t>()(k.out_features) + 0x9e3779b9 + (h << 6) + (h >> 2);
    h ^= std::hash<int64_t>()(k.in_features) + 0x9e3779b9 + (h << 6) + (h >> 2);
    return h ^ static_cast<size_t>(k.dtype);
  }
};

std::mutex registry_mutex;
std::unordered_map<Key, at::Tensor, KeyHash> registry;

Key key_of(const at::Tensor& weight) {
  return Key{weight.data_ptr(), weight.size(0), weight.size(1), weight.scalar_type()};
}

std::optional<at::Tensor> packed_for(const at::Tensor& weight) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry.find(key_of(weight));
  if (it == registry.end()) return std::nullopt;
  return it->second;
}

void register_packed(const at::Tensor& weight, const at::Tensor& packed) {
  TORCH_CHECK(weight.dim() == 2, "nxcore::_register_packed: weight must be 2-D, got ", weight.sizes());
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry[key_of(weight)] = packed;
}

void unregister_packed(const at::Tensor& weight) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.erase(key_of(weight));
}

int64_t packed_count() {
  std::lock_guard<std::mutex> lock(registry_mutex);
  return static_cast<int64_t>(registry.size());
}

// ---- AVX512-BF16 GEMV on the dense weight ----

#ifdef NXCORE_X86_GNU
#define NXCORE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Software prefetch distance of the GEMV's weight stream. Measured on an Intel Xeon with AMX (one
// thread, bf16 weights in DRAM): without it a row-after-row stream read 6.8 GB/s on 512-wide rows
// (the hardware prefetcher restarts at every short row) where a `torch.sum` read 10.6; 1-2 KiB
// ahead it read 10.2-10.6 GB/s, and 11.8 on 2048-wide rows (10.1 without). The TinyLlama-shaped
// chain of `python -m bench.linear --rows 1` on one thread went from 62% to 79-82% of a `torch.sum`
// of the same bytes. Streaming 4 or 8 weight rows at once measured no better on that chain.
constexpr int64_t kPrefetchBytes = 2048;

// out[m] = dot(w[0:K], x[m, 0:K]) for the M rows of x, float32 accumulation: the weight row is
// read once, front to back, each vector used for every row of x. Two accumulators per row of x
// hide the latency of the dependent dot products.
template <int M>
NXCORE_TARGET inline void dot_row(const at::BFloat16* w, const at::BFloat16* x, int64_t K, float* out) {
  constexpr int A = 2;
  __m512 acc[M][A];
  for (int m = 0; m < M; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 * A <= K; k += 32 * A) {
    // The two cache lines kPrefetchBytes ahead in the stream (past this row's end: the next row's).
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetchBytes + 64, _MM_HINT_T0);
    for (int a = 0; a < A; ++a) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * a);
      for (int m = 0; m < M; ++m)
        acc[m][a] = _mm512_dpbf16_ps(acc[m][a], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * a));
    }
  }
  for (; k + 32 <= K; k += 32) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
    for (int m = 0; m < M; ++m)
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k));
  }
  if (k < K) {
    const __mmask32 tail = static_cast<__mmask32>((1ull << (K - k)) - 1);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + k);
    for (int m = 0; m < M; ++m)
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * K + k));
  }
  for (int m = 0; m < M; ++m) {
    __m512 sum = acc[m][0];
    for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, acc[m][a]);
    out[m] = _mm512_reduce_add_ps(sum);
  }
}

// The same dot products for kStreams consecutive weight rows at once: out[i * M + m] =
// dot(w[i * K : (i + 1) * K], x[m]). Each row is its own stream, read front to back with one
// accumulator per (row, row of x) and a short software prefetch ahead in every stream. Measured on
// an Intel Xeon with AMX (one thread, a TinyLlama-shaped chain of decode linears, one row of x,
// /tmp harness timing only the kernels): 8 streams 256 B ahead read 93-95% of a `torch.sum` of the
// same bytes, oneDNN's packed GEMV 89-90%, one stream 2 KiB ahead (dot_row) 69-72%; 4 streams
// 87-92%, 8 streams without prefetch 90%, with 2 KiB ahead 80%.
constexpr int kStreams = 8;
constexpr int64_t kStreamPrefetchBytes = 256;

template <int M>
NXCORE_TARGET inline void dot_rows(const at::BFloat16* w, const at::BFloat16* x, int64_t K, float* out) {
  __m512 acc[kStreams][M];
  for (int i = 0; i < kStreams; ++i)
    for (int m = 0; m < M; ++m) acc[i][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh xv[M];
    for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
    for (int i = 0; i < kStreams; ++i) {
      const at::BFloat16* wr = w + i * K + k;
      _mm_prefetch(reinterpret_cast<const char*>(wr) + kStreamPrefetchBytes, _MM_HINT_T0);
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr);
      for (int m = 0; m < M; ++m) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], wv, xv[m]);
    }
  }
  if (k < K) {
    const __mmask32 tail = static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512bh xv[M];
    for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * K + k);
    for (int i = 0; i < kStreams; ++i) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + i * K + k);
      for (int m = 0; m < M; ++m) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], wv, xv[m]);
    }
  }
  for (int i = 0; i < kStreams; ++i)
    for (int m = 0; m < M; ++m) out[i * M + m] = _mm512_reduce_add_ps(acc[i][m]);
}

// How many weight rows the GEMV streams at once, by measurement per CPU vendor: 1 (dot_row) on
// AMD EPYC, where it read 90-94% of a `torch.sum` and interleaving 4 or 8 rows 82-90% (a 2 KiB
// prefetch then); kStreams (dot_rows) elsewhere (the Intel figures above). `_set_gemv_streams`
// changes it, so tests reach both kernels on any AVX512-BF16 CPU.
std::atomic<int64_t>& gemv_streams_setting() {
  static std::atomic<int64_t> streams{__builtin_cpu_is("amd") ? 1 : kStreams};
  return streams;
}

// y[m, :] = x[m, :] @ w.T (+ bias) for the M rows of x, weight rows split across threads in
// contiguous ranges, each thread reading its range row after row: one sequential stream per
// thread. Measured on an AMD EPYC (2 threads) on a TinyLlama-shaped chain of decode linears, one
// row of x: 90-94% of a `torch.sum` of the same bytes in `bench/linear.py`, where interleaving
// blocks of 4 or 8 rows (several streams per thread) read at 82-90%; on the Intel Xeon the
// software prefetch above is what the stream needs (see kPrefetchBytes). From three rows of x on,
// oneDNN's packed GEMM measured faster.
template <int M>
void gemv_bf16(const at::Tensor& x, const at::Tensor& w, const float* bias, at::Tensor& y) {
  const int64_t K = x.size(1), N = w.size(0);
  const auto* xp = x.const_data_ptr<at::BFloat16>();
  const auto* wp = w.const_data_ptr<at::BFloat16>();
  auto* yp = y.mutable_data_ptr<at::BFloat16>();
  const int64_t streams = gemv_streams_setting().load(std::memory_order_relaxed);
  // At least ~64 KiB of weight per task, so small layers do not pay for waking threads; tasks
  // split at multiples of `streams` rows, so only the last one has rows left over.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (K * 2));
  const int64_t groups = (N + streams - 1) / streams;
  at::parallel_for(0, groups, std::max<int64_t>(1, grain / streams), [&](int64_t g0, int64_t g1) {
    const int64_t r0 = g0 * streams, r1 = std::min(N, g1 * streams);
    auto store = [&](int64_t r, const float* acc) {
      for (int64_t m = 0; m < M; ++m) yp[m * N + r] = at::BFloat16(bias ? acc[m] + bias[r] : acc[m]);
    };
    int64_t r = r0;
    if (streams == kStreams) {
      float acc[kStreams * M];
      for (; r + kStreams <= r1; r += kStreams) {
        dot_rows<M>(wp + r * K, xp, K, acc);
        for (int i = 0; i < kStreams; ++i) store(r + i, acc + i * M);
      }
    }
    float acc[M];
    for (; r < r1; ++r) {
      dot_row<M>(wp + r * K, xp, K, acc);
      store(r, acc);
    }
  });
}

void gemv_bf16(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, at::Tensor& y) {
  std::optional<at::Tensor> bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const float* bp = bias_f ? bias_f->const_data_ptr<float>() : nullptr;
  switch (x.size(0)) {
    case 1: return gemv_bf16<1>(x, w, bp, y);
    case 2: return gemv_bf16<2>(x, w, bp, y);
    default: TORCH_CHECK(false, "nxcore::linear: the GEMV takes 1 or 2 rows, got ", x.size(0));
  }
}
#endif

// Rows up to which `linear` runs the GEMV, by measurement per CPU vendor (`python -m bench.linear`,
// a TinyLlama-shaped chain of decode linears, 1 and 2 threads): on AMD EPYC the GEMV (one stream)
// read 90-94% of a `torch.sum` of the same bytes where oneDNN's packed GEMV read 66-74%. On an
// Intel Xeon with AMX, one row: the GEMV with eight streams 90% on one thread and 83% on two,
// oneDNN 86% and 76-78%, the one-stream GEMV 79% and 74%; two rows: eight streams 84% and 79%,
// oneDNN 86% and 78-80%, so there one row goes to the GEMV and two to oneDNN.
// `_set_gemv_rows` changes it (tests reach the GEMV on any AVX512-BF16 CPU with it).
std::atomic<int64_t>& gemv_rows_setting() {
#ifdef NXCORE_X86_GNU
  static std::atomic<int64_t> rows{!nxcore::cpu_has_avx512_bf16() ? 0 : __builtin_cpu_is("amd") ? kGemvMaxRows : std::min<int64_t>(1, kGemvMaxRows)};
#else
  static std::atomic<int64_t> rows{0};
#endif
  return rows;
}

bool gemv_applies(const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
#ifdef NXCORE_X86_GNU
  return x2d.size(0) <= gemv_rows_setting().load(std::memory_order_relaxed) && x2d.scalar_type() == at::kBFloat16 &&
         weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.layout() == at::kStrided &&
         (!bias.has_value() || bias->dim() == 1) && nxcore::cpu_has_avx512_bf16();
#else
  return false;
#endif
}

// Rows up to which `linear` runs the GEMV on this CPU now (0: it never does).
int64_t gemv_rows() { return gemv_rows_setting().load(); }

bool gemv_supported() {
#ifdef NXCORE_X86_GNU
  return nxcore::cpu_has_avx512_bf16();
#else
  return false;
#endif
}

int64_t gemv_streams() {
#ifdef NXCORE_X86_GNU
  return gemv_streams_setting().load();
#else
  return 1;
#endif
}

int64_t set_gemv_streams(int64_t streams) {
#ifdef NXCORE_X86_GNU
  TORCH_CHECK(streams == 1 || streams == kStreams, "nxcore::_set_gemv_streams: streams must be 1 or ", kStreams, ", got ", streams);
  return gemv_streams_setting().exchange(streams);
#else
  TORCH_CHECK(streams == 1, "nxcore::_set_gemv_streams: this build has one GEMV (1 stream), got ", streams);
  return 1;
#endif
}

// Set them (0..kGemvMaxRows, and 0 where the CPU lacks AVX512-BF16); returns the previous value.
int64_t set_gemv_rows(int64_t rows) {
  TORCH_CHECK(rows >= 0 && rows <= kGemvMaxRows, "nxcore::_set_gemv_rows: rows must be in 0..", kGemvMaxRows, ", got ", rows);
#ifdef NXCORE_X86_GNU
  if (!nxcore::cpu_has_avx512_bf16()) rows = 0;
#else
  rows = 0;
#endif
  return gemv_rows_setting().exchange(rows);
}

at::Tensor linear_pointwise(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, c10::List<std::optional<at::Scalar>>,
                                         std::optional<c10::string_view>)>();
  return op.call(x, packed, bias, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, "nxcore::linear: weight must be 2-D, got ", weight.sizes());
  const int64_t K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "nxcore::linear: input's last dimension is ", x.size(-1),
              ", the weight takes ", K);
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = N;
  const at::Tensor x2d = x.reshape({-1, K}).contiguous();
  if (auto y = nxcore::vnni_linear(x2d, weight, bias)) return y->view(out_shape);
  const bool gemv = gemv_applies(x2d, weight, bias);
  // The AMX copy (up to amx_linear_rows() rows) before the GEMV, except over long weight rows: for
  // one row its contiguous tiles stream faster than the GEMV's row after row over short ones
  // (Intel Xeon, one thread, one row, weights from memory: 10.1-10.8 against 8.2-9.1 GB/s at K =
  // 512 and 576, 1.04-1.07x at 1024, 0.97-1.05x at 1536), the GEMV faster over long ones (1.04-1.09x
  // at K = 2048-5632).
  if (!gemv || K <= kAmxOneRowMaxK)
    if (auto y = nxcore::amx_linear(x2d, weight, bias, nxcore::amx_linear_rows())) return y->view(out_shape);
#ifdef NXCORE_X86_GNU
  if (gemv) {
    at::Tensor y = at::empty({x2d.size(0), N}, x.options());
    gemv_bf16(x2d, weight, bias, y);
    return y.view(out_shape);
  }
#endif
  if (auto packed = packed_for(weight)) return linear_pointwise(x2d, *packed, bias).view(out_shape);
  return at::linear(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nxcore, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("_register_packed(Tensor weight, Tensor packed) -> ()", &register_packed);
  m.def("_unregister_packed(Tensor weight) -> ()", &unregister_packed);
  m.def("_packed_count() -> int", &packed_count);
  m.def("_gemv_rows() -> int", &gemv_rows);
  m.def("_set_gemv_rows(int rows) -> int", &set_gemv_rows);
  m.def("_gemv_supported() -> bool", &gemv_supported);
  m.def("_gemv_streams() -> int", &gemv_streams);
  m.def("_set_gemv_streams(int streams) -> int", &set_gemv_streams);
}

TORCH_LIBRARY_IMPL(nxcore, CPU, m) { m.impl("linear", &linear); }
