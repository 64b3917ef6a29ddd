// nearest_embedding on the GPU, the arg-min half: the glue computes x . e for a block of rows
// and a chunk of the vocabulary with a GEMM; this kernel turns a chunk into distances
// ||e||^2 - 2 x . e and folds its arg-min into the running best of each row. One warp per row;
// ties go to the lowest index (within a chunk by the reduction order, across chunks because
// only a strictly smaller distance replaces the running best).
#include <climits>
#include <cmath>

#include "diffusion/cuda/diffusion_kernels.h"

namespace moediffuseq::cuda {
namespace {

constexpr int kWarps = 8;

__global__ void argmin_chunk_kernel(NearestEmbeddingChunkParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= p.rows) return;  // whole warps leave together
  const float* dots = p.dots + r * p.cols;
  float best = INFINITY;
  int64_t index = LLONG_MAX;
  for (int64_t c = lane; c < p.cols; c += 32) {  // increasing c: strict < keeps the first
    const float d = p.norms[c] - 2.f * dots[c];
    if (d < best) {
      best = d;
      index = c;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, off);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, index, off);
    if (ob < best || (ob == best && oi < index)) {
      best = ob;
      index = oi;
    }
  }
  if (lane == 0 && index != LLONG_MAX && best < p.best_dist[r]) {
    p.best_dist[r] = best;
    p.best_index[r] = p.vocab_offset + index;
  }
}

}  // namespace

cudaError_t launch_nearest_embedding_chunk(const NearestEmbeddingChunkParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((p.rows + kWarps - 1) / kWarps);
  argmin_chunk_kernel<<<blocks, kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace moediffuseq::cuda
