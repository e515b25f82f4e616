// Intel AMX (bf16 tiles) for nxcore's kernels: the run-time check, the tile configuration, and one
// micro-kernel, C[32 x 32] float32 += A[32 x K] . B[K x 32] in bf16 on 2 x 2 tiles.
//
// A tile register holds 16 rows of 64 bytes; TDPBF16PS multiplies a 16 x 32 bf16 tile of A by a
// B tile holding 16 pairs of K rows, each as 16 columns of (k, k + 1) pairs (the "VNNI" layout),
// adding into a 16 x 16 float32 tile of C. Each element of C is its own sum over the pairs of K in
// order, whatever the row of the tile it is in or the other rows: a row's result does not depend
// on the rows next to it (what batch-invariant mode needs, see nxcore/csrc/amx_linear.cpp).
#pragma once

#include "cpu_features.h"

#ifdef NXCORE_X86_GNU
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

#define NXCORE_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace nxcore::amx {

// Whether this CPU has AMX-TILE, AMX-BF16 and AVX512-BF16 and the kernel lets this process use the
// tile data (Linux asks each process to request it: arch_prctl ARCH_REQ_XCOMP_PERM). Once per process.
inline bool supported() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!cpu_has_avx512_bf16() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
    if (!tile || !bf16) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All eight tiles 16 rows of 64 bytes, in the calling thread. The tile state is per thread and
// oneDNN sets its own between our calls, so every kernel configures on entry and releases on exit.
NXCORE_AMX_TARGET inline void configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // GCC 12's _tile_loadconfig names only the first 8 bytes of the config as read, so the stores
  // above could be dropped (they were, inlined: tilezero then faulted); this names all 64.
  asm volatile("ldtilecfg %0" ::"m"(cfg));
}

NXCORE_AMX_TARGET inline void release() { _tile_release(); }

// C[16 RT x 16 CT] (float32, row stride ldc floats) = A . B over `steps` steps of 32 along K
// (ACC: C + A . B, C read first).
// A: bf16 rows, row stride lda elements (16 RT rows are read). B: tile (step s, column tile j) at
// b + s * b_step + j * b_col bytes, 16 rows of 64 bytes, row stride ldb bytes. Tiles 0-3 hold C,
// 4-5 A, 6-7 B. With PF, each step also prefetches the b_step bytes `prefetch` bytes past its B
// tiles (B contiguous, streamed from memory once: a tile register is not renamed, so a tile load
// that misses the cache stalls the next step's products).
template <int RT, int CT, bool PF = false, bool ACC = false>
NXCORE_AMX_TARGET inline void block(const uint16_t* a, int64_t lda, const char* b, int64_t b_step, int64_t b_col, int64_t ldb, int64_t steps,
                                    float* c, int64_t ldc, int64_t prefetch = 0) {
  static_assert((RT == 1 || RT == 2) && (CT == 1 || CT == 2));
  if constexpr (ACC) {
    _tile_loadd(0, c, ldc * 4);
    if constexpr (CT > 1) _tile_loadd(1, c + 16, ldc * 4);
    if constexpr (RT > 1) _tile_loadd(2, c + 16 * ldc, ldc * 4);
    if constexpr (RT > 1 && CT > 1) _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
  } else {
    _tile_zero(0);
    if constexpr (CT > 1) _tile_zero(1);
    if constexpr (RT > 1) _tile_zero(2);
    if constexpr (RT > 1 && CT > 1) _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t* as = a + 32 * s;
    const char* bs = b + s * b_step;
    if constexpr (PF)
      for (int64_t line = 0; line < b_step; line += 64) _mm_prefetch(bs + prefetch + line, _MM_HINT_T0);
    _tile_loadd(4, as, lda * 2);
    _tile_loadd(6, bs, ldb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (CT > 1) {
      _tile_loadd(7, bs + b_col, ldb);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (RT > 1) {
      _tile_loadd(5, as + 16 * lda, lda * 2);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (CT > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, ldc * 4);
  if constexpr (CT > 1) _tile_stored(1, c + 16, ldc * 4);
  if constexpr (RT > 1) _tile_stored(2, c + 16 * ldc, ldc * 4);
  if constexpr (RT > 1 && CT > 1) _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

}  // namespace nxcore::amx

#endif
