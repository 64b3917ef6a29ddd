// Plain parameters of the diffusion kernels (soft_absorb_q_sample, denoise_step,
// nearest_embedding), shared by the backends. No torch header: the CUDA kernels include it and
// compile with nvcc alone. Tensors are contiguous: x-like (B, L, d), masks and draws (B, L),
// coefficients float32 (B).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace moediffuseq {

// Target rows: m where uniform < gamma * sqrt_1mab[b], else sqrt_ab (x0 - m) + sqrt_1mab noise + m;
// source rows: x0 (METHOD §5).
struct SoftAbsorbQSampleParams {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, seqlen = 0, dim = 0;
  float gamma = 0.5f;
  const void* x0 = nullptr;
  const void* m = nullptr;               // (d)
  const bool* target_mask = nullptr;
  const float* sqrt_ab = nullptr;
  const float* sqrt_1mab = nullptr;
  const void* noise = nullptr;
  const float* uniform = nullptr;
  void* out = nullptr;
};

// grad_x0 = grad (source), 0 (absorbed), sqrt_ab grad (noised);
// grad_m = sum over absorbed rows of grad + sum over noised rows of (1 - sqrt_ab) grad, float32.
struct SoftAbsorbQSampleBackwardParams {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, seqlen = 0, dim = 0;
  float gamma = 0.5f;
  const void* grad = nullptr;
  const bool* target_mask = nullptr;
  const float* sqrt_ab = nullptr;
  const float* sqrt_1mab = nullptr;
  const float* uniform = nullptr;
  void* grad_x0 = nullptr;
  float* grad_m = nullptr;   // (d)
  float* partial = nullptr;  // scratch (soft_absorb_backward_splits(B * L), d) float32
};

// Row splits of the deterministic two-pass grad_m reduction.
inline int64_t soft_absorb_backward_splits(int64_t rows) {
  const int64_t splits = (rows + 63) / 64;
  return splits < 1 ? 1 : (splits > 1024 ? 1024 : splits);
}

// Target rows: a x_t + b x0_hat + c x0_prev + s noise + (1 - a - b - c) m (c = 0 without x0_prev);
// source rows: anchor. out may be x_t (elementwise update).
struct DenoiseStepParams {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, seqlen = 0, dim = 0;
  const void* x_t = nullptr;
  const void* x0_hat = nullptr;
  const void* x0_prev = nullptr;  // may be null
  const void* noise = nullptr;    // may be null
  const void* anchor = nullptr;
  const bool* target_mask = nullptr;
  const void* m = nullptr;        // (d)
  const float* coef_xt = nullptr;
  const float* coef_x0 = nullptr;
  const float* coef_x0_prev = nullptr;
  const float* coef_noise = nullptr;
  void* out = nullptr;
};

// One vocabulary chunk of nearest_embedding: for each row r, the columns c of the chunk with
// dist = norms[c] - 2 dots[r, c] (= ||e||^2 - 2 x . e); a strictly smaller distance than the
// running best replaces it (ties keep the lower index, chunks go in vocabulary order).
struct NearestEmbeddingChunkParams {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t vocab_offset = 0;       // index of the chunk's first column
  const float* dots = nullptr;    // (rows, cols) x . e
  const float* norms = nullptr;   // (cols) ||e||^2
  float* best_dist = nullptr;     // (rows), +inf before the first chunk
  int64_t* best_index = nullptr;  // (rows), 0 before the first chunk
};

}  // namespace moediffuseq
