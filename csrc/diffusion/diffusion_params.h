// Plain parameters of the diffusion kernels (soft_absorb_q_sample, denoise_step,
// nearest_embedding), shared by the backends. No torch header: the CUDA kernels include it and
// compile with nvcc alone. Tensors are contiguous: x-like (B, L, d), masks and draws (B, L),
// coefficients float32 (B).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace moediffuseq {

// What both directions of soft_absorb_q_sample read: the shapes, the absorbing strength and the
// per-position schedule. A target row is absorbed (x_t = m) where uniform < gamma * sqrt_1mab[b].
struct SoftAbsorbSchedule {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, seqlen = 0, dim = 0;
  float gamma = 0.5f;
  const bool* target_mask = nullptr;
  const float* sqrt_ab = nullptr;
  const float* sqrt_1mab = nullptr;
  const float* uniform = nullptr;
};

// Target rows: m where absorbed, else sqrt_ab (x0 - m) + sqrt_1mab noise + m; source rows: x0
// (METHOD §5).
struct SoftAbsorbQSampleParams : SoftAbsorbSchedule {
  const void* x0 = nullptr;
  const void* m = nullptr;  // (d)
  const void* noise = nullptr;
  void* out = nullptr;
};

// grad_x0 = grad (source), 0 (absorbed), sqrt_ab grad (noised);
// grad_m = sum over absorbed rows of grad + sum over noised rows of (1 - sqrt_ab) grad, float32,
// reduced deterministically: per split of the rows into `partial`, then over the splits.
struct SoftAbsorbQSampleBackwardParams : SoftAbsorbSchedule {
  const void* grad = nullptr;
  void* grad_x0 = nullptr;
  float* grad_m = nullptr;   // (d)
  float* partial = nullptr;  // scratch (soft_absorb_backward_splits(B * L), d) float32
};

// Row splits of the deterministic two-pass grad_m reduction.
inline int64_t soft_absorb_backward_splits(int64_t rows) {
  const int64_t splits = (rows + 63) / 64;
  return splits < 1 ? 1 : (splits > 1024 ? 1024 : splits);
}

// Target rows: coef_xt x_t + coef_x0 x0_hat + coef_x0_prev x0_prev + coef_noise noise
// + (1 - coef_xt - coef_x0 - coef_x0_prev) m (x0_prev, noise and their coefficients may be null:
// the term is left out); source rows: anchor. out may be x_t (elementwise update).
struct DenoiseStepParams {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, seqlen = 0, dim = 0;
  const void* x_t = nullptr;
  const void* x0_hat = nullptr;
  const void* x0_prev = nullptr;  // null with coef_x0_prev
  const void* noise = nullptr;    // null with coef_noise
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

// What a backend registers for nearest_embedding: its chunk kernel and the tile of the host
// entry's loop (rows x vocabulary columns per GEMM, sized for the backend's memory).
struct NearestEmbeddingKernel {
  bool allow_half = false;  // float16 accepted
  int64_t row_block = 0;
  int64_t vocab_chunk = 0;
  void (*run)(const NearestEmbeddingChunkParams& p) = nullptr;
};

}  // namespace moediffuseq
