// nearest_embedding: the one host entry of every backend. argmin_v ||x_n - emb_v||^2 =
// argmin_v (||emb_v||^2 - 2 x_n . emb_v): float32 GEMMs (ATen) of a block of rows against a chunk
// of the vocabulary into one reused buffer, each followed by the backend's chunk kernel, which
// folds the chunk into the running best of each row (NearestEmbeddingKernel: the kernel and the
// tile, cpu/nearest_embedding_cpu.cpp, cuda/nearest_embedding_kernel.cu through
// cuda/diffusion_cuda.cpp). The (N, V) distance matrix never exists; ties go to the lowest index.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/backends.h"
#include "diffusion/diffusion_checks.h"
#include "diffusion/diffusion_params.h"

namespace moediffuseq {
namespace {

at::Tensor nearest_embedding(const at::Tensor& x_in, const at::Tensor& emb_in) {
  const auto& kernel = kernels_for<NearestEmbeddingKernel>(x_in.device(), "nearest_embedding");
  check_nearest_embedding_inputs(x_in, emb_in, kernel.allow_half);
  const OpDeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.to(at::kFloat).contiguous(), emb = emb_in.to(at::kFloat).contiguous();
  TORCH_CHECK(!x.isnan().any().item<bool>(), "nearest_embedding: x contains NaN");
  TORCH_CHECK(!emb.isnan().any().item<bool>(), "nearest_embedding: emb contains NaN");
  const int64_t N = x.size(0), V = emb.size(0);
  const at::Tensor norms = emb.square().sum(1);  // (V)
  at::Tensor best = at::zeros({N}, x.options().dtype(at::kLong));
  at::Tensor best_dist = at::full({N}, std::numeric_limits<float>::infinity(), x.options());
  const int64_t row_block = kernel.row_block, vocab_chunk = kernel.vocab_chunk;
  at::Tensor buffer = at::empty({std::min(row_block, N) * std::min(vocab_chunk, V)}, x.options());
  for (int64_t r0 = 0; r0 < N; r0 += row_block) {
    const int64_t rows = std::min(row_block, N - r0);
    const at::Tensor xb = x.narrow(0, r0, rows);
    for (int64_t v0 = 0; v0 < V; v0 += vocab_chunk) {
      const int64_t cols = std::min(vocab_chunk, V - v0);
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
      kernel.run(p);
    }
  }
  return best;
}

}  // namespace

MOEDIFFUSEQ_IMPL_CPU_AND_CUDA(m.impl("nearest_embedding", &nearest_embedding);)

}  // namespace moediffuseq
