// Row conversions to and from float32 for the elementwise CPU kernels. ATen's generic
// at::vec::convert from bfloat16 to float is a scalar loop; this one widens 16 values per
// instruction where AVX512 is compiled in.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace moediffuseq::cpu {

template <typename T>  // other dtypes of a dispatch macro (the kernels reject them before)
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void to_float(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  for (; i + 16 <= n; i += 16) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  at::vec::convert(src, dst, n);  // vectorised (round to nearest even) for bfloat16
}

// One vector of Vectorized<float>::size() values, widened to float32 / narrowed from it.
using FloatVec = at::vec::Vectorized<float>;

template <typename T>  // other dtypes of a dispatch macro (the kernels reject them before)
inline FloatVec load_float(const T* p) {
  float tmp[FloatVec::size()];
  to_float(p, tmp, FloatVec::size());
  return FloatVec::loadu(tmp);
}

template <typename T>
inline void store_float(const FloatVec& v, T* p) {
  float tmp[FloatVec::size()];
  v.store(tmp);
  for (int64_t i = 0; i < FloatVec::size(); ++i) p[i] = static_cast<T>(tmp[i]);
}

inline FloatVec load_float(const float* p) { return FloatVec::loadu(p); }

inline FloatVec load_float(const c10::BFloat16* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return FloatVec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
#else
  float tmp[FloatVec::size()];
  to_float(p, tmp, FloatVec::size());
  return FloatVec::loadu(tmp);
#endif
}

inline void store_float(const FloatVec& v, float* p) { v.store(p); }

inline void store_float(const FloatVec& v, c10::BFloat16* p) {
#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
#else
  float tmp[FloatVec::size()];
  v.store(tmp);
  at::vec::convert(tmp, p, FloatVec::size());
#endif
}

}  // namespace moediffuseq::cpu
