// The bf16 micro-kernel of nxcore's own products on CPUs with AVX512-BF16 (vdpbf16ps), shared by
// the prefill attention's two products (nxcore/csrc/prefill_attention.cpp, where ATen's brgemm has
// no AMX) and the linears on VNNI-packed weights (nxcore/csrc/invariant.cpp).
//
// c[M, N] = a[M, K] . b[K, N]: a row-major bf16 (row stride lda), b in the VNNI layout ([K / 2][ldb]
// 32-bit words, word (k / 2, n) = (b[k, n], b[k + 1, n])), K even. A tile of up to 6 rows by up to
// 4 vectors of 16 columns keeps its 24 float32 accumulators in registers; each step broadcasts one
// pair of a row and multiply-adds it against a pair of b's rows. Every element of c is one float32
// lane summing the pairs of K in order, whatever the tile, the number of rows or the thread: the
// products are batch-invariant. What a tile starts from and how it stores is the caller's `IO`:
// `init(row, v, mask)` and `store(row, v, mask, acc)` for vector v of the panel's columns.
#pragma once

#include "cpu_features.h"

#ifdef NXCORE_X86_GNU
#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "vec_exp.h"

#define NXCORE_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define NXCORE_VNNI_INLINE inline __attribute__((always_inline))

namespace nxcore::vnni {

constexpr int64_t kPanel = 64;  // columns of one panel: 4 vectors of 16

// Every loop over rows and vectors is unrolled so that the accumulators live in registers: left as
// loops, GCC kept them in a stack array and stored all 24 at every step of K (half the speed).
template <int MR, int NV, class IO>
NXCORE_VNNI_TARGET NXCORE_VNNI_INLINE void tile(int64_t pairs, const at::BFloat16* a, int64_t lda, const uint32_t* b, int64_t ldb, __mmask16 tail,
                                                const IO& io, int64_t row) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = io.init(row + r, v, v == NV - 1 ? tail : __mmask16(0xffff));
  const at::BFloat16* ar = a + row * lda;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = (__m512bh)(v == NV - 1 ? _mm512_maskz_loadu_epi32(tail, b + kp * ldb + 16 * v) : _mm512_loadu_si512(b + kp * ldb + 16 * v));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      uint32_t word;
      std::memcpy(&word, ar + r * lda + 2 * kp, sizeof(word));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(word));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) io.store(row + r, v, v == NV - 1 ? tail : __mmask16(0xffff), acc[r][v]);
}

template <int NV, class IO>
NXCORE_VNNI_TARGET void rows(int64_t M, int64_t pairs, const at::BFloat16* a, int64_t lda, const uint32_t* b, int64_t ldb, __mmask16 tail, const IO& io) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) tile<6, NV>(pairs, a, lda, b, ldb, tail, io, m);
  switch (M - m) {
    case 5: return tile<5, NV>(pairs, a, lda, b, ldb, tail, io, m);
    case 4: return tile<4, NV>(pairs, a, lda, b, ldb, tail, io, m);
    case 3: return tile<3, NV>(pairs, a, lda, b, ldb, tail, io, m);
    case 2: return tile<2, NV>(pairs, a, lda, b, ldb, tail, io, m);
    case 1: return tile<1, NV>(pairs, a, lda, b, ldb, tail, io, m);
    default: return;
  }
}

// All M rows of a against one panel of `cols` (1..64) columns of b (b points at the panel's first).
template <class IO>
NXCORE_VNNI_TARGET void panel(int64_t M, int64_t K, const at::BFloat16* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t cols, const IO& io) {
  const int64_t nv = (cols + 15) / 16;
  const __mmask16 tail = nxcore::tail_mask(cols - 16 * (nv - 1));
  switch (nv) {
    case 4: return rows<4>(M, K / 2, a, lda, b, ldb, tail, io);
    case 3: return rows<3>(M, K / 2, a, lda, b, ldb, tail, io);
    case 2: return rows<2>(M, K / 2, a, lda, b, ldb, tail, io);
    default: return rows<1>(M, K / 2, a, lda, b, ldb, tail, io);
  }
}

}  // namespace nxcore::vnni

#endif
