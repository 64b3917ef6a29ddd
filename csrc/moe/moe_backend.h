// What the host entries of the MoE ops (moe/moe_topk_softmax.cpp, moe/moe_ffn.cpp) ask of a
// backend. The host entries are written once and hold the whole orchestration: checks,
// routing, buffers, the order of the steps. A backend (moe/cpu/moe_kernels_cpu.cpp,
// moe/cuda/moe_kernels_cuda.cpp) supplies the kernels only, as one MoeKernels table registered
// for its device type; what is particular to it (the CUDA device and stream, CUTLASS and its
// fallback, the limits of the CUDA routing) stays behind these functions.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "common/backends.h"
#include "moe/moe_checks.h"
#include "moe/moe_params.h"

namespace moediffuseq {

// The T*k routing slots grouped by expert (token order kept inside an expert). The index
// tensors live on the op's device, in the backend's integer type.
struct MoeGroups {
  at::Tensor row_of_slot;        // (T*k): grouped row of a slot, -1 for a dropped slot
  at::Tensor slot_of_row;        // (T*k): slot of a grouped row (the first num_valid() entries)
  std::vector<int64_t> offsets;  // (E + 1), on the host: expert e owns rows [offsets[e], offsets[e+1])

  int64_t num_valid() const { return offsets.back(); }
  int64_t rows_of(int64_t e) const { return offsets[e + 1] - offsets[e]; }
};

// One expert's GEMM d = a b, on views of the op's buffers (transposes are views too).
struct MoeGemm {
  at::Tensor a, b, d;
};

// Every tensor argument is contiguous (or a view the host entry names) and on the op's device;
// `op` names the op in error messages.
struct MoeKernels {
  bool allow_half = false;  // float16 accepted
  // The experts run in passes of consecutive experts holding at most this many grouped rows (one
  // expert at least), whose buffers are reused pass after pass (cache-sized work on the CPU);
  // 0: every expert in one pass (one grouped GEMM launch on the GPU).
  int64_t pass_rows = 0;
  // moe_topk_softmax: weights, indices and the lowest bad row (moe/moe_params.h).
  void (*topk_softmax)(const MoeTopkSoftmaxParams& p);
  // The stable counting sort of the slots by expert; raises on an index outside [-1, E).
  MoeGroups (*route)(const at::Tensor& indices, int64_t num_experts, const char* op);
  // dst (n, D): row i = scale[s] * src[s / k] with s the slot of grouped row row0 + i (scale null: a copy).
  void (*gather)(const at::Tensor& src, const MoeGroups& g, int64_t k, const float* scale, int64_t row0,
                 at::Tensor& dst, const char* op);
  // d = a b for every GEMM of `gemms` (one per non-empty expert, operands laid out as `layout`).
  void (*grouped_gemm)(std::vector<MoeGemm>& gemms, GemmLayout layout, const MoeShapes& s, const at::Tensor& like,
                       const char* op);
  // a = act(h); backward: a = act(h) and dh = d act(h)/dh * da. h, dh: (V, F1); a, da: (V, F).
  void (*activation_forward)(const at::Tensor& h, MoeActivation act, at::Tensor& a, const char* op);
  void (*activation_backward)(const at::Tensor& h, const at::Tensor& da, MoeActivation act, at::Tensor& a,
                              at::Tensor& dh, const char* op);
  // out (T, D)[t] = sum_j scale[t*k + j] rows[row of slot t*k + j] over the slots not dropped,
  // float32 sums (scale null: 1).
  void (*combine)(const at::Tensor& rows, const MoeGroups& g, int64_t k, const float* scale, at::Tensor& out,
                  const char* op);
  // out (T, k)[s] = <grad_y[s / k], expert_out[row of s]> in float32, 0 for a dropped slot.
  void (*grad_weights)(const at::Tensor& grad_y, const at::Tensor& expert_out, const MoeGroups& g, int64_t k,
                       at::Tensor& out, const char* op);
};

}  // namespace moediffuseq
