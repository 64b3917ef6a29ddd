// CPU forward of block-sparse attention: tiled, online softmax, float32 accumulation.
// Work items are (batch*head, query block) pairs, then (batch*head, block of global queries),
// run with at::parallel_for; each thread keeps its own score/probability/accumulator tiles.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <vector>

#include "cpu/block_sparse_attention_cpu.h"
#include "cpu/block_sparse_attention_plan.h"
#include "cpu/tile_gemm.h"

namespace moediffuseq::cpu {
namespace {

// Per-head copies that make every tile product a plain row-major gemm.
template <typename T>
struct ForwardHeadBuffers {
  std::vector<T> kt;   // (BH, D, ldt): K transposed, columns in residue order
  std::vector<T> kgt;  // (BH, D, Gk): global keys transposed
  std::vector<T> vg;   // (BH, Gk, D): global values
};

// One thread's tiles and the running softmax state of kBlockQ query rows.
template <typename T>
struct ForwardScratch {
  explicit ForwardScratch(int64_t D, int64_t max_global)
      : s(kBlockQ * kLdS), p(kBlockQ * kLdS), acc(kBlockQ * D), q(kBlockQ * D),
        row_max(kBlockQ), row_sum(kBlockQ), keep(std::max<int64_t>(max_global, 1)) {}
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

// Online-softmax update of M rows with the (already masked) raw scores in s (M x N):
// scales them, rescales the accumulator, and returns the probabilities as gemm operand.
template <typename T>
const T* softmax_update(ForwardScratch<T>& w, int64_t M, int64_t N, int64_t D) {
  for (int64_t m = 0; m < M; ++m) {
    float* row = w.s.data() + m * kLdS;
    const float mx = row_max(row, N);
    const float m_new = std::max(w.row_max[m], mx);
    if (m_new == -kInf) {  // nothing allowed yet: probabilities are zero
      exp_shifted(row, N, kInf);
      continue;
    }
    const float alpha = std::exp(w.row_max[m] - m_new);
    w.row_sum[m] = w.row_sum[m] * alpha + exp_shifted(row, N, m_new);
    w.row_max[m] = m_new;
    if (alpha != 1.f) scale_inplace(w.acc.data() + m * D, D, alpha);
  }
  return gemm_operand<T>(w.s.data(), kLdS, M, N, w.p.data());
}

// Raw scores of M query rows against keys given as a (D x N) transposed block, masked later.
// The scale is folded in first so that masking with -inf is sign-safe.
template <typename T>
void scores(ForwardScratch<T>& w, const T* q, int64_t ldq, int64_t M, const T* kt, int64_t ldk,
            int64_t N, int64_t D, float scale) {
  tile_gemm<T>(M, N, D, q, ldq, kt, ldk, w.s.data(), kLdS, false);
  for (int64_t m = 0; m < M; ++m) scale_inplace(w.s.data() + m * kLdS, N, scale);
}

// out rows (ld) = acc / row_sum; lse = row_max + log(row_sum), +inf and zeros for empty rows.
template <typename T>
void finish_rows(const ForwardScratch<T>& w, int64_t M, int64_t D, T* out, int64_t ldo,
                 float* lse, int64_t ld_lse, const int64_t* rows = nullptr) {
  for (int64_t m = 0; m < M; ++m) {
    const int64_t i = rows ? rows[m] : m;
    T* o = out + i * ldo;
    const float l = w.row_sum[m];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(w.acc[m * D + c] * inv);
    lse[i * ld_lse] = l > 0.f ? w.row_max[m] + std::log(l) : kInf;
  }
}

template <typename T>
void forward_impl(const BlockSparseAttentionParams& p) {
  const int64_t B = p.batch, H = p.heads, L = p.seqlen, D = p.head_dim, BH = B * H;
  const BlockSparsePlan plan = make_plan(p);
  const ResidueOrder& order = plan.order;
  const int64_t d = order.d, Gk = plan.max_global_keys, Gq = plan.max_global_queries;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out_mut);

  ForwardHeadBuffers<T> hb;
  const int64_t ldt = order.ld_transposed();
  hb.kt.resize(BH * D * ldt);
  hb.kgt.resize(BH * D * Gk);
  hb.vg.resize(BH * Gk * D);
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      transpose_residue(k + bh * L * D, hb.kt.data() + bh * D * ldt, order, D);
      const int64_t* gk = plan.global_keys.data() + b * Gk;
      gather_rows(k + bh * L * D, gk, plan.num_global_keys[b], D, static_cast<T*>(nullptr),
                  hb.kgt.data() + bh * D * Gk, Gk);
      gather_rows(v + bh * L * D, gk, plan.num_global_keys[b], D, hb.vg.data() + bh * Gk * D,
                  static_cast<T*>(nullptr), 0);
    }
  });

  // Pass 1: every query block: its window, then the global keys outside it.
  const int64_t nblocks = static_cast<int64_t>(plan.blocks.size());
  at::parallel_for(0, BH * nblocks, 1, [&](int64_t begin, int64_t end) {
    ForwardScratch<T> w(D, Gk);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / nblocks, b = bh / H;
      const auto [r, t0] = plan.blocks[item % nblocks];
      const int64_t Lr = order.length(r), off = order.offset(r);
      const int64_t t1 = std::min(Lr, t0 + kBlockQ), M = t1 - t0;
      const T* qb = q + bh * L * D + (r + d * t0) * D;
      const T* kt = hb.kt.data() + bh * D * ldt;
      const T* vh = v + bh * L * D;
      w.reset(M, D);
      const auto [lo, hi] = plan.local_range(r, t0, t1);
      for (int64_t c0 = lo; c0 < hi; c0 += kMaxChunk) {
        const int64_t N = std::min(kMaxChunk, hi - c0);
        scores(w, qb, d * D, M, kt + off + c0, ldt, N, D, p.scale);
        mask_local(w.s.data(), kLdS, M, N, t0, c0, plan.window, plan.classes(b) + off + c0);
        const T* prob = softmax_update(w, M, N, D);
        tile_gemm<T>(M, D, N, prob, kLdS, vh + (r + d * c0) * D, d * D, w.acc.data(), D, true);
      }
      const int64_t G = plan.num_global_keys[b];
      if (G > 0) global_keep_flags(plan, b, r, lo, hi, w.keep.data());
      for (int64_t g0 = 0; g0 < G; g0 += kMaxChunk) {
        const int64_t N = std::min(kMaxChunk, G - g0);
        scores(w, qb, d * D, M, hb.kgt.data() + bh * D * Gk + g0, Gk, N, D, p.scale);
        mask_columns(w.s.data(), kLdS, M, N, w.keep.data() + g0);
        const T* prob = softmax_update(w, M, N, D);
        tile_gemm<T>(M, D, N, prob, kLdS, hb.vg.data() + (bh * Gk + g0) * D, D, w.acc.data(), D, true);
      }
      finish_rows(w, M, D, out + bh * L * D + (r + d * t0) * D, d * D, p.lse + bh * L + r + d * t0, d);
    }
  });

  // Pass 2: global query rows attend to every non-padded key (overwrites their pass-1 rows).
  if (Gq == 0) return;
  const int64_t gblocks = (Gq + kBlockQ - 1) / kBlockQ;
  at::parallel_for(0, BH * gblocks, 1, [&](int64_t begin, int64_t end) {
    ForwardScratch<T> w(D, 0);
    std::vector<uint8_t> keep(std::min(kMaxChunk, L));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / gblocks, b = bh / H;
      const int64_t g0 = (item % gblocks) * kBlockQ;
      const int64_t M = std::min(kBlockQ, plan.num_global_queries[b] - g0);
      if (M <= 0) continue;
      const int64_t* rows = plan.global_queries.data() + b * Gq + g0;
      gather_rows(q + bh * L * D, rows, M, D, w.q.data(), static_cast<T*>(nullptr), 0);
      const T* kt = hb.kt.data() + bh * D * ldt;
      const T* vh = v + bh * L * D;
      w.reset(M, D);
      for (int64_t r = 0; r < std::min(d, L); ++r) {
        const int64_t Lr = order.length(r), off = order.offset(r);
        for (int64_t c0 = 0; c0 < Lr; c0 += kMaxChunk) {
          const int64_t N = std::min(kMaxChunk, Lr - c0);
          const uint8_t* cls = plan.classes(b) + off + c0;
          for (int64_t c = 0; c < N; ++c) keep[c] = cls[c] != kPaddedKey;
          scores(w, w.q.data(), D, M, kt + off + c0, ldt, N, D, p.scale);
          mask_columns(w.s.data(), kLdS, M, N, keep.data());
          const T* prob = softmax_update(w, M, N, D);
          tile_gemm<T>(M, D, N, prob, kLdS, vh + (r + d * c0) * D, d * D, w.acc.data(), D, true);
        }
      }
      finish_rows(w, M, D, out + bh * L * D, D, p.lse + bh * L, 1, rows);
    }
  });
}

}  // namespace

void block_sparse_attention_fwd_cpu(const BlockSparseAttentionParams& params, c10::ScalarType dtype) {
  if (dtype == c10::ScalarType::Float) {
    forward_impl<float>(params);
  } else {
    forward_impl<c10::BFloat16>(params);
  }
}

}  // namespace moediffuseq::cpu
