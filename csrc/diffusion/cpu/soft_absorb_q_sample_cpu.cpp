// The CPU kernels of soft_absorb_q_sample and its backward (host entry:
// diffusion/soft_absorb_q_sample.cpp): one pass over (B, L, d), rows in parallel. The backward
// reduces grad_m as the CUDA kernel does: per split of the rows into `partial`, then over the
// splits in order, so the sum does not depend on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>

#include "common/backends.h"
#include "common/cpu/cpu_dtype.h"
#include "diffusion/diffusion_params.h"

namespace moediffuseq::cpu {
namespace {

bool absorbed(const SoftAbsorbSchedule& p, int64_t row) {
  return p.uniform[row] < p.gamma * p.sqrt_1mab[row / p.seqlen];
}

void q_sample(const SoftAbsorbQSampleParams& p) {
  const int64_t d = p.dim;
  dispatch_cpu_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x0 = static_cast<const T*>(p.x0);
    const T* noise = static_cast<const T*>(p.noise);
    const T* m = static_cast<const T*>(p.m);
    T* out = static_cast<T*>(p.out);
    at::parallel_for(0, p.batch * p.seqlen, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const T* x = x0 + row * d;
        T* o = out + row * d;
        if (!p.target_mask[row]) {
          std::copy(x, x + d, o);
        } else if (absorbed(p, row)) {
          std::copy(m, m + d, o);
        } else {
          const int64_t b = row / p.seqlen;
          const float a = p.sqrt_ab[b], s = p.sqrt_1mab[b];
          const T* n = noise + row * d;
          for (int64_t c = 0; c < d; ++c) {
            const float mc = static_cast<float>(m[c]);
            o[c] = static_cast<T>(a * (static_cast<float>(x[c]) - mc) + s * static_cast<float>(n[c]) + mc);
          }
        }
      }
    });
  });
}

void q_sample_backward(const SoftAbsorbQSampleBackwardParams& p) {
  const int64_t rows = p.batch * p.seqlen, d = p.dim;
  const int64_t splits = soft_absorb_backward_splits(rows);
  const int64_t rows_per_split = (rows + splits - 1) / splits;
  dispatch_cpu_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* grad = static_cast<const T*>(p.grad);
    T* grad_x0 = static_cast<T*>(p.grad_x0);
    at::parallel_for(0, splits, 1, [&](int64_t split0, int64_t split1) {
      for (int64_t split = split0; split < split1; ++split) {
        float* dm = p.partial + split * d;
        std::fill(dm, dm + d, 0.f);
        const int64_t row1 = std::min(rows, (split + 1) * rows_per_split);
        for (int64_t row = split * rows_per_split; row < row1; ++row) {
          const T* g = grad + row * d;
          T* o = grad_x0 + row * d;
          if (!p.target_mask[row]) {  // source: x_t = x0
            std::copy(g, g + d, o);
            continue;
          }
          if (absorbed(p, row)) {  // x_t = m
            std::fill(o, o + d, T(0));
            for (int64_t c = 0; c < d; ++c) dm[c] += static_cast<float>(g[c]);
            continue;
          }
          const float a = p.sqrt_ab[row / p.seqlen];  // x_t = a x0 + (1 - a) m + s noise
          for (int64_t c = 0; c < d; ++c) {
            const float gc = static_cast<float>(g[c]);
            o[c] = static_cast<T>(a * gc);
            dm[c] += (1.f - a) * gc;
          }
        }
      }
    });
  });
  std::fill(p.grad_m, p.grad_m + d, 0.f);
  for (int64_t split = 0; split < splits; ++split) {
    for (int64_t c = 0; c < d; ++c) p.grad_m[c] += p.partial[split * d + c];
  }
}

const KernelsRegistration<ParamsKernel<SoftAbsorbQSampleParams>> kForward(c10::DeviceType::CPU,
                                                                          {/*allow_half=*/false, &q_sample});
const KernelsRegistration<ParamsKernel<SoftAbsorbQSampleBackwardParams>> kBackward(
    c10::DeviceType::CPU, {/*allow_half=*/false, &q_sample_backward});

}  // namespace
}  // namespace moediffuseq::cpu
