// Vectorized float32 helpers shared by nxcore's attention and fused kernels: exp, exp2, tail masks.
#pragma once

#include "cpu_features.h"

#ifdef NXCORE_X86_GNU
#include <immintrin.h>

namespace nxcore {

// The first min(n, 16) lanes (none for n <= 0): the tail of a row of floats.
__attribute__((target("avx512f"))) inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1);
}

// e^f for |f| <= ln2/2: its degree-6 Taylor polynomial (~2e-7 relative).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m512 exp_reduced16(__m512 f) {
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
}

// exp(x) to ~1 ulp: 2^n * e^f with |f| <= ln2/2, 0 below -104.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), f);
  return _mm512_scalef_ps(exp_reduced16(f), n);
}

// 2^x (a softmax's exponent less its max, in base 2; SiLU's e^-g): 2^n * p(f) with n = round(x),
// f = x - n in [-1/2, 1/2] and p a degree-5 polynomial fitted to 2^f for the least relative error
// (7.5e-8 on the interval, before float32 rounding; the degree-6 Taylor series of e^(f ln 2) it
// replaced was ~2e-7 and two instructions longer). Clamped at -126, so never a denormal (slow);
// past 128 it is +inf.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m512 exp2_16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.327647196221263e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675541739069028e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713277124286e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022119716407334e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469670603317e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.00000007165617f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace nxcore

#endif
