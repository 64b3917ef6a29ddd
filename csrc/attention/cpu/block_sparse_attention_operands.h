// Per-head key/value operands of the CPU block-sparse attention, laid out so that every tile
// product is one tile_gemm: K (and V) transposed with columns in residue order, K and V rows
// per residue subsequence, and the gathered global keys. float rows are used in place;
// bfloat16 operands are pair-packed (tile_gemm.h).
#pragma once

#include <vector>

#include "attention/cpu/block_sparse_attention_plan.h"
#include "attention/cpu/tile_gemm.h"

namespace moediffuseq::cpu {

enum HeadOperandSet : unsigned {
  kForwardOperands = 1,   // kt, v rows, kgt, global v rows
  kBackwardOperands = 2,  // kt, vt, k rows, kgt, vgt, global k rows
};

template <typename T>
class HeadOperands {
 public:
  HeadOperands(const BlockSparsePlan& plan, int64_t D, HeadOperandSet set) : plan_(plan), D_(D), set_(set) {
    const int64_t G = std::max<int64_t>(plan.max_global_keys, 1);
    ldt_ = packed_ld<T>(transposed_ld(plan.order.L));
    ldg_ = packed_ld<T>(G);
    kt_.resize(packed_rows<T>(D) * ldt_);
    kgt_.resize(packed_rows<T>(D) * ldg_);
    gathered_.resize(G * D);
    const int64_t rows_size = kPairPacked<T> ? (plan.pair_offset.back() + 1) * packed_ld<T>(D) : 0;
    const int64_t grows_size = kPairPacked<T> ? packed_rows<T>(G) * packed_ld<T>(D) : G * D;
    rows_.resize(rows_size);
    grows_.resize(grows_size);
    if (set == kBackwardOperands) {
      vt_.resize(packed_rows<T>(D) * ldt_);
      vgt_.resize(packed_rows<T>(D) * ldg_);
    }
  }

  // Rebuilds the operands for a key/value head of batch b given its K and V, (L x D) with
  // leading dimensions ldk and ldv: the keys the plan's queries reach through their windows
  // (BlockSparsePlan::key_begin, key_end) and the global keys.
  void build(const T* k, int64_t ldk, const T* v, int64_t ldv, int64_t b) {
    const ResidueSubsequences& order = plan_.order;
    const int64_t d = order.d, D = D_;
    const int64_t* gkeys = plan_.global_keys.data() + b * plan_.max_global_keys;
    const int64_t G = plan_.num_global_keys[b];
    k_ = k;
    v_ = v;
    ldk_ = ldk;
    ldv_ = ldv;
    const T* rows_src = set_ == kForwardOperands ? v : k;  // the operand used row-wise
    const int64_t ld_src = set_ == kForwardOperands ? ldv : ldk;
    for (int64_t r = 0; r < std::min(d, order.L); ++r) {
      // the slots [first, end) of the keys the queries reach; first even (a row pair)
      const int64_t first = order.slots_below(plan_.key_begin, r) / 2 * 2, end = order.slots_below(plan_.key_end, r);
      if (end <= first) continue;
      const int64_t col = order.offset(r) + first, n = end - first, src = (r + d * first);
      pack_transposed(k + src * ldk, d * ldk, n, D, kt_.data() + (kPairPacked<T> ? 2 * col : col), ldt_);
      if (set_ == kBackwardOperands) {
        pack_transposed(v + src * ldv, d * ldv, n, D, vt_.data() + (kPairPacked<T> ? 2 * col : col), ldt_);
      }
      if constexpr (kPairPacked<T>) {
        pack_rows(rows_src + src * ld_src, d * ld_src, n, D,
                  rows_.data() + (plan_.pair_offset[r] + first / 2) * packed_ld<T>(D), packed_ld<T>(D));
      }
    }
    if (G == 0) return;
    auto keep_rows = [&] {  // the gathered rows as the row-wise global operand
      if constexpr (kPairPacked<T>) {
        pack_rows(gathered_.data(), D, G, D, grows_.data(), packed_ld<T>(D));
      } else {
        std::copy(gathered_.begin(), gathered_.begin() + G * D, grows_.begin());
      }
    };
    gather_rows(k, ldk, gkeys, G, D, gathered_.data(), D);
    pack_transposed(gathered_.data(), D, G, D, kgt_.data(), ldg_);
    if (set_ == kBackwardOperands) keep_rows();  // global K rows, for dQ
    gather_rows(v, ldv, gkeys, G, D, gathered_.data(), D);
    if (set_ == kBackwardOperands) {
      pack_transposed(gathered_.data(), D, G, D, vgt_.data(), ldg_);
    } else {
      keep_rows();  // global V rows, for P V
    }
  }

  // K transposed (D x L), columns in residue order: .col(offset(r) + t) is key slot t of r.
  BMat<T> kt() const { return {kt_.data(), ldt_}; }
  // V transposed, like kt (backward set only).
  BMat<T> vt() const { return {vt_.data(), ldt_}; }
  // Rows of residue subsequence r (L_r x D): V for the forward set, K for the backward set.
  BMat<T> rows(int64_t r) const {
    const T* src = set_ == kForwardOperands ? v_ : k_;
    const int64_t ld = set_ == kForwardOperands ? ldv_ : ldk_;
    if constexpr (kPairPacked<T>) {
      return {rows_.data() + plan_.pair_offset[r] * packed_ld<T>(D_), packed_ld<T>(D_)};
    } else {
      return {src + r * ld, plan_.order.d * ld};
    }
  }
  // Global keys transposed (D x G), global values transposed (backward), global rows (G x D):
  // values for the forward set, keys for the backward set.
  BMat<T> global_kt() const { return {kgt_.data(), ldg_}; }
  BMat<T> global_vt() const { return {vgt_.data(), ldg_}; }
  BMat<T> global_rows() const { return {grows_.data(), packed_ld<T>(D_)}; }

 private:
  const BlockSparsePlan& plan_;
  int64_t D_;
  HeadOperandSet set_;
  int64_t ldt_ = 0, ldg_ = 0;
  const T* k_ = nullptr;
  const T* v_ = nullptr;
  int64_t ldk_ = 0, ldv_ = 0;
  std::vector<T> kt_, vt_, kgt_, vgt_, rows_, grows_, gathered_;
};

}  // namespace moediffuseq::cpu
