// CPU forward of block-sparse attention: tiled, online softmax, float32 accumulation.
// Work items are (batch*head, query block) pairs, then (batch*head, block of global queries),
// run with at::parallel_for; each thread keeps its own tiles and rebuilds the per-head
// operands (block_sparse_attention_operands.h) when its items move to another head.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <vector>

#include "attention/cpu/block_sparse_attention_cpu.h"
#include "attention/cpu/block_sparse_attention_operands.h"
#include "attention/cpu/block_sparse_attention_plan.h"
#include "attention/cpu/tile_gemm.h"

namespace moediffuseq::cpu {
namespace {

// One thread's tiles and the running softmax state of kBlockQ query rows.
template <typename T>
struct ForwardScratch {
  ForwardScratch(const BlockSparsePlan& plan, int64_t D)
      : head(plan, D, kForwardOperands), ldq((D + 1) / 2 * 2), s(kBlockQ * kLdS), p(kBlockQ * kLdS),
        acc(kBlockQ * D), q(kBlockQ * ldq), row_max(kBlockQ), row_sum(kBlockQ),
        keep(std::max<int64_t>({plan.max_global_keys, std::min(kMaxChunk, plan.order.L), 1})) {}
  HeadOperands<T> head;
  int64_t head_index = -1;
  int64_t ldq;  // leading dimension of the query copy (even: a bfloat16 A operand)
  std::vector<float> s;
  std::vector<T> p;
  std::vector<float> acc;
  std::vector<T> q;
  std::vector<float> row_max, row_sum;
  std::vector<uint8_t> keep;

  void reset(int64_t M, int64_t D) {
    std::fill_n(acc.data(), M * D, 0.f);
    std::fill_n(row_max.data(), M, -kInf);
    std::fill_n(row_sum.data(), M, 0.f);
  }
};

// Online-softmax update of M rows with the masked scores in s (M x N), to be multiplied by
// `scale`: rescales the accumulator and returns the probabilities as A operand.
template <typename T>
const T* softmax_update(ForwardScratch<T>& w, int64_t M, int64_t N, int64_t D, float scale) {
  T* prob = kPairPacked<T> ? w.p.data() : reinterpret_cast<T*>(w.s.data());
  for (int64_t m = 0; m < M; ++m) {
    float* row = w.s.data() + m * kLdS;
    float tile_max = row_max(row, N);
    const float row_scale = fold_large_scale(row, N, scale, scale * tile_max);
    if (row_scale != scale) tile_max = row_max(row, N);
    const float m_new = std::max(w.row_max[m], row_scale * tile_max);
    if (m_new == -kInf) {  // nothing allowed yet: probabilities are zero
      exp_scaled(row, N, row_scale, kInf, prob + m * kLdS);
      continue;
    }
    const float alpha = std::exp(w.row_max[m] - m_new);
    w.row_sum[m] = w.row_sum[m] * alpha + exp_scaled(row, N, row_scale, m_new, prob + m * kLdS);
    w.row_max[m] = m_new;
    if (alpha != 1.f) scale_inplace(w.acc.data() + m * D, D, alpha);
  }
  return prob;
}

// Raw scores of M query rows against N keys (prescaled when the scale is not positive).
template <typename T>
void scores(ForwardScratch<T>& w, const T* q, int64_t ldq, int64_t M, BMat<T> kt, int64_t N, int64_t D,
            float scale) {
  tile_gemm<T>(M, N, D, q, ldq, kt, w.s.data(), kLdS, false);
  if (needs_prescale(scale)) {
    for (int64_t m = 0; m < M; ++m) scale_inplace(w.s.data() + m * kLdS, N, scale);
  }
}

// out rows = acc / row_sum; lse = row_max + log(row_sum); +inf and zeros for empty rows.
// Row m goes to out + rows[m] * ldo (rows = null: row m at m * ldo).
template <typename T>
void finish_rows(const ForwardScratch<T>& w, int64_t M, int64_t D, T* out, int64_t ldo, float* lse,
                 int64_t ld_lse, const int64_t* rows = nullptr) {
  for (int64_t m = 0; m < M; ++m) {
    const int64_t i = rows ? rows[m] : m;
    T* o = out + i * ldo;
    const float l = w.row_sum[m];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(w.acc[m * D + c] * inv);
    lse[i * ld_lse] = l > 0.f ? w.row_max[m] + std::log(l) : kInf;
  }
}

// The query rows as A operand: in place for float, a zero-padded copy for bfloat16.
template <typename T>
const T* query_operand(ForwardScratch<T>& w, const T* q, int64_t ld, int64_t M, int64_t D, int64_t& lda) {
  if constexpr (!kPairPacked<T>) {
    lda = ld;
    return q;
  } else {
    copy_rows_padded(q, ld, M, D, w.q.data(), w.ldq);
    lda = w.ldq;
    return w.q.data();
  }
}

template <typename T>
void forward_impl(const BlockSparseAttentionParams& p) {
  const int64_t H = p.heads, group = p.heads / p.kv_heads, L = p.seqlen, Lq = p.q_len, D = p.head_dim;
  const int64_t BH = p.batch * H;
  const BlockSparsePlan plan = make_plan(p);
  const ResidueSubsequences& order = plan.order;
  const int64_t d = order.d, Gq = plan.max_global_queries;
  const BsaStrides qs = p.q_strides, ks = p.k_strides, vs = p.v_strides, os = p.out_strides;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out_mut);
  // Operands of the key/value head that query head h of batch b reads (rebuilt only when it changes:
  // the query heads of one group are consecutive items).
  auto use_head = [&](ForwardScratch<T>& w, int64_t b, int64_t h) {
    const int64_t hk = h / group, index = b * p.kv_heads + hk;
    if (w.head_index != index) w.head.build(k + ks.at(b, hk, 0), ks.row, v + vs.at(b, hk, 0), vs.row, b);
    w.head_index = index;
  };

  // Pass 1: every query block with a non-global row: its window, then the global keys outside it.
  const int64_t nblocks = static_cast<int64_t>(plan.blocks.size());
  at::parallel_for(0, BH * nblocks, 1, [&](int64_t begin, int64_t end) {
    ForwardScratch<T> w(plan, D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / nblocks, b = bh / H, h = bh % H;
      const auto [r, t0] = plan.blocks[item % nblocks];
      const int64_t off = order.offset(r);
      const int64_t t1 = std::min(plan.query_slots(r).second, t0 + kBlockQ), M = t1 - t0;
      if (plan.all_global_queries(b, r, t0, t1)) continue;  // pass 2 writes every row of it
      use_head(w, b, h);
      const int64_t first_query = plan.position(r, t0), last_query = plan.position(r, t1 - 1);
      const int64_t first_row = first_query - plan.q_begin;  // query rows step by d
      const auto limit = [&](int64_t m) { return plan.key_limit(b, plan.position(r, t0 + m)); };
      const bool straddles = plan.straddles_source(b, first_query, last_query);
      int64_t ldq = 0;
      const T* qb = query_operand(w, q + qs.at(b, h, first_row), d * qs.row, M, D, ldq);
      w.reset(M, D);
      const auto [lo, hi] = plan.local_range(b, r, t0, t1);
      for (int64_t c0 = lo; c0 < hi; c0 += kMaxChunk) {
        const int64_t N = std::min(kMaxChunk, hi - c0);
        scores(w, qb, ldq, M, w.head.kt().col(off + c0), N, D, p.scale);
        mask_local(w.s.data(), kLdS, M, N, t0, c0, plan.window, plan.causal, plan.classes(b) + off + c0);
        if (straddles) {
          mask_future_keys(w.s.data(), kLdS, M, N, [&](int64_t c) { return plan.position(r, c0 + c); }, limit);
        }
        const T* prob = softmax_update(w, M, N, D, softmax_scale(p.scale));
        tile_gemm<T>(M, D, N, prob, kLdS, w.head.rows(r).row(c0), w.acc.data(), D, true);
      }
      // global keys up to the last row's key limit (the later ones are in its future or target)
      const int64_t G = plan.global_keys_upto(b, plan.key_limit(b, last_query));
      const int64_t* gkeys = plan.global_keys.data() + b * plan.max_global_keys;
      if (G > 0) global_keep_flags(plan, b, r, lo, hi, w.keep.data());
      for (int64_t g0 = 0; g0 < G; g0 += kMaxChunk) {
        const int64_t N = std::min(kMaxChunk, G - g0);
        scores(w, qb, ldq, M, w.head.global_kt().col(g0), N, D, p.scale);
        mask_columns(w.s.data(), kLdS, M, N, w.keep.data() + g0);
        if (plan.causal || straddles) {
          mask_future_keys(w.s.data(), kLdS, M, N, [&](int64_t c) { return gkeys[g0 + c]; }, limit);
        }
        const T* prob = softmax_update(w, M, N, D, softmax_scale(p.scale));
        tile_gemm<T>(M, D, N, prob, kLdS, w.head.global_rows().row(g0), w.acc.data(), D, true);
      }
      finish_rows(w, M, D, out + os.at(b, h, first_row), d * os.row, p.lse + bh * Lq + first_row, d);
    }
  });

  // Pass 2: global query rows attend to every non-padded key (to every non-padded key at or
  // before them when causal, to source keys only from a source row; overwrites their pass-1 rows).
  if (Gq == 0) return;
  const int64_t gblocks = (Gq + kBlockQ - 1) / kBlockQ;
  at::parallel_for(0, BH * gblocks, 1, [&](int64_t begin, int64_t end) {
    ForwardScratch<T> w(plan, D);
    std::vector<T> rows_copy(kBlockQ * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / gblocks, b = bh / H, h = bh % H;
      const int64_t g0 = (item % gblocks) * kBlockQ;
      const int64_t M = std::min(kBlockQ, plan.num_global_queries[b] - g0);
      if (M <= 0) continue;
      use_head(w, b, h);
      const int64_t* rows = plan.global_queries.data() + b * Gq + g0;  // positions, ascending
      int64_t query_rows[kBlockQ];
      for (int64_t m = 0; m < M; ++m) query_rows[m] = rows[m] - plan.q_begin;
      gather_rows(q + qs.at(b, h, 0), qs.row, query_rows, M, D, rows_copy.data(), D);
      int64_t ldq = 0;
      const T* qb = query_operand(w, rows_copy.data(), D, M, D, ldq);
      w.reset(M, D);
      const auto limit = [&](int64_t m) { return plan.key_limit(b, rows[m]); };
      const bool per_row = plan.causal || plan.straddles_source(b, rows[0], rows[M - 1]);
      for (int64_t r = 0; r < std::min(d, L); ++r) {
        // the keys up to the last row's limit (rows ascend: the later ones are masked for all)
        const int64_t Lr = plan.key_slots_upto(r, limit(M - 1)), off = order.offset(r);
        for (int64_t c0 = 0; c0 < Lr; c0 += kMaxChunk) {
          const int64_t N = std::min(kMaxChunk, Lr - c0);
          const uint8_t* cls = plan.classes(b) + off + c0;
          for (int64_t c = 0; c < N; ++c) w.keep[c] = cls[c] != kPaddedKey;
          scores(w, qb, ldq, M, w.head.kt().col(off + c0), N, D, p.scale);
          mask_columns(w.s.data(), kLdS, M, N, w.keep.data());
          if (per_row) {
            mask_future_keys(w.s.data(), kLdS, M, N, [&](int64_t c) { return plan.position(r, c0 + c); }, limit);
          }
          const T* prob = softmax_update(w, M, N, D, softmax_scale(p.scale));
          tile_gemm<T>(M, D, N, prob, kLdS, w.head.rows(r).row(c0), w.acc.data(), D, true);
        }
      }
      finish_rows(w, M, D, out + os.at(b, h, 0), os.row, p.lse + bh * Lq, 1, query_rows);
    }
  });
}

}  // namespace

void block_sparse_attention_fwd_cpu(const BlockSparseAttentionParams& params, c10::ScalarType dtype) {
  with_bsa_element_type(dtype, [&](auto element) { forward_impl<decltype(element)>(params); });
}

}  // namespace moediffuseq::cpu
