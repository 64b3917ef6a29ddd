// CUDA nearest_embedding: float32 GEMMs (ATen, cuBLAS) of a block of rows against a chunk of the
// vocabulary into one reused buffer, each followed by the fused distance + arg-min kernel
// (nearest_embedding_kernel.cu) that folds the chunk into the running best of each row. The
// (N, V) distance matrix never exists; ties go to the lowest index, as on the CPU.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/cuda/device_check.h"
#include "diffusion/cuda/diffusion_kernels.h"
#include "diffusion/diffusion_checks.h"

namespace moediffuseq::cuda {
namespace {

constexpr int64_t kRowBlock = 4096;
constexpr int64_t kVocabChunk = 8192;  // a (4096, 8192) float32 buffer: 128 MiB

at::Tensor nearest_embedding_cuda(const at::Tensor& x_in, const at::Tensor& emb_in) {
  check_nearest_embedding_inputs(x_in, emb_in, /*allow_half=*/true);
  const CudaOpGuard guard(x_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor x = x_in.to(at::kFloat).contiguous(), emb = emb_in.to(at::kFloat).contiguous();
  TORCH_CHECK(!x.isnan().any().item<bool>(), "nearest_embedding: x contains NaN");
  TORCH_CHECK(!emb.isnan().any().item<bool>(), "nearest_embedding: emb contains NaN");
  const int64_t N = x.size(0), V = emb.size(0);
  const at::Tensor norms = emb.square().sum(1);  // (V)
  at::Tensor best = at::zeros({N}, x.options().dtype(at::kLong));
  at::Tensor best_dist = at::full({N}, std::numeric_limits<float>::infinity(), x.options());
  const int64_t max_rows = std::min(kRowBlock, N), max_cols = std::min(kVocabChunk, V);
  at::Tensor buffer = at::empty({max_rows * max_cols}, x.options());
  for (int64_t r0 = 0; r0 < N; r0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, N - r0);
    const at::Tensor xb = x.narrow(0, r0, rows);
    for (int64_t v0 = 0; v0 < V; v0 += kVocabChunk) {
      const int64_t cols = std::min(kVocabChunk, V - v0);
      at::Tensor dots = buffer.narrow(0, 0, rows * cols).view({rows, cols});
      at::mm_out(dots, xb, emb.narrow(0, v0, cols).t());  // (rows, cols) x . e
      NearestEmbeddingChunkParams p;
      p.rows = rows;
      p.cols = cols;
      p.vocab_offset = v0;
      p.dots = dots.data_ptr<float>();
      p.norms = norms.data_ptr<float>() + v0;
      p.best_dist = best_dist.data_ptr<float>() + r0;
      p.best_index = best.data_ptr<int64_t>() + r0;
      C10_CUDA_CHECK(launch_nearest_embedding_chunk(p, stream));
    }
  }
  return best;
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CUDA, m) { m.impl("nearest_embedding", &nearest_embedding_cuda); }

}  // namespace moediffuseq::cuda
