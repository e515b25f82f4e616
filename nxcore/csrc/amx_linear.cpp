// bf16 linears on Intel AMX tiles, on a copy of the weight packed once at load (`_pack_amx`, made
// by nxcore.modules.linear.prepack on CPUs with AMX).
//
// Why: on the Intel Xeon with AMX of this project (2 cores), oneDNN's packed GEMM at decode's row
// counts reads the weights slower than memory allows. A chain of the llama 512x8's decode linears
// (8 layers and the LM head, 92 MB; one thread, median of six alternating rounds, two runs) took
// 9.5-13.6 ms at 1-32 rows on this kernel against oneDNN's 16.3-26.3 (1.5-1.9x; 1.7-2.0x on two
// threads), the weight streamed at ~10 GB/s, what a plain read of it reaches; 10.4-14.5 against
// 12.0-15.0 at 40-64 rows (6.0-6.7 against 7.3-8.4 on two threads), level at 96-128. Without the
// weight prefetch below it was 1.06-1.45x slower at 1-32 rows and 0.77x oneDNN at 64. Beyond, the
// products are the work and oneDNN's kernels ran them faster (this kernel 0.61-0.93x at 256-2048 rows, with
// or without blocking K), so `nxcore::linear` runs this one up to `_amx_rows()` rows (64) and
// oneDNN beyond; one row only over short weight rows (nxcore/csrc/linear.cpp). Measured with
// `python -m bench.linear --model /tmp/peers/llama-512x8 --rows 1 8 32 64`.
//
// Batch invariance: each output element is one float32 tile lane summed over the pairs of K in
// order (TDPBF16PS, 32 elements of K a step, steps in order), rounded once to bf16 after the bias.
// Its row's position in a tile, the number of rows, the tile it lands in and the thread that runs
// it change nothing, so `nxcore::linear_invariant` runs this kernel at every row count where there
// is a copy (nxcore/csrc/invariant.cpp).
//
// Layout of the copy: panels of 32 output features; panel p holds w[32p .. 32p + 31, :] as K / 32
// steps of two column tiles, each 16 rows (pairs of K) of 16 columns x 2 bf16: one contiguous
// 1 KiB tile per (step, column tile), so the weight streams front to back. Features past N are
// zero. K must be a multiple of 32 (no copy otherwise).
//
// Blocking: threads split the panels into chunks of at most ~1 MiB of weight (an L2's share) and
// each chunk runs every block of 32 rows of x over each of its panels; a row block tail (M % 32) is
// copied once into a zero-padded block.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "amx.h"
#include "amx_linear.h"
#include "weight_registry.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kPanel = 32;            // output features per panel (two column tiles)
constexpr int64_t kStep = 32;             // elements of K per tile step
constexpr int64_t kRowBlock = 32;         // rows of x per block (two row tiles)
constexpr int64_t kChunkBytes = 1 << 20;  // weight bytes per thread chunk
constexpr int64_t kPrefetchRows = 64;     // rows up to which the weight stream is prefetched

nxcore::WeightRegistry amx_registry;

std::optional<at::Tensor> amx_of(const at::Tensor& w) { return amx_registry.find(w); }

// Bytes ahead of its B tiles each step prefetches (M <= kPrefetchRows). 0: off.
std::atomic<int64_t>& prefetch_setting() {
  static std::atomic<int64_t> bytes{1024};
  return bytes;
}

// Rows up to which nxcore::linear runs this kernel (default mode). 0: never.
std::atomic<int64_t>& rows_setting() {
  static std::atomic<int64_t> rows{64};
  return rows;
}

bool amx_supported() {
#ifdef NXCORE_X86_GNU
  return nxcore::amx::supported();
#else
  return false;
#endif
}

#ifdef NXCORE_X86_GNU

// Row r of the 32 x 32 float32 block c (+ bias) rounded once to bf16, the first `cols` columns.
NXCORE_AMX_TARGET void store_block(const float* c, int64_t rows, int64_t cols, const float* bias, at::BFloat16* out, int64_t ldo) {
  const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 v0 = _mm512_add_ps(_mm512_loadu_ps(c + r * kPanel), b0);
    const __m512 v1 = _mm512_add_ps(_mm512_loadu_ps(c + r * kPanel + 16), b1);
    _mm256_mask_storeu_epi16(out + r * ldo, m0, (__m256i)_mm512_cvtneps_pbh(v0));
    _mm256_mask_storeu_epi16(out + r * ldo + 16, m1, (__m256i)_mm512_cvtneps_pbh(v1));
  }
}

// Panels p0..p1 of the copy over every row of x (tail: the last M % 32 rows, zero-padded).
NXCORE_AMX_TARGET void run_panels(const uint16_t* x, const uint16_t* tail, int64_t M, int64_t K, const char* packed, int64_t p0, int64_t p1,
                                  int64_t N, const float* bias, at::BFloat16* out) {
  alignas(64) float c[kRowBlock * kPanel];
  const int64_t panel_bytes = K * kPanel * 2, steps = K / kStep, prefetch = prefetch_setting().load(std::memory_order_relaxed);
  for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, M - m0);
    const uint16_t* a = rows == kRowBlock ? x + m0 * K : tail;
    for (int64_t p = p0; p < p1; ++p) {
      const char* b = packed + p * panel_bytes;
      if (M <= kPrefetchRows && prefetch > 0) {  // each panel read once or twice, from memory
        if (rows > 16)
          nxcore::amx::block<2, 2, true>(a, K, b, 2048, 1024, 64, steps, c, kPanel, prefetch);
        else
          nxcore::amx::block<1, 2, true>(a, K, b, 2048, 1024, 64, steps, c, kPanel, prefetch);
      } else if (rows > 16) {
        nxcore::amx::block<2, 2>(a, K, b, 2048, 1024, 64, steps, c, kPanel);
      } else {
        nxcore::amx::block<1, 2>(a, K, b, 2048, 1024, 64, steps, c, kPanel);
      }
      store_block(c, rows, std::min(kPanel, N - p * kPanel), bias ? bias + p * kPanel : nullptr, out + m0 * N + p * kPanel, N);
    }
  }
}

NXCORE_AMX_TARGET void run_chunks(const uint16_t* x, const uint16_t* tail, int64_t M, int64_t K, const char* packed, int64_t c0, int64_t c1,
                                  int64_t per, int64_t panels, int64_t N, const float* bias, at::BFloat16* out) {
  nxcore::amx::configure();
  for (int64_t ch = c0; ch < c1; ++ch) run_panels(x, tail, M, K, packed, ch * per, std::min(panels, (ch + 1) * per), N, bias, out);
  nxcore::amx::release();
}

void linear_amx(const at::Tensor& x2d, const at::Tensor& packed, int64_t N, const float* bias, at::Tensor& y) {
  const int64_t M = x2d.size(0), K = x2d.size(1), panels = (N + kPanel - 1) / kPanel;
  const auto* x = reinterpret_cast<const uint16_t*>(x2d.const_data_ptr<at::BFloat16>());
  std::vector<uint16_t> tail;
  const int64_t full = M / kRowBlock * kRowBlock;
  if (full < M) {
    const int64_t rows = M - full <= 16 ? 16 : kRowBlock;  // what block<1 or 2, 2> reads
    tail.assign(rows * K, 0);
    std::memcpy(tail.data(), x + full * K, (M - full) * K * 2);
  }
  int64_t per = std::max<int64_t>(1, kChunkBytes / (K * kPanel * 2));
  per = std::min(per, (panels + at::get_num_threads() - 1) / at::get_num_threads());
  const int64_t chunks = (panels + per - 1) / per;
  const char* w = reinterpret_cast<const char*>(packed.const_data_ptr<at::BFloat16>());
  auto* out = y.mutable_data_ptr<at::BFloat16>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) { run_chunks(x, tail.data(), M, K, w, c0, c1, per, panels, N, bias, out); });
}
#endif

// Packs a contiguous 2-D bf16 weight [N, K] (K a multiple of 32) and registers the copy; false
// (nothing registered) where the kernel does not apply.
bool pack_amx(const at::Tensor& weight) {
  if (!amx_supported() || weight.dim() != 2 || weight.scalar_type() != at::kBFloat16 || !weight.is_contiguous() || weight.size(1) % kStep != 0 ||
      weight.size(1) == 0 || !weight.device().is_cpu())
    return false;
  const int64_t N = weight.size(0), K = weight.size(1), steps = K / kStep, panels = (N + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({panels * K * kPanel}, weight.options());
  const auto* w = reinterpret_cast<const uint32_t*>(weight.const_data_ptr<at::BFloat16>());  // pair (n, kp) at n * K / 2 + kp
  auto* out = reinterpret_cast<uint32_t*>(packed.mutable_data_ptr<at::BFloat16>());
  // word index in the copy: (((p * steps + s) * 2 + j) * 16 + kp) * 16 + col, for feature
  // n = 32p + 16j + col and pair of K 16s + kp
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t s = 0; s < steps; ++s)
        for (int64_t j = 0; j < 2; ++j)
          for (int64_t col = 0; col < 16; ++col) {
            const int64_t n = p * kPanel + j * 16 + col;
            if (n >= N) break;
            for (int64_t kp = 0; kp < 16; ++kp) out[(((p * steps + s) * 2 + j) * 16 + kp) * 16 + col] = w[n * (K / 2) + s * 16 + kp];
          }
  });
  amx_registry.put(weight, packed);
  return true;
}

void unpack_amx(const at::Tensor& weight) { amx_registry.erase(weight); }

int64_t amx_packed_count() { return amx_registry.size(); }

int64_t set_amx_prefetch(int64_t bytes) {
  TORCH_CHECK(bytes >= 0 && bytes % 64 == 0, "nxcore::_set_amx_prefetch: bytes must be a multiple of 64, >= 0, got ", bytes);
  return prefetch_setting().exchange(bytes);
}

int64_t set_amx_rows(int64_t rows) {
  TORCH_CHECK(rows >= 0, "nxcore::_set_amx_rows: rows must be >= 0, got ", rows);
  return rows_setting().exchange(rows);
}

at::Tensor amx_linear_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, "nxcore::amx_linear: weight must be 2-D, got ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "nxcore::amx_linear: input's last dimension is ", x.size(-1), ", the weight takes ",
              weight.size(1));
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  auto y = nxcore::amx_linear(x.reshape({-1, weight.size(1)}).contiguous(), weight, bias, -1);
  TORCH_CHECK(y.has_value(), "nxcore::amx_linear: no AMX copy of this weight (nxcore::_pack_amx packs bf16 weights whose in_features are a ",
              "multiple of 32, on CPUs with AMX-BF16) or the input is not bfloat16");
  return y->view(out_shape);
}

}  // namespace

namespace nxcore {

std::optional<at::Tensor> amx_linear(const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t max_rows) {
#ifdef NXCORE_X86_GNU
  if (x2d.scalar_type() != at::kBFloat16 || (max_rows >= 0 && x2d.size(0) > max_rows)) return std::nullopt;
  const auto packed = amx_of(weight);
  if (!packed) return std::nullopt;
  std::optional<at::Tensor> bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x2d.size(0), weight.size(0)}, x2d.options());
  if (x2d.size(0) > 0) linear_amx(x2d, *packed, weight.size(0), bias_f ? bias_f->const_data_ptr<float>() : nullptr, y);
  return y;
#else
  return std::nullopt;
#endif
}

int64_t amx_linear_rows() { return rows_setting().load(std::memory_order_relaxed); }

}  // namespace nxcore

TORCH_LIBRARY_FRAGMENT(nxcore, m) {
  m.def("amx_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("_amx_supported() -> bool", &amx_supported);
  m.def("_pack_amx(Tensor weight) -> bool", &pack_amx);
  m.def("_unpack_amx(Tensor weight) -> ()", &unpack_amx);
  m.def("_amx_packed_count() -> int", &amx_packed_count);
  m.def("_amx_rows() -> int", &nxcore::amx_linear_rows);
  m.def("_set_amx_rows(int rows) -> int", &set_amx_rows);
  m.def("_set_amx_prefetch(int bytes) -> int", &set_amx_prefetch);
}

TORCH_LIBRARY_IMPL(nxcore, CPU, m) { m.impl("amx_linear", &amx_linear_op); }
