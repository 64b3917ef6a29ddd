// CPU nearest_embedding: argmin_v ||x_n - emb_v||^2 = argmin_v (||emb_v||^2 - 2 x_n . emb_v),
// through float32 GEMMs on (rows x vocabulary-chunk) tiles, so the (N, V) distance matrix never
// exists at once. Ties: the lowest index.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "diffusion/diffusion_checks.h"

namespace moediffuseq::cpu {
namespace {

constexpr int64_t kRowBlock = 512;
constexpr int64_t kVocabChunk = 4096;

at::Tensor nearest_embedding_cpu(const at::Tensor& x_in, const at::Tensor& emb_in) {
  check_nearest_embedding_inputs(x_in, emb_in);
  const at::Tensor x = x_in.to(at::kFloat).contiguous(), emb = emb_in.to(at::kFloat).contiguous();
  TORCH_CHECK(!x.isnan().any().item<bool>(), "nearest_embedding: x contains NaN");
  TORCH_CHECK(!emb.isnan().any().item<bool>(), "nearest_embedding: emb contains NaN");
  const int64_t N = x.size(0), V = emb.size(0);
  const at::Tensor norms = emb.square().sum(1);  // (V)
  at::Tensor best = at::empty({N}, x.options().dtype(at::kLong));
  std::vector<float> best_dist(N, std::numeric_limits<float>::infinity());
  int64_t* bp = best.data_ptr<int64_t>();
  std::fill(bp, bp + N, 0);
  for (int64_t r0 = 0; r0 < N; r0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, N - r0);
    const at::Tensor xb = x.narrow(0, r0, rows);
    for (int64_t v0 = 0; v0 < V; v0 += kVocabChunk) {
      const int64_t cols = std::min(kVocabChunk, V - v0);
      // dist (rows, cols) = ||e||^2 - 2 x . e
      const at::Tensor dist = at::addmm(norms.narrow(0, v0, cols), xb, emb.narrow(0, v0, cols).t(), 1.0, -2.0);
      const float* dp = dist.data_ptr<float>();
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const float* row = dp + i * cols;
          float bd = best_dist[r0 + i];
          int64_t bi = bp[r0 + i];
          for (int64_t c = 0; c < cols; ++c) {
            if (row[c] < bd) {  // strict: an equal later distance keeps the lower index
              bd = row[c];
              bi = v0 + c;
            }
          }
          best_dist[r0 + i] = bd;
          bp[r0 + i] = bi;
        }
      });
    }
  }
  return best;
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CPU, m) { m.impl("nearest_embedding", &nearest_embedding_cpu); }

}  // namespace moediffuseq::cpu
