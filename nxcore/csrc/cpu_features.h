// Run-time CPU feature checks shared by nxcore's C++ ops (each op keeps a portable path for CPUs
// without them).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define NXCORE_X86_GNU 1

namespace nxcore {

// AVX-512 foundation with byte/word, vector-length and doubleword/quadword extensions.
inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

// The above plus the bfloat16 dot-product and conversion instructions.
inline bool cpu_has_avx512_bf16() {
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
}

}  // namespace nxcore

#endif
