// The iteration plan shared by the CPU forward and backward of block-sparse attention.
//
// Dilation: the residue subsequences of attention/block_sparse_attention_residues.h. Query blocks are tiles of kBlockQ consecutive positions of one residue subsequence; a block
// visits one contiguous range of that subsequence's keys (its window, in chunks of at most
// kMaxChunk keys, through a per-head transposed copy of K in residue order) and then the
// global keys outside that range (through a per-head gathered copy). Global query rows are
// recomputed densely over all keys afterwards. No L x L matrix is ever formed.
// Causal: key j <= query i. Within a residue subsequence slot order is position order, so a
// block's window ends at its own last slot, and key chunks (window, global keys, dense rows)
// that start after the block's last query position are skipped, not masked.
// Query rows at an offset: the blocks tile the query positions [q_begin, q_end) of each residue
// subsequence; keys, masks and residues stay on positions of the whole key sequence.
// Source isolation: a block whose rows are all in the source (i < S_b) clips its window, its
// global keys and its dense key range to j < S_b (key_limit), so no source-query x target-key
// work is done; only a block that straddles S_b masks its source rows one by one.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "attention/block_sparse_attention_params.h"
#include "attention/block_sparse_attention_residues.h"
#include "attention/cpu/tile_gemm.h"

namespace moediffuseq::cpu {

constexpr int64_t kBlockQ = 64;     // query rows per tile
constexpr int64_t kMaxChunk = 512;  // keys per score tile
// Leading dimension of score tiles: padded off a power of two so that the rows of a tile do
// not all fall into the same cache sets.
constexpr int64_t kLdS = kMaxChunk + 16;
constexpr float kInf = std::numeric_limits<float>::infinity();

enum KeyClass : uint8_t { kNormalKey = 0, kGlobalKey = 1, kPaddedKey = 2 };

// Leading dimension of (D x L) transposed copies, padded like kLdS.
inline int64_t transposed_ld(int64_t L) { return (L + 15) / 16 * 16 + 16; }

struct BlockSparsePlan {
  ResidueSubsequences order;  // slot of position i in residue order: offset(i % d) + i / d
  int64_t window = 0;
  bool causal = false;
  int64_t q_begin = 0, q_end = 0;  // positions of the query rows: row i - q_begin is position i
  // The key positions [key_begin, key_end) that windowed queries reach (all keys when some query
  // row is global); the per-head operands are built for these only (and the global keys).
  int64_t key_begin = 0, key_end = 0;
  std::vector<int64_t> source_length;  // (B) S_b; 0 without isolation (every query is a target)
  std::vector<uint8_t> key_class;            // (B, L), residue order
  std::vector<int64_t> global_keys;          // (B, max_global_keys) natural positions
  std::vector<int64_t> num_global_keys;      // (B)
  std::vector<int64_t> global_queries;       // (B, max_global_queries) positions of global query rows
  std::vector<int64_t> num_global_queries;   // (B)
  std::vector<uint8_t> query_is_global;      // (B, L) natural positions
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (residue, first query slot t) of each query block
  std::vector<int64_t> pair_offset;  // (d + 1) prefix sums of ceil(length(r) / 2): packed row pairs
  int64_t max_global_keys = 0;
  int64_t max_global_queries = 0;

  // Position of query slot t of residue r.
  int64_t position(int64_t r, int64_t t) const { return r + order.d * t; }
  // Query slots [lo, hi) of residue r: the slots of the positions [q_begin, q_end).
  std::pair<int64_t, int64_t> query_slots(int64_t r) const {
    return {order.slots_below(q_begin, r), order.slots_below(q_end, r)};
  }
  // The last key position query position i of batch b may see (causality, source isolation).
  int64_t key_limit(int64_t b, int64_t i) const { return bsa_key_limit(i, source_length[b], order.L, causal); }
  // Whether the queries from position first to position last (ascending) of batch b straddle its
  // source end: source rows there must be masked row by row (the tile is not clipped for them).
  bool straddles_source(int64_t b, int64_t first, int64_t last) const {
    return first < source_length[b] && last >= source_length[b];
  }
  // Key slots [0, n) of residue r at positions <= limit.
  int64_t key_slots_upto(int64_t r, int64_t limit) const { return order.slots_below(limit + 1, r); }
  // Global keys of batch b at positions <= limit: a prefix of the ascending list.
  int64_t global_keys_upto(int64_t b, int64_t limit) const {
    const int64_t* keys = global_keys.data() + b * max_global_keys;
    return std::upper_bound(keys, keys + num_global_keys[b], limit) - keys;
  }
  // The contiguous range [lo, hi) of residue-r key slots visited by queries [t0, t1) of batch b
  // (up to the key limit of the last query); lo is even so that chunks start on a row pair of
  // pair-packed operands.
  std::pair<int64_t, int64_t> local_range(int64_t b, int64_t r, int64_t t0, int64_t t1) const {
    int64_t lo, hi;
    band_keys(order.length(r), t0, t1, window, causal, lo, hi);
    hi = std::min(hi, key_slots_upto(r, key_limit(b, position(r, t1 - 1))));
    return {lo / 2 * 2, std::max(hi, lo / 2 * 2)};
  }
  const uint8_t* classes(int64_t b) const { return key_class.data() + b * order.L; }
  // True when every query of block [t0, t1) of residue r is global: the dense pass over global
  // query rows computes all of them, so the windowed pass skips the block.
  bool all_global_queries(int64_t b, int64_t r, int64_t t0, int64_t t1) const {
    const uint8_t* g = query_is_global.data() + b * order.L;
    for (int64_t t = t0; t < t1; ++t) {
      if (!g[r + order.d * t]) return false;
    }
    return true;
  }
};

// f(T{}) with T the element type of dtype: float (Float) or c10::BFloat16 (BFloat16).
template <typename F>
inline void with_bsa_element_type(c10::ScalarType dtype, F&& f) {
  if (dtype == c10::ScalarType::Float) {
    f(float{});
  } else {
    f(c10::BFloat16{});
  }
}

inline BlockSparsePlan make_plan(const BlockSparseAttentionParams& p) {
  BlockSparsePlan plan;
  const int64_t B = p.batch, L = p.seqlen, d = p.dilation;
  plan.order = ResidueSubsequences{L, d};
  plan.window = p.window;
  plan.causal = p.causal;
  plan.q_begin = p.query_offset;
  plan.q_end = p.query_offset + p.q_len;
  plan.source_length.assign(B, 0);
  if (p.source_lengths) std::copy(p.source_lengths, p.source_lengths + B, plan.source_length.begin());
  plan.key_class.assign(B * L, kNormalKey);
  plan.num_global_keys.assign(B, 0);
  plan.num_global_queries.assign(B, 0);
  plan.query_is_global.assign(B * L, 0);
  for (int64_t b = 0; b < B; ++b) {
    int64_t gk = 0, gq = 0;
    for (int64_t i = 0; i < L; ++i) {
      const bool global = p.global_mask && p.global_mask[b * L + i];
      const bool padded = p.key_padding_mask && p.key_padding_mask[b * L + i];
      const int64_t slot = plan.order.offset(i % d) + i / d;
      plan.key_class[b * L + slot] = padded ? kPaddedKey : (global ? kGlobalKey : kNormalKey);
      gk += (global && !padded);
      gq += global && i >= plan.q_begin && i < plan.q_end;
      plan.query_is_global[b * L + i] = global;
    }
    plan.num_global_keys[b] = gk;
    plan.num_global_queries[b] = gq;
    plan.max_global_keys = std::max(plan.max_global_keys, gk);
    plan.max_global_queries = std::max(plan.max_global_queries, gq);
  }
  plan.global_keys.assign(B * plan.max_global_keys, 0);
  plan.global_queries.assign(B * plan.max_global_queries, 0);
  for (int64_t b = 0; b < B; ++b) {
    int64_t gk = 0, gq = 0;
    for (int64_t i = 0; i < L; ++i) {
      const bool global = p.global_mask && p.global_mask[b * L + i];
      const bool padded = p.key_padding_mask && p.key_padding_mask[b * L + i];
      if (global && !padded) plan.global_keys[b * plan.max_global_keys + gk++] = i;
      if (global && i >= plan.q_begin && i < plan.q_end) plan.global_queries[b * plan.max_global_queries + gq++] = i;
    }
  }
  for (int64_t r = 0; r < std::min(d, L); ++r) {
    const auto [first, end] = plan.query_slots(r);
    for (int64_t t0 = first; t0 < end; t0 += kBlockQ) plan.blocks.emplace_back(r, t0);
  }
  plan.key_begin = 0;
  plan.key_end = L;
  if (plan.max_global_queries == 0) {  // windows reach w * d positions on each side (w, d <= L)
    const int64_t reach = plan.window * d;
    plan.key_begin = std::max<int64_t>(0, plan.q_begin - reach);
    plan.key_end = std::min(L, plan.q_end + reach);
  }
  plan.pair_offset.assign(d + 1, 0);
  for (int64_t r = 0; r < d; ++r) plan.pair_offset[r + 1] = plan.pair_offset[r] + (plan.order.length(r) + 1) / 2;
  return plan;
}

// rows (n x D, leading dimension ld) = x[index[g]] for x (L x D, leading dimension ldx).
template <typename T>
inline void gather_rows(const T* x, int64_t ldx, const int64_t* index, int64_t n, int64_t D, T* rows, int64_t ld) {
  for (int64_t g = 0; g < n; ++g) std::copy(x + index[g] * ldx, x + index[g] * ldx + D, rows + g * ld);
}

// Scores of query rows t0.. (of one residue subsequence) against key slots c0.. of the same
// subsequence: keeps (|t - t'| <= w and not padded) or (global and not padded), and with
// `causal` only t' <= t; else -inf. The band is applied with plain fills; the few global /
// padded columns are patched after.
inline void mask_local(float* S, int64_t lds, int64_t M, int64_t N, int64_t t0, int64_t c0,
                       int64_t w, bool causal, const uint8_t* cls) {
  int64_t special[kMaxChunk];
  int64_t nspecial = 0;
  for (int64_t c = 0; c < N; ++c) {
    if (cls[c] != kNormalKey) special[nspecial++] = c;
  }
  float saved[kMaxChunk];
  for (int64_t m = 0; m < M; ++m) {
    float* row = S + m * lds;
    const int64_t lo = t0 + m - w - c0, hi = t0 + m + (causal ? 0 : w) - c0;  // band, inclusive
    const int64_t last = causal ? t0 + m - c0 : N;  // a global key is kept up to this column
    for (int64_t s = 0; s < nspecial; ++s) saved[s] = row[special[s]];
    if (lo > 0) std::fill_n(row, std::min(lo, N), -kInf);
    if (hi + 1 < N) std::fill(row + std::max<int64_t>(hi + 1, 0), row + N, -kInf);
    for (int64_t s = 0; s < nspecial; ++s) {
      row[special[s]] = cls[special[s]] == kGlobalKey && special[s] <= last ? saved[s] : -kInf;
    }
  }
}

// Applies a per-column keep flag to every row: -inf where keep[c] is false.
inline void mask_columns(float* S, int64_t lds, int64_t M, int64_t N, const uint8_t* keep) {
  for (int64_t m = 0; m < M; ++m) {
    float* row = S + m * lds;
    for (int64_t c = 0; c < N; ++c) {
      if (!keep[c]) row[c] = -kInf;
    }
  }
}

// Causal (and source) mask of a tile whose key positions key_pos(c) ascend with c: row m keeps
// the keys at positions <= query_pos(m) (its query position, or its key limit).
template <typename KeyPos, typename QueryPos>
inline void mask_future_keys(float* S, int64_t lds, int64_t M, int64_t N, const KeyPos& key_pos,
                             const QueryPos& query_pos) {
  for (int64_t m = 0; m < M; ++m) {
    float* row = S + m * lds;
    const int64_t i = query_pos(m);
    for (int64_t c = N - 1; c >= 0 && key_pos(c) > i; --c) row[c] = -kInf;
  }
}

// Global keys of batch b already visited by the local range [lo, hi) of residue r get keep = 0.
inline void global_keep_flags(const BlockSparsePlan& plan, int64_t b, int64_t r, int64_t lo,
                              int64_t hi, uint8_t* keep) {
  const int64_t* keys = plan.global_keys.data() + b * plan.max_global_keys;
  const int64_t d = plan.order.d;
  for (int64_t g = 0; g < plan.num_global_keys[b]; ++g) {
    const int64_t j = keys[g];
    keep[g] = !(j % d == r && j / d >= lo && j / d < hi);
  }
}

// row[c] *= scale, vectorised.
inline void scale_inplace(float* row, int64_t n, float scale) {
  using Vec = at::vec::Vectorized<float>;
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) (Vec::loadu(row + c) * Vec(scale)).store(row + c);
  for (; c < n; ++c) row[c] *= scale;
}

inline float row_max(const float* row, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t kV = Vec::size();
  Vec m0(-kInf), m1(-kInf), m2(-kInf), m3(-kInf);  // independent chains
  int64_t c = 0;
  for (; c + 4 * kV <= n; c += 4 * kV) {
    m0 = at::vec::maximum(m0, Vec::loadu(row + c));
    m1 = at::vec::maximum(m1, Vec::loadu(row + c + kV));
    m2 = at::vec::maximum(m2, Vec::loadu(row + c + 2 * kV));
    m3 = at::vec::maximum(m3, Vec::loadu(row + c + 3 * kV));
  }
  for (; c + kV <= n; c += kV) m0 = at::vec::maximum(m0, Vec::loadu(row + c));
  float mx = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)).reduce_max();
  for (; c < n; ++c) mx = std::max(mx, row[c]);
  return mx;
}

// Scaled scores beyond 2^20 in magnitude are scaled in place before the softmax, which then
// runs with scale 1: the exponents are then differences of the same rounded products the row
// maximum was taken from, so the largest score gets exp(0) exactly. With the scale folded into
// exp's fused multiply-add instead, one ulp of a product like 1e9 * 4 (256) would push the
// largest score's exponent far from 0 and its weight to 0 or infinity.
constexpr float kExactScoreLimit = 1048576.f;

// The scale that exp_scaled should apply to `row` (n scores, the largest scaled one about
// `scaled_max`: the scaled row maximum, or the row's log-sum-exp): `scale`, or 1 after scaling
// the row in place when the scaled scores are that large (an infinite scaled_max: left alone).
inline float fold_large_scale(float* row, int64_t n, float scale, float scaled_max) {
  if (!(std::abs(scaled_max) > kExactScoreLimit) || std::isinf(scaled_max)) return scale;
  scale_inplace(row, n, scale);
  return 1.f;
}

// Scores are masked before they are scaled, so the scale must keep -inf at -inf: a
// non-positive scale is applied to the scores first (prescale) and 1 is used after.
inline bool needs_prescale(float scale) { return !(scale > 0.f); }
inline float softmax_scale(float scale) { return scale > 0.f ? scale : 1.f; }

// out[c] = exp(scale * s[c] - shift) as T (out may alias s when T is float); returns the sum
// of the float values. shift = +inf gives zeros. The shift is the row's running maximum or its
// log-sum-exp, so the exponent is <= 0 in exact arithmetic; it is clamped at 0, because at a
// huge scale the rounding of scale * s (e.g. 1e9 * 4: one ulp is 256) would overflow exp. For bfloat16 an odd n also zeroes out[n]
// (the padding column of a pair-packed product).
template <typename T>
inline float exp_scaled(const float* s, int64_t n, float scale, float shift, T* out) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t kV = Vec::size();
  if (shift == kInf) {
    std::fill_n(out, kPairPacked<T> ? (n + 1) / 2 * 2 : n, T(0.f));
    return 0.f;
  }
  const Vec vscale(scale), vshift(-shift), vzero(0.f);
  Vec vsum(0.f), vsum2(0.f);  // two chains
  auto store = [&](const Vec& e, int64_t at) {
    if constexpr (!kPairPacked<T>) {
      e.store(out + at);
    } else {
#if MOEDIFFUSEQ_AVX512BF16
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + at), (__m256i)_mm512_cvtneps_pbh(e));
#else
      float tmp[kV];
      e.store(tmp);
      at::vec::convert(tmp, out + at, kV);
#endif
    }
  };
  int64_t c = 0;
  for (; c + 2 * kV <= n; c += 2 * kV) {
    const Vec e0 = at::vec::minimum(at::vec::fmadd(Vec::loadu(s + c), vscale, vshift), vzero).exp_u20();
    const Vec e1 = at::vec::minimum(at::vec::fmadd(Vec::loadu(s + c + kV), vscale, vshift), vzero).exp_u20();
    store(e0, c);
    store(e1, c + kV);
    vsum = vsum + e0;
    vsum2 = vsum2 + e1;
  }
  for (; c + kV <= n; c += kV) {
    const Vec e = at::vec::minimum(at::vec::fmadd(Vec::loadu(s + c), vscale, vshift), vzero).exp_u20();
    store(e, c);
    vsum = vsum + e;
  }
  vsum = vsum + vsum2;
  float sum = vsum.reduce_add();
  for (; c < n; ++c) {
    const float e = std::exp(std::min(s[c] * scale - shift, 0.f));
    out[c] = static_cast<T>(e);
    sum += e;
  }
  if (kPairPacked<T> && n % 2 == 1) out[n] = T(0.f);
  return sum;
}

}  // namespace moediffuseq::cpu
