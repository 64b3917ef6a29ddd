// The CPU kernels of the MoE ops (the table of moe/moe_backend.h): routing by a counting sort,
// one ATen GEMM per expert on views (oneDNN/MKL, multithreaded), and single parallel passes for
// gather, combine, the routing-weight gradient and the activations (moe_activation.h).
// Routing indices are int64: no limit on T*k or E.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "common/cpu/cpu_dtype.h"
#include "common/cpu/vec_convert.h"
#include "moe/cpu/moe_activation.h"
#include "moe/moe_backend.h"

namespace moediffuseq::cpu {
namespace {

// Per token, the k largest logits by selection (k is small; ties: the lowest index) and their
// softmax; a row holding NaN or +inf is reported as the lowest such row.
void topk_softmax(const MoeTopkSoftmaxParams& p) {
  const int64_t T = p.tokens, E = p.num_experts, k = p.k;
  std::atomic<int64_t> bad_row{*p.bad_row};
  dispatch_cpu_dtype(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* lg = static_cast<const scalar_t*>(p.logits);
    at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
      std::vector<float> row(E);
      std::vector<uint8_t> taken(E);
      for (int64_t t = begin; t < end; ++t) {
        bool bad = false;
        for (int64_t e = 0; e < E; ++e) {
          row[e] = static_cast<float>(lg[t * E + e]);
          bad |= !(row[e] < INFINITY);  // NaN or +inf
        }
        if (bad) {
          int64_t seen = bad_row.load();
          while (t < seen && !bad_row.compare_exchange_weak(seen, t)) {
          }
          continue;
        }
        std::fill(taken.begin(), taken.end(), 0);
        int64_t* ix = p.indices + t * k;
        float* w = p.weights + t * k;
        for (int64_t j = 0; j < k; ++j) {
          int64_t best = -1;
          for (int64_t e = 0; e < E; ++e) {
            if (!taken[e] && (best < 0 || row[e] > row[best])) best = e;
          }
          taken[best] = 1;
          ix[j] = best;
        }
        const float top = row[ix[0]];
        float sum = 0.f;
        for (int64_t j = 0; j < k; ++j) {
          const float e = top == -INFINITY ? 1.f : std::exp(row[ix[j]] - top);  // all chosen -inf: uniform
          w[j] = e;
          sum += e;
        }
        for (int64_t j = 0; j < k; ++j) w[j] /= sum;
      }
    });
  });
  *p.bad_row = bad_row.load();
}

// indices: int64 (T, k), entries in [-1, E) (-1 = dropped slot); one counting-sort pass.
MoeGroups route(const at::Tensor& indices, int64_t num_experts, const char* op) {
  const int64_t n = indices.numel();
  const int64_t* idx = indices.data_ptr<int64_t>();
  MoeGroups g;
  g.offsets.assign(num_experts + 1, 0);
  for (int64_t s = 0; s < n; ++s) {
    const int64_t e = idx[s];
    TORCH_CHECK(e >= -1 && e < num_experts, op, ": indices must lie in [0, ", num_experts,
                ") (or -1 for a dropped slot), got ", e, " at flat position ", s);
    if (e >= 0) ++g.offsets[e + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) g.offsets[e + 1] += g.offsets[e];
  std::vector<int64_t> cursor(g.offsets.begin(), g.offsets.end() - 1);
  g.slot_of_row = at::empty({n}, indices.options());
  g.row_of_slot = at::full({n}, -1, indices.options());
  int64_t* slot_of_row = g.slot_of_row.data_ptr<int64_t>();
  int64_t* row_of_slot = g.row_of_slot.data_ptr<int64_t>();
  for (int64_t s = 0; s < n; ++s) {
    const int64_t e = idx[s];
    if (e < 0) continue;
    const int64_t row = cursor[e]++;
    slot_of_row[row] = s;
    row_of_slot[s] = row;
  }
  return g;
}

void gather(const at::Tensor& src, const MoeGroups& g, int64_t k, const float* scale, int64_t row0, at::Tensor& dst,
            const char* op) {
  const int64_t n = dst.size(0), D = src.size(1);
  const int64_t* slot_of_row = g.slot_of_row.data_ptr<int64_t>() + row0;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, src.scalar_type(), "moe_gather", [&] {
    scalar_t* d = dst.data_ptr<scalar_t>();
    const scalar_t* s = src.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t slot = slot_of_row[i];
        const scalar_t* in = s + (slot / k) * D;
        scalar_t* out = d + i * D;
        if (scale) {
          const float w = scale[slot];
          for (int64_t c = 0; c < D; ++c) out[c] = static_cast<scalar_t>(w * static_cast<float>(in[c]));
        } else {
          std::copy(in, in + D, out);
        }
      }
    });
  });
}

void grouped_gemm(std::vector<MoeGemm>& gemms, GemmLayout layout, const MoeShapes& s, const at::Tensor& like,
                  const char* op) {
  for (MoeGemm& gemm : gemms) at::mm_out(gemm.d, gemm.a, gemm.b);
}

void activation_rows(const at::Tensor& h, MoeActivation act, at::Tensor& a, const char* op) {
  activation_forward(h, act, a);
}

// a = act(h) (recomputed for grad_w2), then dh (moe_activation.h).
void activation_rows_backward(const at::Tensor& h, const at::Tensor& da, MoeActivation act, at::Tensor& a,
                              at::Tensor& dh, const char* op) {
  activation_forward(h, act, a);
  activation_backward(da, h, act, dh);
}

void combine(const at::Tensor& rows, const MoeGroups& g, int64_t k, const float* scale, at::Tensor& out,
             const char* op) {
  const int64_t T = out.size(0), D = out.size(1);
  const int64_t* row_of_slot = g.row_of_slot.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, rows.scalar_type(), "moe_combine", [&] {
    const scalar_t* in = rows.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(D);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t row = row_of_slot[t * k + j];
          if (row < 0) continue;
          const float w = scale ? scale[t * k + j] : 1.f;
          const scalar_t* x = in + row * D;
          for (int64_t c = 0; c < D; ++c) acc[c] += w * static_cast<float>(x[c]);
        }
        from_float(acc.data(), o + t * D, D);
      }
    });
  });
}

// sum_c a[c] * b[c] in float32, vectorised.
template <typename T>
float dot_float(const T* a, const T* b, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t kV = Vec::size();
  float fa[kV], fb[kV];
  Vec acc(0.f);
  int64_t c = 0;
  for (; c + kV <= n; c += kV) {
    to_float(a + c, fa, kV);
    to_float(b + c, fb, kV);
    acc = at::vec::fmadd(Vec::loadu(fa), Vec::loadu(fb), acc);
  }
  float sum = acc.reduce_add();
  for (; c < n; ++c) sum += static_cast<float>(a[c]) * static_cast<float>(b[c]);
  return sum;
}

void grad_weights(const at::Tensor& grad_y, const at::Tensor& expert_out, const MoeGroups& g, int64_t k,
                  at::Tensor& out, const char* op) {
  const int64_t N = out.numel(), D = grad_y.size(1);
  const int64_t* row_of_slot = g.row_of_slot.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_y.scalar_type(), "moe_grad_weights", [&] {
    const scalar_t* dy = grad_y.data_ptr<scalar_t>();
    const scalar_t* rows = expert_out.data_ptr<scalar_t>();
    float* gw = out.data_ptr<float>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t slot = begin; slot < end; ++slot) {
        const int64_t row = row_of_slot[slot];
        gw[slot] = row < 0 ? 0.f : dot_float(dy + (slot / k) * D, rows + row * D, D);
      }
    });
  });
}

// Passes of about one expert of a T = 8192, k = 2, E = 8 layer: buffers that stay in cache
// between the gather, the two GEMMs and the activation, reused instead of T*k-row temporaries.
constexpr int64_t kPassRows = 2048;

const MoeKernels kKernels{/*allow_half=*/false, kPassRows, &topk_softmax, &route, &gather, &grouped_gemm,
                          &activation_rows, &activation_rows_backward, &combine, &grad_weights};
const KernelsRegistration<MoeKernels> kRegistration(c10::DeviceType::CPU, kKernels);

}  // namespace
}  // namespace moediffuseq::cpu
