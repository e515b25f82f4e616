// Fused elementwise ops for bfloat16 on CPU: RMSNorm (alone and after the residual add), SiLU-and-
// multiply of the fused gate-up projection, and rotary embedding; and the greedy token's reduction
// (`row_max`, float32 logits).
//
// Why: run eagerly, each of these is a chain of ATen ops, each one a pass over memory with its
// own bf16 <-> fp32 conversions and dispatch. Measured on this project's machine (small llama,
// bf16, one thread, prefill of 2048 tokens): `aten::mul` 84 ms, `aten::silu` 48 ms, `aten::pow`
// 18 ms, `aten::add` 18 ms and copies 19 ms per context-encoding call, more than the 172 ms of its
// linears. Here each op is one pass over its input.
//
// Every op rounds where the ATen chain it replaces rounds (the model code in nxcore/modules, which
// follows transformers), so the bf16 results are those of that chain: the only differences are the
// order of the fp32 sum of squares in RMSNorm (vector lanes, then across them) and `exp` in SiLU
// (nxcore's exp2_16 of -g log2(e), where ATen calls Sleef's: rounding -g log2(e) to float32 adds up to
// |g| x 6e-8 relative to the polynomial's 7.5e-8), which move a bf16 output by at most one unit in
// its last place, and rarely (none in 4M SiLU outputs of N(0, 16) inputs). tests/nxcore/test_fused.py compares them with the chains.
//
// They are called only from eager code (`nxcore.modules.fused`): traced graphs (the compile and
// xla backends) keep the ATen ops, which Inductor fuses on its own. CPUs without AVX512-BF16 keep
// the ATen ops too (`_fused_supported`).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_features.h"
#include "vec_exp.h"

#include <cmath>
#include <limits>
#include <tuple>

#ifdef NXCORE_X86_GNU
#include <immintrin.h>
#endif

namespace {

#ifdef NXCORE_X86_GNU
#define NXCORE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

using nxcore::tail_mask;

// 16 (or fewer, masked) bf16 -> fp32: exact. Full vectors load unmasked (masked loads and stores
// measured slower on the Intel Xeon).
NXCORE_TARGET inline __m512 load_bf16(const at::BFloat16* p, __mmask16 m) {
  const __m256i raw = m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// fp32 -> bf16, round to nearest even (as c10::BFloat16's conversion does), stored masked.
NXCORE_TARGET inline void store_bf16(at::BFloat16* p, __m512 v, __mmask16 m) {
  const __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
  if (m == 0xFFFF)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), b);
  else
    _mm256_mask_storeu_epi16(p, m, b);
}

// fp32 -> bf16 -> fp32: a value rounded where the ATen chain stores a bf16 intermediate.
NXCORE_TARGET inline __m512 round_bf16(__m512 v) {
  const __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// Rows per task for at::parallel_for: ~32 KiB of input each, so small calls stay on one thread.
inline int64_t grain_rows(int64_t row_elems) {
  return std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, row_elems * 2));
}

// RMSNorm of one row (transformers' LlamaRMSNorm in bf16): r = 1 / sqrt(mean(x^2) + eps) in fp32,
// y = bf16(x * r), out = bf16(weight * y).
NXCORE_TARGET void norm_row(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* out, int64_t D, float eps) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __m512 v = load_bf16(x + d, tail_mask(D - d));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float r = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(D) + eps);
  const __m512 rv = _mm512_set1_ps(r);
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = tail_mask(D - d);
    const __m512 y = round_bf16(_mm512_mul_ps(load_bf16(x + d, m), rv));
    store_bf16(out + d, _mm512_mul_ps(load_bf16(w + d, m), y), m);
  }
}

// sum = bf16(x + residual) (the residual add), stored, then its RMSNorm.
NXCORE_TARGET void add_norm_row(const at::BFloat16* x, const at::BFloat16* res, const at::BFloat16* w, at::BFloat16* sum,
                                at::BFloat16* out, int64_t D, float eps) {
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = tail_mask(D - d);
    store_bf16(sum + d, _mm512_add_ps(load_bf16(x + d, m), load_bf16(res + d, m)), m);
  }
  norm_row(sum, w, out, D, eps);
}

// out = bf16(bf16(silu(g)) * u), silu(g) = g / (1 + exp(-g)) in fp32 (ATen's silu on bf16).
// Measured on [2048, 2 x 2048] (one thread): 2.1 ms, where ATen's silu and mul took 4.5 ms.
NXCORE_TARGET void silu_mul_row(const at::BFloat16* g, const at::BFloat16* u, at::BFloat16* out, int64_t I) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 m = tail_mask(I - i);
    const __m512 gv = load_bf16(g + i, m);
    // exp(-g) as 2^(-g log2 e): the same bf16 outputs as exp16 (all 8M of a [4096, 2 x 2048] test
    // input of N(0, 36)) with four fewer instructions; [4096, 2 x 2048] took 6.6 against 7.3 ms
    // (Intel Xeon, one thread, alternating in one process).
    const __m512 e = nxcore::exp2_16(_mm512_mul_ps(gv, _mm512_set1_ps(-1.44269504088896341f)));
    const __m512 s = round_bf16(_mm512_div_ps(gv, _mm512_add_ps(one, e)));
    store_bf16(out + i, _mm512_mul_ps(s, load_bf16(u + i, m)), m);
  }
}

// The maximum of one float32 row and the index of its first occurrence (torch.max(dim)'s answer):
// one pass for the maximum and whether the row holds a NaN, then one for the first index equal to it
// (the first NaN where there is one: torch.max propagates NaN). The row is read twice from cache.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void row_max_one(const float* x, int64_t V, float* value, int64_t* index) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 top = lowest;
  __mmask16 nan = 0;
  for (int64_t i = 0; i < V; i += 16) {
    const __m512 v = _mm512_mask_loadu_ps(lowest, tail_mask(V - i), x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    top = _mm512_max_ps(top, v);
  }
  if (nan) {
    for (int64_t i = 0; i < V; ++i)
      if (std::isnan(x[i])) {
        *value = x[i], *index = i;
        return;
      }
  }
  const float m = _mm512_reduce_max_ps(top);
  const __m512 mv = _mm512_set1_ps(m);
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 tail = tail_mask(V - i);
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(tail, _mm512_maskz_loadu_ps(tail, x + i), mv, _CMP_EQ_OQ);
    if (hit) {
      *index = i + __builtin_ctz(hit);
      *value = x[*index];  // the element itself: where the maximum is 0, its sign is that element's
      return;
    }
  }
  *value = m, *index = 0;  // not reached: some element equals the maximum
}

// One head-row of rotary embedding (transformers' apply_rotary_pos_emb in bf16):
// out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), rotate_half(x) = (-x[h:], x[:h]).
NXCORE_TARGET void rotary_row(const at::BFloat16* x, const at::BFloat16* c, const at::BFloat16* s, at::BFloat16* out, int64_t D) {
  const int64_t h = D / 2;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t d = 0; d < h; d += 16) {
    const __mmask16 m = tail_mask(h - d);
    const __m512 lo = load_bf16(x + d, m), hi = load_bf16(x + h + d, m);
    const __m512 a = round_bf16(_mm512_mul_ps(lo, load_bf16(c + d, m)));
    const __m512 b = round_bf16(_mm512_mul_ps(_mm512_sub_ps(zero, hi), load_bf16(s + d, m)));
    store_bf16(out + d, _mm512_add_ps(a, b), m);
    const __m512 a2 = round_bf16(_mm512_mul_ps(hi, load_bf16(c + h + d, m)));
    const __m512 b2 = round_bf16(_mm512_mul_ps(lo, load_bf16(s + h + d, m)));
    store_bf16(out + h + d, _mm512_add_ps(a2, b2), m);
  }
}
#endif

bool fused_supported() {
#ifdef NXCORE_X86_GNU
  return nxcore::cpu_has_avx512_bf16();
#else
  return false;
#endif
}

void check_bf16(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "nxcore::", op, ": ", name, " must be bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "nxcore::", op, ": ", name, " must be on the CPU, got ", t.device());
}

void check_supported(const char* op) {
  TORCH_CHECK(fused_supported(), "nxcore::", op, ": this CPU lacks AVX512-BF16 (check torch.ops.nxcore._fused_supported())");
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_supported(op);
  check_bf16(x, op, "x");
  check_bf16(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 1 && x.dim() >= 1 && x.size(-1) == weight.size(0), "nxcore::", op, ": x ", x.sizes(),
              " does not end in the weight's size ", weight.sizes());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight, "rms_norm");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty_like(xc);
#ifdef NXCORE_X86_GNU
  const int64_t D = xc.size(-1), rows = xc.numel() / std::max<int64_t>(D, 1);
  const auto *xp = xc.const_data_ptr<at::BFloat16>(), *wp = wc.const_data_ptr<at::BFloat16>();
  auto* op = out.mutable_data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, grain_rows(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) norm_row(xp + r * D, wp, op + r * D, D, static_cast<float>(eps));
  });
#endif
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight, "add_rms_norm");
  check_bf16(residual, "add_rms_norm", "residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "nxcore::add_rms_norm: x ", x.sizes(), " and residual ", residual.sizes(), " differ");
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous(), wc = weight.contiguous();
  at::Tensor sum = at::empty_like(xc), out = at::empty_like(xc);
#ifdef NXCORE_X86_GNU
  const int64_t D = xc.size(-1), rows = xc.numel() / std::max<int64_t>(D, 1);
  const auto *xp = xc.const_data_ptr<at::BFloat16>(), *rp = rc.const_data_ptr<at::BFloat16>(), *wp = wc.const_data_ptr<at::BFloat16>();
  auto *sp = sum.mutable_data_ptr<at::BFloat16>(), *op = out.mutable_data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, grain_rows(2 * D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) add_norm_row(xp + r * D, rp + r * D, wp, sp + r * D, op + r * D, D, static_cast<float>(eps));
  });
#endif
  return {sum, out};
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_supported("silu_mul");
  check_bf16(gate_up, "silu_mul", "gate_up");
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, "nxcore::silu_mul: gate_up's last dimension must be even, got ", gate_up.sizes());
  const at::Tensor gu = gate_up.contiguous();
  const int64_t I = gu.size(-1) / 2, rows = gu.numel() / std::max<int64_t>(2 * I, 1);
  std::vector<int64_t> shape = gu.sizes().vec();
  shape.back() = I;
  at::Tensor out = at::empty(shape, gu.options());
#ifdef NXCORE_X86_GNU
  const auto* gp = gu.const_data_ptr<at::BFloat16>();
  auto* op = out.mutable_data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, grain_rows(2 * I), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) silu_mul_row(gp + r * 2 * I, gp + r * 2 * I + I, op + r * I, I);
  });
#endif
  return out;
}

// logits [N, V] float32 -> (values [N, 1], indices [N, 1] int64): x.max(dim=-1, keepdim=True), whose
// ATen kernel (value and index together) took 0.88 ms on [32, 32000] on one thread of an AMD EPYC,
// where the maximum alone (amax) took 0.05: this is the greedy token of every eager decode step.
std::tuple<at::Tensor, at::Tensor> row_max(const at::Tensor& logits) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.size(1) > 0 && logits.device().is_cpu(),
              "nxcore::row_max: logits must be a float32 [N, V] CPU tensor with V > 0, got ", logits.scalar_type(), " ", logits.sizes());
  const at::Tensor x = logits.contiguous();
  const int64_t N = x.size(0), V = x.size(1);
  at::Tensor values = at::empty({N, 1}, x.options());
  at::Tensor indices = at::empty({N, 1}, x.options().dtype(at::kLong));
#ifdef NXCORE_X86_GNU
  if (nxcore::cpu_has_avx512()) {
    const float* xp = x.const_data_ptr<float>();
    float* vp = values.mutable_data_ptr<float>();
    int64_t* ip = indices.mutable_data_ptr<int64_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, (256 * 1024) / (V * 4)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row_max_one(xp + r * V, V, vp + r, ip + r);
    });
    return {values, indices};
  }
#endif
  auto [v, i] = at::max(x, -1, true);
  return {v, i};
}

// x [B, H, T, D] (any strides with a contiguous last dimension), cos/sin [B, T, D] -> [B, H, T, D] contiguous.
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_supported("rotary");
  check_bf16(x, "rotary", "x");
  check_bf16(cos, "rotary", "cos");
  check_bf16(sin, "rotary", "sin");
  TORCH_CHECK(x.dim() == 4 && x.size(-1) % 2 == 0, "nxcore::rotary: x must be [B, H, T, D] with an even D, got ", x.sizes());
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  TORCH_CHECK(cos.sizes() == at::IntArrayRef({B, T, D}) && sin.sizes() == cos.sizes(), "nxcore::rotary: cos ", cos.sizes(), " and sin ",
              sin.sizes(), " must be [B, T, D] = [", B, ", ", T, ", ", D, "]");
  const at::Tensor xs = x.stride(3) == 1 ? x : x.contiguous();
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor out = at::empty({B, H, T, D}, x.options());
#ifdef NXCORE_X86_GNU
  const auto* xp = xs.const_data_ptr<at::BFloat16>();
  const auto *cp = cc.const_data_ptr<at::BFloat16>(), *sp = sc.const_data_ptr<at::BFloat16>();
  auto* op = out.mutable_data_ptr<at::BFloat16>();
  const int64_t sb = xs.stride(0), sh = xs.stride(1), st = xs.stride(2);
  // Positions outermost, heads innermost: x is usually a view of the fused QKV projection's
  // output ([B, T, H, D] storage), so one position's heads are one contiguous read, and its cos and
  // sin rows are read once for all of them. Heads outermost read D elements every H * D: 2.33
  // against 1.79 ms for 32 prompts of 128 tokens of 8 heads of 64, 0.99 against 0.65 for one of
  // 2048 (Intel Xeon, one thread, alternating in one process; the same bits).
  at::parallel_for(0, B * T * H, grain_rows(D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (T * H), t = (i / H) % T, h = i % H;
      const int64_t table = (b * T + t) * D;
      rotary_row(xp + b * sb + h * sh + t * st, cp + table, sp + table, op + ((b * H + h) * T + t) * D, D);
    }
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nxcore, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("row_max(Tensor logits) -> (Tensor, Tensor)");
  m.def("_fused_supported() -> bool", &fused_supported);
}

TORCH_LIBRARY_IMPL(nxcore, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rotary", &rotary);
  m.impl("row_max", &row_max);
}
