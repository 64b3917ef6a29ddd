// Small-matrix products for the CPU kernels, on PyTorch's oneDNN-backed brgemm (float: the
// oneDNN micro-kernel; bfloat16: oneDNN's bf16 gemm), always accumulating in float32.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace moediffuseq::cpu {

// C (M x N, ldc) = [C +] A (M x K, lda) * B (K x N, ldb); all row-major.
template <typename T>
inline void tile_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                      int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) {
      for (int64_t m = 0; m < M; ++m) std::fill_n(C + m * ldc, N, 0.f);
    }
    return;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

// dst (cols x rows, ld_dst) = src (rows x cols, ld_src) transposed, converting float -> T.
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
}

// The float matrix src (rows x cols, ld) as a gemm operand of type T: itself for float,
// converted into buf (same ld) for bfloat16.
template <typename T>
inline const T* gemm_operand(const float* src, int64_t ld, int64_t rows, int64_t cols, T* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) at::vec::convert(src + r * ld, buf + r * ld, cols);
    return buf;
  }
}

}  // namespace moediffuseq::cpu
