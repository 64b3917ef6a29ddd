// The CPU chunk kernel of nearest_embedding (host entry: diffusion/nearest_embedding.cpp): the
// distances ||e||^2 - 2 x . e of a (rows x vocabulary-chunk) tile folded into the running best
// of each row, rows in parallel; only a strictly smaller distance replaces the best, so ties
// keep the lower index. Tiles of 512 rows x 4096 words: an 8 MiB float32 buffer.
#include <ATen/Parallel.h>

#include "common/backends.h"
#include "diffusion/diffusion_params.h"

namespace moediffuseq::cpu {
namespace {

void argmin_chunk(const NearestEmbeddingChunkParams& p) {
  at::parallel_for(0, p.rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* dots = p.dots + i * p.cols;
      float best = p.best_dist[i];
      int64_t index = p.best_index[i];
      for (int64_t c = 0; c < p.cols; ++c) {
        const float dist = p.norms[c] - 2.f * dots[c];
        if (dist < best) {  // strict: an equal later distance keeps the lower index
          best = dist;
          index = p.vocab_offset + c;
        }
      }
      p.best_dist[i] = best;
      p.best_index[i] = index;
    }
  });
}

const KernelsRegistration<NearestEmbeddingKernel> kRegistration(
    c10::DeviceType::CPU, {/*allow_half=*/false, /*row_block=*/512, /*vocab_chunk=*/4096, &argmin_chunk});

}  // namespace
}  // namespace moediffuseq::cpu
