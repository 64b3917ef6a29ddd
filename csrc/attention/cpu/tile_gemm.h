// Small-matrix products of the CPU kernels, accumulating in float32.
//
// float32: PyTorch's oneDNN brgemm micro-kernel on plain row-major operands.
// bfloat16: B operands are packed in pairs along K ("VNNI-2": element (k, n) lives at
// p[(k / 2) * ld + 2 * n + k % 2], an odd K padded with a zero row) and multiplied with
// AVX512-BF16 dot products (vdpbf16ps) where the CPU kernels are built for them, else with a
// portable loop over the same layout.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define MOEDIFFUSEQ_AVX512BF16 1
#else
#define MOEDIFFUSEQ_AVX512BF16 0
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace moediffuseq::cpu {

// Whether B operands of element type T are pair-packed.
template <typename T>
constexpr bool kPairPacked = !std::is_same_v<T, float>;

// A B operand (K x N): row-major for float, pair-packed for bfloat16; ld counts elements
// between consecutive rows (float) or row pairs (bfloat16).
template <typename T>
struct BMat {
  const T* p;
  int64_t ld;
  BMat col(int64_t n) const { return {p + (kPairPacked<T> ? 2 * n : n), ld}; }
  BMat row(int64_t k) const { return {p + (kPairPacked<T> ? (k / 2) * ld : k * ld), ld}; }  // k even
};

// Elements per packed row of a B operand with n columns.
template <typename T>
constexpr int64_t packed_ld(int64_t n) {
  return kPairPacked<T> ? 2 * n : n;
}

// Rows of a packed operand with k logical rows.
template <typename T>
constexpr int64_t packed_rows(int64_t k) {
  return kPairPacked<T> ? (k + 1) / 2 : k;
}

// dst = B operand (K x N) holding X^T, where X is (N x K) with row stride ldx.
template <typename T>
inline void pack_transposed(const T* x, int64_t ldx, int64_t N, int64_t K, T* dst, int64_t ld) {
  constexpr int64_t kRows = 32;  // rows of X per step, kept in L1 while K columns are written
  for (int64_t n0 = 0; n0 < N; n0 += kRows) {
    const int64_t n1 = std::min(N, n0 + kRows);
    if constexpr (!kPairPacked<T>) {
      for (int64_t k = 0; k < K; ++k) {
        T* d = dst + k * ld;
        for (int64_t n = n0; n < n1; ++n) d[n] = x[n * ldx + k];
      }
    } else {
      for (int64_t k2 = 0; k2 < (K + 1) / 2; ++k2) {
        T* d = dst + k2 * ld;
        const bool pair = 2 * k2 + 1 < K;
        for (int64_t n = n0; n < n1; ++n) {
          d[2 * n] = x[n * ldx + 2 * k2];
          d[2 * n + 1] = pair ? x[n * ldx + 2 * k2 + 1] : T(0.f);
        }
      }
    }
  }
}

// dst = B operand (K x N) holding X itself, X (K x N) with row stride ldx (bfloat16 only:
// a float operand is used in place).
template <typename T>
inline void pack_rows(const T* x, int64_t ldx, int64_t K, int64_t N, T* dst, int64_t ld) {
  static_assert(kPairPacked<T>, "float operands are used in place");
  for (int64_t k2 = 0; k2 < (K + 1) / 2; ++k2) {
    const T* r0 = x + 2 * k2 * ldx;
    const T* r1 = r0 + ldx;
    T* d = dst + k2 * ld;
    if (2 * k2 + 1 < K) {
      for (int64_t n = 0; n < N; ++n) {
        d[2 * n] = r0[n];
        d[2 * n + 1] = r1[n];
      }
    } else {
      for (int64_t n = 0; n < N; ++n) {
        d[2 * n] = r0[n];
        d[2 * n + 1] = T(0.f);
      }
    }
  }
}

#if MOEDIFFUSEQ_AVX512BF16
namespace detail {

// C rows [0, MR) x 32 columns (+)= A (MR x 2*K2 bf16, as 32-bit pairs) * B (K2 packed rows).
template <int MR>
inline void bf16_micro(int64_t K2, const uint32_t* a, int64_t lda_w, const c10::BFloat16* b, int64_t ldb,
                       float* c, int64_t ldc, __mmask16 m0, __mmask16 m1, bool accumulate) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    acc0[i] = _mm512_setzero_ps();
    acc1[i] = _mm512_setzero_ps();
  }
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    const auto* brow = reinterpret_cast<const int32_t*>(b + k2 * ldb);
    const __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi32(m0, brow);
    const __m512bh b1 = (__m512bh)_mm512_maskz_loadu_epi32(m1, brow + 16);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(a[i * lda_w + k2]));
      acc0[i] = _mm512_dpbf16_ps(acc0[i], av, b0);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], av, b1);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    if (accumulate) {
      acc0[i] = _mm512_add_ps(acc0[i], _mm512_maskz_loadu_ps(m0, c + i * ldc));
      acc1[i] = _mm512_add_ps(acc1[i], _mm512_maskz_loadu_ps(m1, c + i * ldc + 16));
    }
    _mm512_mask_storeu_ps(c + i * ldc, m0, acc0[i]);
    _mm512_mask_storeu_ps(c + i * ldc + 16, m1, acc1[i]);
  }
}

}  // namespace detail
#endif

// C (M x N, ldc) = [C +] A (M x K, lda) * B; A row-major. For bfloat16, an odd K reads A's
// column K, which the caller keeps zero (A buffers are padded), and lda is even.
template <typename T>
inline void tile_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, BMat<T> B, float* C,
                      int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) {
      for (int64_t m = 0; m < M; ++m) std::fill_n(C + m * ldc, N, 0.f);
    }
    return;
  }
  if constexpr (!kPairPacked<T>) {
    at::native::cpublas::brgemm(M, N, K, lda, B.ld, ldc, accumulate, A, B.p, C, /*is_vnni=*/false);
  } else {
    const int64_t K2 = (K + 1) / 2;
#if MOEDIFFUSEQ_AVX512BF16
    constexpr int64_t kMR = 8, kNR = 32, kKC = 128;  // kKC pairs: a 16 KiB B panel stays in L1
    const auto* a_w = reinterpret_cast<const uint32_t*>(A);
    const int64_t lda_w = lda / 2;
    for (int64_t k0 = 0; k0 < K2; k0 += kKC) {
      const int64_t kc = std::min(kKC, K2 - k0);
      const bool acc = accumulate || k0 > 0;
      for (int64_t n0 = 0; n0 < N; n0 += kNR) {
        const int64_t nc = std::min(kNR, N - n0);
        const __mmask16 m0 = nc >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nc) - 1);
        const __mmask16 m1 = nc >= 32 ? 0xFFFF : (nc > 16 ? static_cast<__mmask16>((1u << (nc - 16)) - 1) : 0);
        const T* bp = B.p + k0 * B.ld + 2 * n0;
        for (int64_t m0r = 0; m0r < M; m0r += kMR) {
          const uint32_t* ap = a_w + m0r * lda_w + k0;
          float* cp = C + m0r * ldc + n0;
          switch (std::min(kMR, M - m0r)) {
            case 8: detail::bf16_micro<8>(kc, ap, lda_w, bp, B.ld, cp, ldc, m0, m1, acc); break;
            case 7: detail::bf16_micro<7>(kc, ap, lda_w, bp, B.ld, cp, ldc, m0, m1, acc); break;
            case 6: detail::bf16_micro<6>(kc, ap, lda_w, bp, B.ld, cp, ldc, m0, m1, acc); break;
            case 5: detail::bf16_micro<5>(kc, ap, lda_w, bp, B.ld, cp, ldc, m0, m1, acc); break;
            case 4: detail::bf16_micro<4>(kc, ap, lda_w, bp, B.ld, cp, ldc, m0, m1, acc); break;
            case 3: detail::bf16_micro<3>(kc, ap, lda_w, bp, B.ld, cp, ldc, m0, m1, acc); break;
            case 2: detail::bf16_micro<2>(kc, ap, lda_w, bp, B.ld, cp, ldc, m0, m1, acc); break;
            default: detail::bf16_micro<1>(kc, ap, lda_w, bp, B.ld, cp, ldc, m0, m1, acc); break;
          }
        }
      }
    }
#else
    for (int64_t m = 0; m < M; ++m) {
      float* c = C + m * ldc;
      if (!accumulate) std::fill_n(c, N, 0.f);
      for (int64_t k2 = 0; k2 < K2; ++k2) {
        const float a0 = static_cast<float>(A[m * lda + 2 * k2]);
        const float a1 = static_cast<float>(A[m * lda + 2 * k2 + 1]);
        const T* b = B.p + k2 * B.ld;
        for (int64_t n = 0; n < N; ++n) {
          c[n] += a0 * static_cast<float>(b[2 * n]) + a1 * static_cast<float>(b[2 * n + 1]);
        }
      }
    }
#endif
  }
}

// dst (cols x rows, ld_dst) = src (rows x cols, ld_src) transposed, converted to T. For
// bfloat16 an odd `rows` gets a zero column `rows` (the padding tile_gemm reads).
template <typename T>
inline void transpose_to(const float* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst,
                         int64_t ld_dst) {
  constexpr int64_t kTile = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t r1 = std::min(rows, r0 + kTile);
    for (int64_t c = 0; c < cols; ++c) {
      T* d = dst + c * ld_dst;
      for (int64_t r = r0; r < r1; ++r) d[r] = static_cast<T>(src[r * ld_src + c]);
    }
  }
  if (kPairPacked<T> && rows % 2 == 1) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + rows] = T(0.f);
  }
}

// The float matrix src (rows x cols, ld) as an A operand of type T: itself for float,
// converted into buf (same ld) for bfloat16, with a zero column `cols` when cols is odd.
template <typename T>
inline const T* gemm_operand(const float* src, int64_t ld, int64_t rows, int64_t cols, T* buf) {
  if constexpr (!kPairPacked<T>) {
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      at::vec::convert(src + r * ld, buf + r * ld, cols);
      if (cols % 2 == 1) buf[r * ld + cols] = T(0.f);
    }
    return buf;
  }
}

// Copies rows (rows x cols, ld_src) into dst (ld_dst), zero-padding column `cols` when odd
// (bfloat16 A operands whose K = cols).
template <typename T>
inline void copy_rows_padded(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * ld_dst, src + r * ld_src, cols * sizeof(T));
    if (cols % 2 == 1) dst[r * ld_dst + cols] = T(0.f);
  }
}

}  // namespace moediffuseq::cpu
