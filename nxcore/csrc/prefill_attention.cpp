// nxcore::prefill_attention on CPU: causal attention of a context-encoding call (bf16), on AMX or
// AVX512-BF16.
//
// Why: context encoding's attention ran `F.scaled_dot_product_attention` (is_causal, GQA), whose
// CPU flash kernel measured 106-237 GFLOP/s here (Intel Xeon with AMX, one thread, 8 heads of 64,
// 128-2048 tokens): most of its time went to exp over the score blocks, not to the products. This
// kernel is the same algorithm (blocks of queries against blocks of keys at or below the diagonal,
// an online softmax in float32, probabilities rounded to bf16 for the product with V) with both
// products on ATen's brgemm (oneDNN's AMX micro-kernels) and a vectorized exp. Where ATen's brgemm
// takes no bf16 (no AMX: AMD EPYC with AVX512-BF16), both products run `gemm_vnni`, a vdpbf16ps
// micro-kernel of this file, on the same packed blocks. Measured on AMD EPYC (Zen 4, one thread,
// 8 heads of 64 over 4 KV heads, `torch.ops.nxcore.prefill_attention` alone against SDPA, three
// runs each): 0.24 / 2.1 / 28.4 ms against 0.57 / 7.3 / 68.5 at 128 / 512 / 2048 tokens (152 GFLOP/s
// of causal work at 2048; the products alone run at ~90% of the 228 GFLOP/s oneDNN's bf16 GEMM
// reaches on this CPU).
//
// Where the time goes (one thread, 8 heads of 64 over 4 KV heads, 2048 tokens, ~15 ms a layer):
// ~7 ms in the two brgemms and the packing, the rest in the softmax between them. That pass reads
// each score block twice, once for its max (of the raw scores: scale > 0, so the scaled max is
// max * scale) and once for the exp, in base 2 with the scale folded into one FMA, masking only
// where a block crosses the diagonal or the end. Against scaling, masking and storing the scores
// in a pass of their own, three alternations of the two builds: 16.75 / 15.22 / 15.02 against
// 16.61 / 16.61 / 16.31 ms a layer at 2048 tokens, 1.31 / 1.25 / 1.17 against 1.35 / 1.34 / 1.24 at
// 512 (level in the first, 5-9% faster in the others). Key blocks of 256 and query blocks of 128
// measured no faster.
//
// Short prompts: a query block's products stop at the last key any of its rows sees (rounded up to
// 32 columns) instead of running the whole key block past the diagonal, and V is packed a pair of
// rows at a time (it was one element at a time). Bits unchanged (the skipped columns were masked to
// exact zeros); on AMD EPYC, same harness and shape: 0.23 -> 0.18 ms at 128 tokens, 2.12 -> 1.93 at
// 512, 29.0 -> 28.5 at 2048.
//
// On CPUs with AMX both products run on nxcore's own AMX tiles (nxcore/csrc/amx.h) where head_dim
// is a multiple of 32, ATen's brgemm otherwise: brgemm looks its kernel up and loads a tile
// configuration on each call, two calls a (query block, key block), where the tiles are configured
// once per task; and the products stop at the last key a query block sees, as on the vdpbf16ps
// path. Same bits (each element's sum over K runs in 32-element steps in order either way); on the
// Intel Xeon (one thread, 8 heads of 64 over 4 KV heads, median of 9 alternating calls in one
// process): 0.142 -> 0.112 ms at 128 tokens, 1.43 -> 1.19 at 512, 19.3 -> 17.0 at 2048. There the
// softmax between the products is most of the time at 2048 tokens; key blocks of 256 and query
// blocks of 32 measured within noise of these.
//
// The softmax runs in two passes over a block's rows: every row's max first, then the corrections
// of the running sums for 16 rows at once (one vector exp2), then every row's exp; one row at a
// time, each row's max, its horizontal reduction and a scalar exp2 were a chain the next row's
// work waited on. With exp2_16 two instructions shorter (vec_exp.h), q, k and v read in place
// (v is a view of the QKV projection's output, copied before) and out written as the output
// projection reads it ([B, T, H, D] in memory, which attention copied into after), the op and that
// copy took 0.185 / 1.61 / 22.2 ms against 0.211 / 1.90 / 25.3 at 128 / 512 / 2048 tokens (Intel
// Xeon, one thread, 8 heads of 64 over 4 KV heads, 15-21 alternating calls in one process; 0.26 /
// 1.82 / 22.4 against 0.31 / 2.24 / 26.2 in another run). Outputs move by one bf16 unit in
// 0.03-0.1% of elements at 512-2048 tokens (the polynomial exp2 of the corrections, where libm's
// ran before).
//
// Layout: q [B, H, T, D], k and v [B, KV, T, D] (KV divides H: query head h reads KV head
// h / (H / KV)); out [B, H, T, D]. Query i attends keys 0..i. D must be even (bf16 pairs).
// Each (batch row, KV head) packs its K^T and V blocks once into brgemm's VNNI layout; then
// (batch row, query head, query block) tasks run in parallel. Every sum is in float32. out is
// returned as a [B, H, T, D] view of [B, T, H, D] memory.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include "amx.h"
#include "cpu_features.h"
#include "vec_exp.h"
#include "vnni_gemm.h"

#include <algorithm>
#include <limits>
#include <vector>

namespace {

// Query rows per task: 64 for ATen's AMX brgemm (as measured on Intel Xeon), 32 for the vdpbf16ps
// kernel, whose tiles are 6 rows anyway and which then skips more of the keys past the diagonal
// (see `cols` in query_block). On AMD EPYC (one thread, 8 heads of 64 over 4 KV heads, /tmp
// harness, five alternating rounds): 0.19-0.20 against 0.21-0.23 ms at 128 tokens, 1.84-2.02
// against 1.96-2.10 at 512, level at 2048.
constexpr int64_t kQBlockAmx = 64, kQBlockVnni = 32;
static_assert(kQBlockAmx >= kQBlockVnni, "query_block's per-row scratch is sized for kQBlockAmx rows");
constexpr int64_t kKBlock = 128;  // keys per block (even: VNNI packs pairs of keys for P.V)

bool prefill_attention_supported() {
#ifdef NXCORE_X86_GNU
  return nxcore::cpu_has_avx512_bf16();
#else
  return false;
#endif
}

#ifdef NXCORE_X86_GNU
#define NXCORE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// Both products where ATen's brgemm does not run bf16 (could_pack is false without AMX): nxcore's
// vdpbf16ps micro-kernel (vnni_gemm.h) on the blocks packed below, c float32 (row stride ldc),
// overwritten or added to.
struct FloatOut {
  float* c;
  int64_t ldc;
  bool add;
  NXCORE_TARGET NXCORE_VNNI_INLINE __m512 init(int64_t r, int v, __mmask16 mask) const {
    return add ? _mm512_maskz_loadu_ps(mask, c + r * ldc + 16 * v) : _mm512_setzero_ps();
  }
  NXCORE_TARGET NXCORE_VNNI_INLINE void store(int64_t r, int v, __mmask16 mask, __m512 acc) const {
    _mm512_mask_storeu_ps(c + r * ldc + 16 * v, mask, acc);
  }
};

// Same arguments as at::native::cpublas::brgemm.
NXCORE_TARGET void gemm_vnni(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const at::BFloat16* a,
                             const at::BFloat16* b, float* c) {
  const auto* bw = reinterpret_cast<const uint32_t*>(b);
  for (int64_t n0 = 0; n0 < N; n0 += nxcore::vnni::kPanel)
    nxcore::vnni::panel(M, K, a, lda, bw + n0, ldb, std::min(nxcore::vnni::kPanel, N - n0), FloatOut{c + n0, ldc, add});
}

// Both products on AMX tiles (nxcore/csrc/amx.h), same arguments as at::native::cpublas::brgemm
// with B in its VNNI layout ([K / 2][ldb][2]): M <= 64 rows of A are read in whole tiles of 16
// (query_block pads q; p's extra rows are scratch whose results are never read), N and K multiples
// of 32 (a head_dim that is not runs ATen's brgemm instead, see Products).
template <int RT, int CT, bool ACC>
NXCORE_AMX_TARGET inline void tiles(const at::BFloat16* a, int64_t lda, const char* b, int64_t ldb, int64_t steps, float* c, int64_t ldc) {
  nxcore::amx::block<RT, CT, false, ACC>(reinterpret_cast<const uint16_t*>(a), lda, b, 16 * ldb * 4, 64, ldb * 4, steps, c, ldc);
}

template <bool ACC>
NXCORE_AMX_TARGET void gemm_tiles(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, const at::BFloat16* a,
                                  const at::BFloat16* b, float* c) {
  const char* bb = reinterpret_cast<const char*>(b);
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    const at::BFloat16* am = a + m0 * lda;
    float* cm = c + m0 * ldc;
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      const bool two_rows = M - m0 > 16, two_cols = N - n0 > 16;
      if (two_rows && two_cols)
        tiles<2, 2, ACC>(am, lda, bb + n0 * 4, ldb, K / 32, cm + n0, ldc);
      else if (two_rows)
        tiles<2, 1, ACC>(am, lda, bb + n0 * 4, ldb, K / 32, cm + n0, ldc);
      else if (two_cols)
        tiles<1, 2, ACC>(am, lda, bb + n0 * 4, ldb, K / 32, cm + n0, ldc);
      else
        tiles<1, 1, ACC>(am, lda, bb + n0 * 4, ldb, K / 32, cm + n0, ldc);
    }
  }
}

// Which kernel runs the products of query_block: nxcore's AMX tiles (CPUs with AMX, head_dim a
// multiple of 32), ATen's brgemm (oneDNN's AMX micro-kernels: other head_dims), else gemm_vnni.
// Against ATen's brgemm on the Intel Xeon (one thread, 8 heads of 64 over 4 KV heads, the tiles
// configured once per task instead of per call, products past a query block's last key skipped):
// see the header.
enum class Kernel { kTiles, kBrgemm, kVnni };

struct Products {
  Kernel kernel;
  bool amx() const { return kernel != Kernel::kVnni; }
  void operator()(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const at::BFloat16* a, const at::BFloat16* b,
                  float* c) const {
    if (kernel == Kernel::kTiles) {
      if (add)
        gemm_tiles<true>(M, N, K, lda, ldb, ldc, a, b, c);
      else
        gemm_tiles<false>(M, N, K, lda, ldb, ldc, a, b, c);
    } else if (kernel == Kernel::kBrgemm) {
      at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, a, b, c);
    } else {
      gemm_vnni(M, N, K, lda, ldb, ldc, add, a, b, c);
    }
  }
};

// One query block of one head: out[rows, D] = softmax(q k^T * scale, causal) v.
// q: the block's first query row (query i0), rows q_stride apart (on AMX tiles, whole tiles of 16
// rows are read: the caller pads a last block that ends inside one).
// kt: K^T blocks packed for brgemm ([nblk][D/2][kKBlock][2]); vp: V blocks packed ([nblk][kKBlock/2][D][2]).
NXCORE_TARGET void query_block(const at::BFloat16* q, int64_t q_stride, int64_t i0, int64_t rows, int64_t T, int64_t D,
                               const at::BFloat16* kt, const at::BFloat16* vp, float scale, at::BFloat16* out, int64_t out_stride,
                               float* s, at::BFloat16* p, float* acc, float* m, float* l, Products brgemm) {
  std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
  std::fill(l, l + rows, 0.f);
  std::fill(acc, acc + rows * D, 0.f);
  const int64_t last_key = i0 + rows - 1;
  const float log2_scale = scale * 1.44269504088896341f;  // scores are exponentiated in base 2
  const __m512 log2_scale_v = _mm512_set1_ps(log2_scale);
  for (int64_t j0 = 0, blk = 0; j0 <= last_key; j0 += kKBlock, ++blk) {
    const int64_t keys = std::min(kKBlock, T - j0);
    // Columns of the block any row of this query block may see, in whole vectors of 32 (the
    // block's rest is masked for every row); ATen's brgemm keeps the whole block.
    const int64_t cols = brgemm.kernel == Kernel::kBrgemm ? kKBlock : std::min(kKBlock, (last_key - j0 + 32) / 32 * 32);
    // s[rows, cols] = q[rows, D] . K^T[D, cols]
    brgemm(rows, cols, D, q_stride, kKBlock, kKBlock, false, q, kt + blk * D * kKBlock, s);
    // Pass 1, every row: the running max of the raw scores (two accumulators), in base 2. scale > 0,
    // so max(s) * scale is the max of the scaled scores, and the scores need no pass of their own
    // to be scaled and masked before the exp.
    alignas(64) float mnew[kQBlockAmx], corr[kQBlockAmx];
    for (int64_t r = 0; r < rows; ++r) {
      const float* sr = s + r * kKBlock;
      const int64_t allowed = std::min(keys, i0 + r - j0 + 1);  // keys j0 .. j0 + allowed - 1 are at or before the query
      __m512 top0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), top1 = top0;
      if (allowed == kKBlock) {
        for (int64_t c = 0; c < kKBlock; c += 32) {
          top0 = _mm512_max_ps(top0, _mm512_loadu_ps(sr + c));
          top1 = _mm512_max_ps(top1, _mm512_loadu_ps(sr + c + 16));
        }
      } else {
        for (int64_t c = 0; c < allowed; c += 16) top0 = _mm512_mask_max_ps(top0, nxcore::tail_mask(allowed - c), top0, _mm512_loadu_ps(sr + c));
      }
      mnew[r] = std::max(m[r], _mm512_reduce_max_ps(_mm512_max_ps(top0, top1)) * log2_scale);
    }
    // The running sums' corrections, 16 rows at a time: 2^(m_old - m_new), 0 for a first block.
    for (int64_t r = 0; r < rows; r += 16) {
      const __mmask16 mask = nxcore::tail_mask(rows - r);
      const __m512 mo = _mm512_maskz_loadu_ps(mask, m + r), mn = _mm512_maskz_loadu_ps(mask, mnew + r);
      const __mmask16 first = _mm512_cmp_ps_mask(mo, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
      __m512 cv = nxcore::exp2_16(_mm512_sub_ps(_mm512_mask_mov_ps(mo, first, mn), mn));
      cv = _mm512_mask_mov_ps(cv, first, _mm512_setzero_ps());
      _mm512_mask_storeu_ps(corr + r, mask, cv);
      _mm512_mask_storeu_ps(m + r, mask, mn);
    }
    // Pass 2, every row: the probabilities in bf16 and their sum.
    for (int64_t r = 0; r < rows; ++r) {
      const float* sr = s + r * kKBlock;
      const int64_t allowed = std::min(keys, i0 + r - j0 + 1);
      const __m512 mv = _mm512_set1_ps(m[r]);
      __m512 total = _mm512_setzero_ps();
      at::BFloat16* pr = p + r * kKBlock;
      for (int64_t c = 0; c < cols; c += 16) {
        // exp(s * scale - max) = 2^(s * scale * log2(e) - max * log2(e)); masked keys get an exact 0
        __m512 e = nxcore::exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(sr + c), log2_scale_v, mv));
        if (c + 16 > allowed) e = _mm512_maskz_mov_ps(nxcore::tail_mask(allowed - c), e);
        const __m256i eb = (__m256i)_mm512_cvtneps_pbh(e);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + c), eb);
        // sum what the product with V will see: the bf16-rounded probabilities
        total = _mm512_add_ps(total, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(eb), 16)));
      }
      const float correction = corr[r];
      l[r] = l[r] * correction + _mm512_reduce_add_ps(total);
      if (correction != 1.f) {
        const __m512 cv = _mm512_set1_ps(correction);
        float* ar = acc + r * D;
        int64_t d = 0;
        for (; d + 16 <= D; d += 16) _mm512_storeu_ps(ar + d, _mm512_mul_ps(_mm512_loadu_ps(ar + d), cv));
        for (; d < D; ++d) ar[d] *= correction;
      }
    }
    // acc[rows, D] += p[rows, cols] . V[cols, D]
    brgemm(rows, D, cols, kKBlock, D, D, true, p, vp + blk * kKBlock * D, acc);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.f / l[r];
    for (int64_t d = 0; d < D; ++d) out[(i0 + r) * out_stride + d] = at::BFloat16(acc[r * D + d] * inv);
  }
}
#endif

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(prefill_attention_supported(), "nxcore::prefill_attention: this CPU lacks AVX512-BF16 (check torch.ops.nxcore._prefill_attention_supported())");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "nxcore::prefill_attention: q, k and v must be bfloat16, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "nxcore::prefill_attention: tensors must be on the CPU");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "nxcore::prefill_attention: q, k, v must be [B, heads, T, D]");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(2) == T && k.size(3) == D, "nxcore::prefill_attention: k ", k.sizes(),
              " and v ", v.sizes(), " must be [B, KV, T, D] for q ", q.sizes());
  TORCH_CHECK(KV >= 1 && H % KV == 0, "nxcore::prefill_attention: KV heads (", KV, ") must divide query heads (", H, ")");
  TORCH_CHECK(D % 2 == 0, "nxcore::prefill_attention: head_dim must be even, got ", D);
  TORCH_CHECK(scale > 0, "nxcore::prefill_attention: scale must be positive, got ", scale);
  // out is [B, T, H, D] in memory, returned as its [B, H, T, D] view: the output projection reads
  // it as [B, T, H * D] without a copy.
  at::Tensor out = at::empty({B, T, H, D}, q.options()).permute({0, 2, 1, 3});
#ifdef NXCORE_X86_GNU
  // q, k and v are read in place where each position's D elements are contiguous and every stride
  // is even (the kernels read bf16 pairs as 32-bit words): attention hands views of the fused QKV
  // projection's output (v is one, [B, T, KV, D] storage).
  auto rows_in_place = [](const at::Tensor& x) {
    return x.stride(3) == 1 && x.stride(0) % 2 == 0 && x.stride(1) % 2 == 0 && x.stride(2) % 2 == 0 &&
           reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 4 == 0;
  };
  const at::Tensor qc = rows_in_place(q) ? q : q.contiguous(), kc = rows_in_place(k) ? k : k.contiguous(),
                   vc = rows_in_place(v) ? v : v.contiguous();
  const int64_t nblk = (T + kKBlock - 1) / kKBlock;
  // K^T and V blocks of every (row, KV head) in brgemm's packed layout, zero past T.
  at::Tensor kt = at::empty({B, KV, nblk, D * kKBlock}, q.options());
  at::Tensor vp = at::empty({B, KV, nblk, kKBlock * D}, q.options());
  const auto* kp = kc.const_data_ptr<at::BFloat16>();
  const auto* vsrc = vc.const_data_ptr<at::BFloat16>();
  auto* ktp = kt.mutable_data_ptr<at::BFloat16>();
  auto* vpp = vp.mutable_data_ptr<at::BFloat16>();
  const int64_t ks0 = kc.stride(0), ks1 = kc.stride(1), ks2 = kc.stride(2), vs0 = vc.stride(0), vs1 = vc.stride(1), vs2 = vc.stride(2);
  // VNNI layout of a [K, N] bf16 matrix: pairs of rows interleaved, element (k, n) at
  // ((k / 2) * N + n) * 2 + k % 2, i.e. one 32-bit word per (row pair, column).
  at::parallel_for(0, B * KV * nblk, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bk = t / nblk, blk = t % nblk, j0 = blk * kKBlock, keys = std::min(kKBlock, T - j0);
      const int64_t b = bk / KV, kvh = bk % KV;
      // K^T block: [D, kKBlock], (d, j) = k[j0 + j, d]: word (d / 2, j) is k's word (j, d / 2).
      const auto* kw = reinterpret_cast<const uint32_t*>(kp + b * ks0 + kvh * ks1 + j0 * ks2);
      auto* kt_out = reinterpret_cast<uint32_t*>(ktp + t * D * kKBlock);
      for (int64_t dp = 0; dp < D / 2; ++dp) {
        for (int64_t j = 0; j < keys; ++j) kt_out[dp * kKBlock + j] = kw[j * (ks2 / 2) + dp];
        for (int64_t j = keys; j < kKBlock; ++j) kt_out[dp * kKBlock + j] = 0;
      }
      // V block: [kKBlock, D], (j, d) = v[j0 + j, d]: word (j / 2, d) holds rows j (low half) and
      // j + 1 (high half), zero rows past the prompt.
      const auto* vw = reinterpret_cast<const uint16_t*>(vsrc + b * vs0 + kvh * vs1 + j0 * vs2);
      auto* v_out = reinterpret_cast<uint32_t*>(vpp + t * kKBlock * D);
      for (int64_t jp = 0; jp < kKBlock / 2; ++jp) {
        const uint16_t* lo = 2 * jp < keys ? vw + 2 * jp * vs2 : nullptr;
        const uint16_t* hi = 2 * jp + 1 < keys ? vw + (2 * jp + 1) * vs2 : nullptr;
        uint32_t* w = v_out + jp * D;
        if (lo && hi) {
          for (int64_t d = 0; d < D; ++d) w[d] = static_cast<uint32_t>(lo[d]) | static_cast<uint32_t>(hi[d]) << 16;
        } else {
          for (int64_t d = 0; d < D; ++d) w[d] = lo ? lo[d] : 0;
        }
      }
    }
  });
  const Products products{nxcore::amx::supported() && D % 32 == 0    ? Kernel::kTiles
                           : at::native::cpublas::could_pack(at::kBFloat16) ? Kernel::kBrgemm
                                                                            : Kernel::kVnni};
  const int64_t qblock = products.amx() ? kQBlockAmx : kQBlockVnni;
  const int64_t qblocks = (T + qblock - 1) / qblock, group = H / KV;
  const auto* qp = qc.const_data_ptr<at::BFloat16>();
  const int64_t qs0 = qc.stride(0), qs1 = qc.stride(1), qs2 = qc.stride(2);
  auto* op = out.mutable_data_ptr<at::BFloat16>();
  // Tasks from the longest query blocks (the last ones, reading the most keys) down, so the
  // threads finish together.
  at::parallel_for(0, B * H * qblocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(qblock * kKBlock), acc(qblock * D), m(qblock), l(qblock);
    std::vector<at::BFloat16> p(qblock * kKBlock), qpad(products.kernel == Kernel::kTiles ? qblock * D : 0);
    if (products.kernel == Kernel::kTiles) nxcore::amx::configure();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / qblocks, qb = qblocks - 1 - t % qblocks;
      const int64_t b = bh / H, h = bh % H, bk = b * KV + h / group;
      const int64_t i0 = qb * qblock, rows = std::min(qblock, T - i0);
      const at::BFloat16* qrows = qp + b * qs0 + h * qs1 + i0 * qs2;
      int64_t q_stride = qs2;
      if (products.kernel == Kernel::kTiles && rows % 16 != 0) {  // the tiles read whole 16-row tiles of q
        for (int64_t r = 0; r < rows; ++r) std::copy(qrows + r * qs2, qrows + r * qs2 + D, qpad.begin() + r * D);
        std::fill(qpad.begin() + rows * D, qpad.end(), at::BFloat16(0.f));
        qrows = qpad.data();
        q_stride = D;
      }
      query_block(qrows, q_stride, i0, rows, T, D, ktp + bk * nblk * D * kKBlock, vpp + bk * nblk * kKBlock * D, static_cast<float>(scale),
                  op + b * T * H * D + h * D, H * D, s.data(), p.data(), acc.data(), m.data(), l.data(), products);
    }
    if (products.kernel == Kernel::kTiles) nxcore::amx::release();
    if (products.kernel == Kernel::kBrgemm) at::native::cpublas::brgemm_release();
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nxcore, m) {
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("_prefill_attention_supported() -> bool", &prefill_attention_supported);
}

TORCH_LIBRARY_IMPL(nxcore, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
