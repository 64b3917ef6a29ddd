// Grouping of the T*k routing slots of a mixture-of-experts layer by expert (the CPU
// counterpart of vLLM's moe_align): one counting-sort pass over the indices.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace moediffuseq::cpu {

struct MoeRouting {
  int64_t num_slots = 0;             // T * k
  std::vector<int64_t> offsets;      // (E + 1): expert e owns grouped rows [offsets[e], offsets[e+1])
  std::vector<int64_t> slot_of_row;  // (offsets[E]): grouped row -> slot t * k + j, token order kept
  std::vector<int64_t> row_of_slot;  // (T * k): slot -> grouped row, -1 for a dropped slot

  int64_t num_valid() const { return offsets.back(); }
  int64_t rows_of(int64_t e) const { return offsets[e + 1] - offsets[e]; }
};

// indices: int64 (T, k), contiguous, entries in [-1, E) (-1 = dropped slot).
inline MoeRouting route_slots(const at::Tensor& indices, int64_t num_experts, const char* op) {
  const int64_t n = indices.numel();
  const int64_t* idx = indices.data_ptr<int64_t>();
  MoeRouting r;
  r.num_slots = n;
  r.offsets.assign(num_experts + 1, 0);
  for (int64_t s = 0; s < n; ++s) {
    const int64_t e = idx[s];
    TORCH_CHECK(e >= -1 && e < num_experts, op, ": indices must lie in [0, ", num_experts,
                ") (or -1 for a dropped slot), got ", e, " at flat position ", s);
    if (e >= 0) ++r.offsets[e + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) r.offsets[e + 1] += r.offsets[e];
  std::vector<int64_t> cursor(r.offsets.begin(), r.offsets.end() - 1);
  r.slot_of_row.resize(r.num_valid());
  r.row_of_slot.assign(n, -1);
  for (int64_t s = 0; s < n; ++s) {
    const int64_t e = idx[s];
    if (e < 0) continue;
    const int64_t row = cursor[e]++;
    r.slot_of_row[row] = s;
    r.row_of_slot[s] = row;
  }
  return r;
}

}  // namespace moediffuseq::cpu
