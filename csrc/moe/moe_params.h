// Plain parameters of the mixture-of-experts kernels (moe_topk_softmax, moe_ffn and its
// backward), shared by the backends. No torch header here: the CUDA kernels include it and
// compile with nvcc alone. All tensors are contiguous; sizes and offsets in elements.
#pragma once

#include <cstdint>

#include "common/dtype.h"  // element type of the activations and expert weights

namespace moediffuseq {

// Expert activation (METHOD §4): gelu (tanh approximation), silu, or swiglu on rows
// [gate | up] of width 2F: silu(gate) * up.
enum class MoeActivation : int { kGelu = 0, kSilu = 1, kSwiglu = 2 };

// moe_topk_softmax: per token, the k experts with the largest logits (ties: lowest index),
// weights = softmax over the chosen logits (= renormalised softmax probabilities).
struct MoeTopkSoftmaxParams {
  DType dtype = DType::kFloat32;
  int64_t tokens = 0;       // T
  int num_experts = 0;      // E
  int k = 0;                // 1 <= k <= E
  const void* logits = nullptr;  // (T, E)
  float* weights = nullptr;      // (T, k)
  int64_t* indices = nullptr;    // (T, k)
  // The lowest row holding NaN or +inf, as an atomic minimum; the caller sets it to INT64_MAX.
  int64_t* bad_row = nullptr;
};

// Grouping of the T*k routing slots by expert (a stable counting sort: token order is kept
// within an expert), computed on the device:
//   offsets[e] .. offsets[e+1]: the grouped rows of expert e; row_of_slot[s] = -1 for a dropped slot.
struct MoeRoutingParams {
  int64_t num_slots = 0;            // N = T * k  (< 2^31)
  int num_experts = 0;              // E (<= kMoeMaxExperts)
  const int64_t* indices = nullptr; // (N): expert of each slot in [0, E), or -1 = dropped
  // Scratch of moe_routing_scratch_ints(N, E) int32: per-block expert counts, then the
  // lowest bad flat position of each block.
  int32_t* scratch = nullptr;
  // Output, (E + 2) int64: [0] = the lowest flat position holding an index outside [-1, E)
  // (or -1 when all are valid); [1 + e] = offsets[e] for e = 0..E (offsets[E] = valid slots).
  int64_t* meta = nullptr;
  int32_t* row_of_slot = nullptr;   // (N)
  int32_t* slot_of_row = nullptr;   // (N); the first offsets[E] entries are written
};

constexpr int kMoeMaxExperts = 1024;
constexpr int kMoeRoutingBlock = 256;  // slots per block of the routing kernels

inline int64_t moe_routing_blocks(int64_t num_slots) {
  return (num_slots + kMoeRoutingBlock - 1) / kMoeRoutingBlock;
}
inline int64_t moe_routing_scratch_ints(int64_t num_slots, int num_experts) {
  return moe_routing_blocks(num_slots) * (num_experts + 1);
}

// What the row-moving kernels (gather, combine, routing-weight gradient) share: the element
// type, the row width D and k, the slots per token (slot s belongs to token s / k).
struct MoeRowsParams {
  DType dtype = DType::kFloat32;
  int64_t dim = 0;  // D
  int k = 1;
};

// dst[r, :] = scale[slot] * src[slot / k, :] for the grouped rows r < rows, slot = slot_of_row[r]
// (scale null: a plain copy).
struct MoeGatherParams : MoeRowsParams {
  int64_t rows = 0;
  const void* src = nullptr;  // (T, D)
  const int32_t* slot_of_row = nullptr;
  void* dst = nullptr;           // (rows, D)
  const float* scale = nullptr;  // (T * k) or null
};

// out[t, :] = sum_j scale[t*k + j] * rows[row_of_slot[t*k + j], :] over the slots that are not
// dropped, accumulated in float32 (scale null: 1). Written in the element type.
struct MoeCombineParams : MoeRowsParams {
  int64_t tokens = 0;
  const int32_t* row_of_slot = nullptr;
  const float* scale = nullptr;  // (T * k) or null
  const void* rows = nullptr;    // (N, D), grouped rows
  void* out = nullptr;           // (T, D)
};

// grad_weights[s] = <grad_y[s / k], expert_out[row_of_slot[s]]> in float32, 0 for a dropped slot.
struct MoeGradWeightsParams : MoeRowsParams {
  int64_t num_slots = 0;
  const void* grad_y = nullptr;      // (T, D)
  const void* expert_out = nullptr;  // (N, D)
  const int32_t* row_of_slot = nullptr;
  float* grad_weights = nullptr;  // (N)
};

// Forward: a = act(h). Backward: a = act(h) (recomputed for grad_w2) and
// dh = d act(h)/dh * da. h, dh: (rows, F1); a, da: (rows, F); F1 = 2F for swiglu, else F.
struct MoeActivationParams {
  DType dtype = DType::kFloat32;
  MoeActivation act = MoeActivation::kGelu;
  int64_t rows = 0;
  int64_t width = 0;  // F
  const void* h = nullptr;
  const void* da = nullptr;  // backward only
  void* a = nullptr;
  void* dh = nullptr;        // backward only
};

// One GEMM of a grouped GEMM: D (m x n, row-major) = A (m x k) B (k x n); every operand packed
// (leading dimension = its contiguous extent). The layout of A and B is the same for all groups.
struct GroupedGemmProblem {
  int m = 0, n = 0, k = 0;
  const void* a = nullptr;
  const void* b = nullptr;
  void* d = nullptr;
};

// Layouts of (A, B) in the BLAS sense (row-major A is m x k with k contiguous; row-major B is
// k x n with n contiguous). The MoE layer needs three:
//   kRowRow: forward (x w1, act w2);  kRowCol: grad of the inputs (dy w2^T, dh w1^T);
//   kColRow: grad of the weights (a^T dy, x^T dh).
enum class GemmLayout : int { kRowRow = 0, kRowCol = 1, kColRow = 2 };

// Operands of the tensor-core grouped GEMM must be 16-byte aligned, with the contiguous
// extents (n for D, k or m for A, n or k for B) multiples of 8 elements.
constexpr int kGroupedGemmAlignment = 8;

}  // namespace moediffuseq
