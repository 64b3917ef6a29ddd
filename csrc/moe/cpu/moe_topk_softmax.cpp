// CPU moe_topk_softmax: per token, the k experts with the largest logits (ties: the lowest
// expert index) and their softmax weights renormalised over the k chosen, which equals a
// softmax over the chosen logits. One pass per row, rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "moe/moe_checks.h"

namespace moediffuseq::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> moe_topk_softmax_cpu(const at::Tensor& logits_in, int64_t k) {
  check_moe_topk_inputs(logits_in, k);
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({T, k}, logits.options().dtype(at::kLong));
  float* w = weights.data_ptr<float>();
  int64_t* ix = indices.data_ptr<int64_t>();
  std::atomic<int64_t> nan_row{-1};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moe_topk_softmax", [&] {
    const scalar_t* lg = logits.data_ptr<scalar_t>();
    at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
      std::vector<float> row(E);
      std::vector<uint8_t> taken(E);
      for (int64_t t = begin; t < end; ++t) {
        bool has_nan = false;
        for (int64_t e = 0; e < E; ++e) {
          row[e] = static_cast<float>(lg[t * E + e]);
          has_nan |= !(row[e] < INFINITY);  // NaN or +inf
        }
        if (has_nan) {
          nan_row.store(t);
          continue;
        }
        std::fill(taken.begin(), taken.end(), 0);
        for (int64_t j = 0; j < k; ++j) {  // selection: k is small
          int64_t best = -1;
          for (int64_t e = 0; e < E; ++e) {
            if (!taken[e] && (best < 0 || row[e] > row[best])) best = e;
          }
          taken[best] = 1;
          ix[t * k + j] = best;
        }
        const float top = row[ix[t * k]];
        float sum = 0.f;
        for (int64_t j = 0; j < k; ++j) {
          const float p = top == -INFINITY ? 1.f : std::exp(row[ix[t * k + j]] - top);
          w[t * k + j] = p;
          sum += p;
        }
        for (int64_t j = 0; j < k; ++j) w[t * k + j] /= sum;
      }
    });
  });
  TORCH_CHECK(nan_row.load() < 0, "moe_topk_softmax: logits contain NaN or +inf (row ", nan_row.load(), ")");
  return {weights, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CPU, m) { m.impl("moe_topk_softmax", &moe_topk_softmax_cpu); }

}  // namespace moediffuseq::cpu
