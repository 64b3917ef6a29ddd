// CPU backward of block-sparse attention (gradients of q, k and v), recomputing the
// probabilities tile by tile from the forward's log-sum-exp, as flash attention does:
//   P = exp(scale * q.k - lse),  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
//   dV += P^T dO,  dQ += scale * dS K,  dK += scale * dS^T Q.
// Work items are whole key/value heads (batch*kv_head) with every query head of their group
// (grouped-query attention), so each thread owns the dK/dV rows it accumulates.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <vector>

#include "attention/cpu/block_sparse_attention_cpu.h"
#include "attention/cpu/block_sparse_attention_operands.h"
#include "attention/cpu/block_sparse_attention_plan.h"
#include "attention/cpu/tile_gemm.h"

namespace moediffuseq::cpu {
namespace {

// Key-side operands of one chunk of keys.
template <typename T>
struct KeyChunk {
  BMat<T> kt;    // K^T (D x N), for the scores
  BMat<T> vt;    // V^T (D x N), for dP
  BMat<T> k;     // K (N x D), for dQ
  float* dk;     // (N x D) float accumulators, leading dimension ldg
  float* dv;
  int64_t ldg;
};

// Query-side operands of a tile of M rows.
template <typename T>
struct QueryTile {
  const T* q;     // (M x D) A operand, leading dimension lda
  const T* dout;  // (M x D) A operand, leading dimension lda_dout
  int64_t lda;
  int64_t lda_dout;
  BMat<T> q_b;     // Q (M x D) as B operand, for dK
  BMat<T> dout_b;  // dO (M x D) as B operand, for dV
  const float* lse;    // (M) log-sum-exp; +inf removes the row
  const float* delta;  // (M) rowsum(dO * O)
};

template <typename T>
struct BackwardScratch {
  BackwardScratch(const BlockSparsePlan& plan, int64_t D, bool own_dkv)
      : head(plan, D, kBackwardOperands), ldq((D + 1) / 2 * 2), s(kBlockQ * kLdS), dp(kBlockQ * kLdS),
        op(kBlockQ * kLdS), opt(kMaxChunk * kBlockQ), dq(kBlockQ * D), q(kBlockQ * ldq),
        dout(kBlockQ * ldq), q_b(packed_rows<T>(kBlockQ) * packed_ld<T>(D)),
        dout_b(packed_rows<T>(kBlockQ) * packed_ld<T>(D)), rows_copy(2 * kBlockQ * D), lse(kBlockQ),
        delta_rows(kBlockQ), keep(std::max<int64_t>({plan.max_global_keys, std::min(kMaxChunk, plan.order.L), 1})),
        is_global_query(plan.order.L), dkg(std::max<int64_t>(plan.max_global_keys, 1) * D),
        dvg(std::max<int64_t>(plan.max_global_keys, 1) * D), delta(plan.q_end - plan.q_begin),
        dk(own_dkv ? plan.order.L * D : 0), dv(own_dkv ? plan.order.L * D : 0) {}
  HeadOperands<T> head;
  int64_t ldq;
  std::vector<float> s, dp;
  std::vector<T> op, opt;
  std::vector<float> dq;
  std::vector<T> q, dout, q_b, dout_b, rows_copy;
  std::vector<float> lse, delta_rows;
  std::vector<uint8_t> keep, is_global_query;
  std::vector<float> dkg, dvg, delta, dk, dv;
};

// Operands of M query rows (rows of q and dout with leading dimensions ldq and ldo).
template <typename T>
QueryTile<T> query_tile(BackwardScratch<T>& w, const T* q, int64_t ldq, const T* dout, int64_t ldo, int64_t M,
                        int64_t D) {
  if constexpr (!kPairPacked<T>) {
    return {q, dout, ldq, ldo, {q, ldq}, {dout, ldo}, w.lse.data(), w.delta_rows.data()};
  } else {
    copy_rows_padded(q, ldq, M, D, w.q.data(), w.ldq);
    copy_rows_padded(dout, ldo, M, D, w.dout.data(), w.ldq);
    pack_rows(q, ldq, M, D, w.q_b.data(), packed_ld<T>(D));
    pack_rows(dout, ldo, M, D, w.dout_b.data(), packed_ld<T>(D));
    return {w.q.data(), w.dout.data(), w.ldq, w.ldq, {w.q_b.data(), packed_ld<T>(D)},
            {w.dout_b.data(), packed_ld<T>(D)}, w.lse.data(), w.delta_rows.data()};
  }
}

// One (query tile, key chunk) step; `mask(s, lds)` sets disallowed scores to -inf.
template <typename T, typename Mask>
void tile_step(BackwardScratch<T>& w, const QueryTile<T>& qt, const KeyChunk<T>& kc, int64_t M, int64_t N,
               int64_t D, float scale, const Mask& mask) {
  float* s = w.s.data();
  float* dp = w.dp.data();
  tile_gemm<T>(M, N, D, qt.q, qt.lda, kc.kt, s, kLdS, false);
  if (needs_prescale(scale)) {
    for (int64_t m = 0; m < M; ++m) scale_inplace(s + m * kLdS, N, scale);
  }
  mask(s, kLdS);
  const float es = softmax_scale(scale);
  for (int64_t m = 0; m < M; ++m) {
    float* row = s + m * kLdS;
    exp_scaled(row, N, fold_large_scale(row, N, es, qt.lse[m]), qt.lse[m], row);
  }
  tile_gemm<T>(M, N, D, qt.dout, qt.lda_dout, kc.vt, dp, kLdS, false);
  using Vec = at::vec::Vectorized<float>;
  for (int64_t m = 0; m < M; ++m) {
    const float* pr = s + m * kLdS;
    float* dr = dp + m * kLdS;
    const Vec vd(qt.delta[m]), vs(scale);
    int64_t c = 0;
    for (; c + Vec::size() <= N; c += Vec::size()) {
      (Vec::loadu(pr + c) * (Vec::loadu(dr + c) - vd) * vs).store(dr + c);
    }
    for (; c < N; ++c) dr[c] = pr[c] * (dr[c] - qt.delta[m]) * scale;
  }
  // dV += P^T dO
  transpose_to<T>(s, kLdS, M, N, w.opt.data(), kBlockQ);
  tile_gemm<T>(N, D, M, w.opt.data(), kBlockQ, qt.dout_b, kc.dv, kc.ldg, true);
  // dQ += dS K   (dS already carries the scale)
  const T* ds = gemm_operand<T>(dp, kLdS, M, N, w.op.data());
  tile_gemm<T>(M, D, N, ds, kLdS, kc.k, w.dq.data(), D, true);
  // dK += dS^T Q
  transpose_to<T>(dp, kLdS, M, N, w.opt.data(), kBlockQ);
  tile_gemm<T>(N, D, M, w.opt.data(), kBlockQ, qt.q_b, kc.dk, kc.ldg, true);
}

template <typename T>
void store_rows(const float* src, int64_t M, int64_t D, T* dst, int64_t ld, const int64_t* rows) {
  for (int64_t m = 0; m < M; ++m) {
    T* o = dst + (rows ? rows[m] : m) * ld;
    for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(src[m * D + c]);
  }
}

// Gradients through query head h of batch b, whose key/value operands are built in w.head:
// writes its dQ rows, adds to the dK/dV accumulators (w.dk, w.dv natural order; w.dkg, w.dvg
// for the global keys).
template <typename T>
void backward_query_head(const BlockSparseAttentionParams& p, const BlockSparsePlan& plan, int64_t b, int64_t h,
                         BackwardScratch<T>& w) {
  const int64_t L = p.seqlen, Lq = p.q_len, D = p.head_dim;
  const ResidueSubsequences& order = plan.order;
  const int64_t d = order.d, Gq = plan.num_global_queries[b];
  const int64_t ldq = p.q_strides.row, ldo = p.grad_out_strides.row, ldout = p.out_strides.row;
  const int64_t lddq = p.grad_q_strides.row;
  const T* q = static_cast<const T*>(p.q) + p.q_strides.at(b, h, 0);
  const T* o = static_cast<const T*>(p.out) + p.out_strides.at(b, h, 0);
  const T* dout = static_cast<const T*>(p.grad_out) + p.grad_out_strides.at(b, h, 0);
  const float* lse = p.lse + (b * p.heads + h) * Lq;  // query rows
  T* dq_out = static_cast<T*>(p.grad_q) + p.grad_q_strides.at(b, h, 0);
  float* dk = w.dk.data();
  float* dv = w.dv.data();
  const HeadOperands<T>& ops = w.head;
  for (int64_t i = 0; i < Lq; ++i) {  // query rows
    float acc = 0.f;
    for (int64_t c = 0; c < D; ++c) {
      acc += static_cast<float>(dout[i * ldo + c]) * static_cast<float>(o[i * ldout + c]);
    }
    w.delta[i] = acc;
  }
  const int64_t* gq = plan.global_queries.data() + b * plan.max_global_queries;
  const int64_t* gkeys = plan.global_keys.data() + b * plan.max_global_keys;

  // Pass 1: query blocks over their windows and the global keys outside them. Global query
  // rows are removed here (lse = +inf) and handled densely in pass 2.
  for (const auto& [r, t0] : plan.blocks) {
    const int64_t off = order.offset(r);
    const int64_t t1 = std::min(plan.query_slots(r).second, t0 + kBlockQ), M = t1 - t0;
    if (plan.all_global_queries(b, r, t0, t1)) continue;  // pass 2 writes every dq row of it
    for (int64_t m = 0; m < M; ++m) {
      const int64_t i = plan.position(r, t0 + m);
      w.lse[m] = w.is_global_query[i] ? kInf : lse[i - plan.q_begin];
      w.delta_rows[m] = w.delta[i - plan.q_begin];
    }
    const int64_t first_query = plan.position(r, t0), last_query = plan.position(r, t1 - 1);
    const int64_t first_row = first_query - plan.q_begin;  // query rows step by d
    const auto limit = [&](int64_t m) { return plan.key_limit(b, plan.position(r, t0 + m)); };
    const bool straddles = plan.straddles_source(b, first_query, last_query);
    const QueryTile<T> qt = query_tile(w, q + first_row * ldq, d * ldq, dout + first_row * ldo, d * ldo, M, D);
    std::fill_n(w.dq.data(), M * D, 0.f);
    const auto [lo, hi] = plan.local_range(b, r, t0, t1);
    for (int64_t c0 = lo; c0 < hi; c0 += kMaxChunk) {
      const int64_t N = std::min(kMaxChunk, hi - c0);
      const int64_t first = r + d * c0;
      const KeyChunk<T> kc{ops.kt().col(off + c0), ops.vt().col(off + c0), ops.rows(r).row(c0),
                           dk + first * D, dv + first * D, d * D};
      const uint8_t* cls = plan.classes(b) + off + c0;
      tile_step(w, qt, kc, M, N, D, p.scale, [&](float* s, int64_t lds) {
        mask_local(s, lds, M, N, t0, c0, plan.window, plan.causal, cls);
        if (straddles) mask_future_keys(s, lds, M, N, [&](int64_t c) { return plan.position(r, c0 + c); }, limit);
      });
    }
    // global keys up to the last row's key limit (the later ones are in its future or target)
    const int64_t G = plan.global_keys_upto(b, plan.key_limit(b, last_query));
    if (G > 0) global_keep_flags(plan, b, r, lo, hi, w.keep.data());
    for (int64_t g0 = 0; g0 < G; g0 += kMaxChunk) {
      const int64_t N = std::min(kMaxChunk, G - g0);
      const KeyChunk<T> kc{ops.global_kt().col(g0), ops.global_vt().col(g0), ops.global_rows().row(g0),
                           w.dkg.data() + g0 * D, w.dvg.data() + g0 * D, D};
      const uint8_t* keep = w.keep.data() + g0;
      tile_step(w, qt, kc, M, N, D, p.scale, [&](float* s, int64_t lds) {
        mask_columns(s, lds, M, N, keep);
        if (plan.causal || straddles) mask_future_keys(s, lds, M, N, [&](int64_t c) { return gkeys[g0 + c]; }, limit);
      });
    }
    store_rows(w.dq.data(), M, D, dq_out + first_row * lddq, d * lddq, nullptr);
  }

  // Pass 2: global query rows against every non-padded key (at or before them when causal,
  // source keys only from a source row).
  for (int64_t g0 = 0; g0 < Gq; g0 += kBlockQ) {
    const int64_t M = std::min(kBlockQ, Gq - g0);
    const int64_t* rows = gq + g0;  // positions, ascending
    int64_t query_rows[kBlockQ];
    for (int64_t m = 0; m < M; ++m) {
      query_rows[m] = rows[m] - plan.q_begin;
      w.lse[m] = lse[query_rows[m]];
      w.delta_rows[m] = w.delta[query_rows[m]];
    }
    // gathered q rows, then gathered dO rows after them in the same buffer
    std::vector<T>& buf = w.rows_copy;
    gather_rows(q, ldq, query_rows, M, D, buf.data(), D);
    gather_rows(dout, ldo, query_rows, M, D, buf.data() + kBlockQ * D, D);
    const QueryTile<T> qt = query_tile(w, buf.data(), D, buf.data() + kBlockQ * D, D, M, D);
    std::fill_n(w.dq.data(), M * D, 0.f);
    const auto limit = [&](int64_t m) { return plan.key_limit(b, rows[m]); };
    const bool per_row = plan.causal || plan.straddles_source(b, rows[0], rows[M - 1]);
    for (int64_t r = 0; r < std::min(d, L); ++r) {
      // the keys up to the last row's limit (rows ascend: the later ones are masked for all)
      const int64_t Lr = plan.key_slots_upto(r, limit(M - 1)), off = order.offset(r);
      for (int64_t c0 = 0; c0 < Lr; c0 += kMaxChunk) {
        const int64_t N = std::min(kMaxChunk, Lr - c0);
        const int64_t first = r + d * c0;
        const KeyChunk<T> kc{ops.kt().col(off + c0), ops.vt().col(off + c0), ops.rows(r).row(c0),
                             dk + first * D, dv + first * D, d * D};
        const uint8_t* cls = plan.classes(b) + off + c0;
        for (int64_t c = 0; c < N; ++c) w.keep[c] = cls[c] != kPaddedKey;
        tile_step(w, qt, kc, M, N, D, p.scale, [&](float* s, int64_t lds) {
          mask_columns(s, lds, M, N, w.keep.data());
          if (per_row) mask_future_keys(s, lds, M, N, [&](int64_t c) { return plan.position(r, c0 + c); }, limit);
        });
      }
    }
    store_rows(w.dq.data(), M, D, dq_out, lddq, query_rows);
  }
}

// Key/value head hk of batch b: every query head of its group, then its dK and dV.
template <typename T>
void backward_kv_head(const BlockSparseAttentionParams& p, const BlockSparsePlan& plan, int64_t b, int64_t hk,
                      BackwardScratch<T>& w) {
  const int64_t L = p.seqlen, D = p.head_dim, group = p.heads / p.kv_heads;
  const int64_t Gk = plan.num_global_keys[b], Gq = plan.num_global_queries[b];
  std::fill_n(w.dk.data(), L * D, 0.f);
  std::fill_n(w.dv.data(), L * D, 0.f);
  std::fill_n(w.dkg.data(), Gk * D, 0.f);
  std::fill_n(w.dvg.data(), Gk * D, 0.f);
  w.head.build(static_cast<const T*>(p.k) + p.k_strides.at(b, hk, 0), p.k_strides.row,
               static_cast<const T*>(p.v) + p.v_strides.at(b, hk, 0), p.v_strides.row, b);
  const int64_t* gq = plan.global_queries.data() + b * plan.max_global_queries;
  std::fill(w.is_global_query.begin(), w.is_global_query.end(), 0);
  for (int64_t g = 0; g < Gq; ++g) w.is_global_query[gq[g]] = 1;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) backward_query_head(p, plan, b, h, w);

  // Global keys' gradients back to their positions, then the output dtype and strides.
  const int64_t* gkeys = plan.global_keys.data() + b * plan.max_global_keys;
  for (int64_t g = 0; g < Gk; ++g) {
    for (int64_t c = 0; c < D; ++c) {
      w.dk[gkeys[g] * D + c] += w.dkg[g * D + c];
      w.dv[gkeys[g] * D + c] += w.dvg[g * D + c];
    }
  }
  store_rows(w.dk.data(), L, D, static_cast<T*>(p.grad_k) + p.grad_k_strides.at(b, hk, 0), p.grad_k_strides.row,
             nullptr);
  store_rows(w.dv.data(), L, D, static_cast<T*>(p.grad_v) + p.grad_v_strides.at(b, hk, 0), p.grad_v_strides.row,
             nullptr);
}

template <typename T>
void backward_impl(const BlockSparseAttentionParams& p) {
  const BlockSparsePlan plan = make_plan(p);
  at::parallel_for(0, p.batch * p.kv_heads, 1, [&](int64_t begin, int64_t end) {
    BackwardScratch<T> w(plan, p.head_dim, /*own_dkv=*/true);
    for (int64_t item = begin; item < end; ++item) backward_kv_head(p, plan, item / p.kv_heads, item % p.kv_heads, w);
  });
}

}  // namespace

void block_sparse_attention_bwd_cpu(const BlockSparseAttentionParams& params, c10::ScalarType dtype) {
  with_bsa_element_type(dtype, [&](auto element) { backward_impl<decltype(element)>(params); });
}

}  // namespace moediffuseq::cpu
