// CPU backward of block-sparse attention (gradients of q, k and v), recomputing the
// probabilities tile by tile from the forward's log-sum-exp, as flash attention does:
//   P = exp(scale * q.k - lse),  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
//   dV += P^T dO,  dQ += scale * dS K,  dK += scale * dS^T Q.
// Work items are whole heads (batch*head), so each thread owns the dK/dV rows it accumulates.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <vector>

#include "cpu/block_sparse_attention_cpu.h"
#include "cpu/block_sparse_attention_operands.h"
#include "cpu/block_sparse_attention_plan.h"
#include "cpu/tile_gemm.h"

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
  const T* dout;  // (M x D) A operand, leading dimension lda
  int64_t lda;
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
        dvg(std::max<int64_t>(plan.max_global_keys, 1) * D), delta(plan.order.L),
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

// Operands of M query rows (rows of q and dout with leading dimension ld).
template <typename T>
QueryTile<T> query_tile(BackwardScratch<T>& w, const T* q, const T* dout, int64_t ld, int64_t M, int64_t D) {
  if constexpr (!kPairPacked<T>) {
    return {q, dout, ld, {q, ld}, {dout, ld}, w.lse.data(), w.delta_rows.data()};
  } else {
    copy_rows_padded(q, ld, M, D, w.q.data(), w.ldq);
    copy_rows_padded(dout, ld, M, D, w.dout.data(), w.ldq);
    pack_rows(q, ld, M, D, w.q_b.data(), packed_ld<T>(D));
    pack_rows(dout, ld, M, D, w.dout_b.data(), packed_ld<T>(D));
    return {w.q.data(), w.dout.data(), w.ldq, {w.q_b.data(), packed_ld<T>(D)},
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
  for (int64_t m = 0; m < M; ++m) exp_scaled(s + m * kLdS, N, es, qt.lse[m], s + m * kLdS);
  tile_gemm<T>(M, N, D, qt.dout, qt.lda, kc.vt, dp, kLdS, false);
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

template <typename T>
void backward_head(const BlockSparseAttentionParams& p, const BlockSparsePlan& plan, int64_t bh,
                   BackwardScratch<T>& w) {
  const int64_t H = p.heads, L = p.seqlen, D = p.head_dim, b = bh / H;
  const ResidueOrder& order = plan.order;
  const int64_t d = order.d, Gk = plan.num_global_keys[b], Gq = plan.num_global_queries[b];
  const T* q = static_cast<const T*>(p.q) + bh * L * D;
  const T* k = static_cast<const T*>(p.k) + bh * L * D;
  const T* v = static_cast<const T*>(p.v) + bh * L * D;
  const T* o = static_cast<const T*>(p.out) + bh * L * D;
  const T* dout = static_cast<const T*>(p.grad_out) + bh * L * D;
  const float* lse = p.lse + bh * L;
  T* dq_out = static_cast<T*>(p.grad_q) + bh * L * D;
  constexpr bool kFloat = std::is_same_v<T, float>;
  float* dk = kFloat ? reinterpret_cast<float*>(p.grad_k) + bh * L * D : w.dk.data();
  float* dv = kFloat ? reinterpret_cast<float*>(p.grad_v) + bh * L * D : w.dv.data();
  std::fill_n(dk, L * D, 0.f);
  std::fill_n(dv, L * D, 0.f);
  std::fill_n(w.dkg.data(), Gk * D, 0.f);
  std::fill_n(w.dvg.data(), Gk * D, 0.f);
  w.head.build(k, v, b);
  const HeadOperands<T>& ops = w.head;
  for (int64_t i = 0; i < L; ++i) {
    float acc = 0.f;
    for (int64_t c = 0; c < D; ++c) acc += static_cast<float>(dout[i * D + c]) * static_cast<float>(o[i * D + c]);
    w.delta[i] = acc;
  }
  const int64_t* gq = plan.global_queries.data() + b * plan.max_global_queries;
  std::fill(w.is_global_query.begin(), w.is_global_query.end(), 0);
  for (int64_t g = 0; g < Gq; ++g) w.is_global_query[gq[g]] = 1;

  // Pass 1: query blocks over their windows and the global keys outside them. Global query
  // rows are removed here (lse = +inf) and handled densely in pass 2.
  for (const auto& [r, t0] : plan.blocks) {
    const int64_t off = order.offset(r);
    const int64_t t1 = std::min(order.length(r), t0 + kBlockQ), M = t1 - t0;
    if (plan.all_global_queries(b, r, t0, t1)) continue;  // pass 2 writes every dq row of it
    for (int64_t m = 0; m < M; ++m) {
      const int64_t i = r + d * (t0 + m);
      w.lse[m] = w.is_global_query[i] ? kInf : lse[i];
      w.delta_rows[m] = w.delta[i];
    }
    const QueryTile<T> qt = query_tile(w, q + (r + d * t0) * D, dout + (r + d * t0) * D, d * D, M, D);
    std::fill_n(w.dq.data(), M * D, 0.f);
    const auto [lo, hi] = plan.local_range(r, t0, t1);
    for (int64_t c0 = lo; c0 < hi; c0 += kMaxChunk) {
      const int64_t N = std::min(kMaxChunk, hi - c0);
      const int64_t first = r + d * c0;
      const KeyChunk<T> kc{ops.kt().col(off + c0), ops.vt().col(off + c0), ops.rows(r).row(c0),
                           dk + first * D, dv + first * D, d * D};
      const uint8_t* cls = plan.classes(b) + off + c0;
      tile_step(w, qt, kc, M, N, D, p.scale, [&](float* s, int64_t lds) {
        mask_local(s, lds, M, N, t0, c0, plan.window, cls);
      });
    }
    if (Gk > 0) global_keep_flags(plan, b, r, lo, hi, w.keep.data());
    for (int64_t g0 = 0; g0 < Gk; g0 += kMaxChunk) {
      const int64_t N = std::min(kMaxChunk, Gk - g0);
      const KeyChunk<T> kc{ops.global_kt().col(g0), ops.global_vt().col(g0), ops.global_rows().row(g0),
                           w.dkg.data() + g0 * D, w.dvg.data() + g0 * D, D};
      const uint8_t* keep = w.keep.data() + g0;
      tile_step(w, qt, kc, M, N, D, p.scale, [&](float* s, int64_t lds) { mask_columns(s, lds, M, N, keep); });
    }
    store_rows(w.dq.data(), M, D, dq_out + (r + d * t0) * D, d * D, nullptr);
  }

  // Pass 2: global query rows against every non-padded key.
  for (int64_t g0 = 0; g0 < Gq; g0 += kBlockQ) {
    const int64_t M = std::min(kBlockQ, Gq - g0);
    const int64_t* rows = gq + g0;
    for (int64_t m = 0; m < M; ++m) {
      w.lse[m] = lse[rows[m]];
      w.delta_rows[m] = w.delta[rows[m]];
    }
    // gathered q rows, then gathered dO rows after them in the same buffer
    std::vector<T>& buf = w.rows_copy;
    gather_rows(q, rows, M, D, buf.data(), D);
    gather_rows(dout, rows, M, D, buf.data() + kBlockQ * D, D);
    const QueryTile<T> qt = query_tile(w, buf.data(), buf.data() + kBlockQ * D, D, M, D);
    std::fill_n(w.dq.data(), M * D, 0.f);
    for (int64_t r = 0; r < std::min(d, L); ++r) {
      const int64_t Lr = order.length(r), off = order.offset(r);
      for (int64_t c0 = 0; c0 < Lr; c0 += kMaxChunk) {
        const int64_t N = std::min(kMaxChunk, Lr - c0);
        const int64_t first = r + d * c0;
        const KeyChunk<T> kc{ops.kt().col(off + c0), ops.vt().col(off + c0), ops.rows(r).row(c0),
                             dk + first * D, dv + first * D, d * D};
        const uint8_t* cls = plan.classes(b) + off + c0;
        for (int64_t c = 0; c < N; ++c) w.keep[c] = cls[c] != kPaddedKey;
        tile_step(w, qt, kc, M, N, D, p.scale, [&](float* s, int64_t lds) {
          mask_columns(s, lds, M, N, w.keep.data());
        });
      }
    }
    store_rows(w.dq.data(), M, D, dq_out, D, rows);
  }

  // Global keys' gradients back to their positions, then the output dtype.
  const int64_t* gkeys = plan.global_keys.data() + b * plan.max_global_keys;
  for (int64_t g = 0; g < Gk; ++g) {
    for (int64_t c = 0; c < D; ++c) {
      dk[gkeys[g] * D + c] += w.dkg[g * D + c];
      dv[gkeys[g] * D + c] += w.dvg[g * D + c];
    }
  }
  if constexpr (!kFloat) {
    store_rows(dk, L, D, static_cast<T*>(p.grad_k) + bh * L * D, D, nullptr);
    store_rows(dv, L, D, static_cast<T*>(p.grad_v) + bh * L * D, D, nullptr);
  }
}

template <typename T>
void backward_impl(const BlockSparseAttentionParams& p) {
  const BlockSparsePlan plan = make_plan(p);
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    BackwardScratch<T> w(plan, p.head_dim, kPairPacked<T>);
    for (int64_t bh = begin; bh < end; ++bh) backward_head(p, plan, bh, w);
  });
}

}  // namespace

void block_sparse_attention_bwd_cpu(const BlockSparseAttentionParams& params, c10::ScalarType dtype) {
  if (dtype == c10::ScalarType::Float) {
    backward_impl<float>(params);
  } else {
    backward_impl<c10::BFloat16>(params);
  }
}

}  // namespace moediffuseq::cpu
