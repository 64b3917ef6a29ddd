// Backward kernel of block-sparse attention (flash-attention-2 style, CuTe, SM80 tensor-core
// atoms that Hopper runs). One CTA of 8 warps per (key tile, key/value head, batch) accumulates
// dK and dV of its 64 keys in registers over the query tiles that see them (the transposed lists
// of attention/cuda/block_sparse_attention_tile_io.cuh), for each query head of its group
// (grouped-query attention: no atomics on dK, dV), and adds dQ = scale dS K to a float32 buffer
// with atomics. Probabilities are rebuilt from the saved (natural-log) log-sum-exp with the
// forward's own roundings (see the P = exp(...) step); delta = rowsum(dO * O) comes from a
// preprocessing kernel. Query rows at an offset: the tiles hold key positions; q, grad_out,
// lse, delta and dQ are read and written at row position - query_offset.
#pragma once

#include <cute/tensor.hpp>

#include <cmath>

#include "attention/block_sparse_attention_params.h"
#include "attention/cuda/block_sparse_attention_cuda.h"
#include "attention/cuda/block_sparse_attention_mma.cuh"
#include "attention/cuda/block_sparse_attention_tile_io.cuh"
#include "attention/block_sparse_attention_residues.h"

namespace moediffuseq::cuda {

template <typename Elem, int D>
struct BwdKernel {
  static constexpr int kThreads = 256;  // 8 warps: 4 along the 64 rows, 2 along the columns
  using Tiles = SmemTiles<D>;           // (64, D) tiles of q, k, v, grad_out
  using PTiles = SmemTiles<kBsaTile>;   // (64 queries, 64 keys) tiles of P and dS
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<MmaAtomFor<Elem>>, cute::Layout<cute::Shape<cute::_4, cute::_2, cute::_1>>,
                                  cute::Tile<cute::_64, cute::_32, cute::_16>>;
  static_assert(kBsaTile == 64, "the warp layout covers 64 rows");

  struct alignas(16) Shared {
    Elem k[Tiles::kElems];
    Elem v[Tiles::kElems];
    Elem q[Tiles::kElems];     // also the staging tile of dK
    Elem dout[Tiles::kElems];  // also the staging tile of dV
    Elem p[PTiles::kElems];
    Elem ds[PTiles::kElems];
    float lse[kBsaTile];  // of the query rows, natural log as saved; +inf drops a row
    float delta[kBsaTile];
    int kpos[kBsaTile];
    int qrow[kBsaTile];    // rows of q, grad_out, lse, delta and dQ (-1: none)
    int qlimit[kBsaTile];  // the last key position each row may see (bsa_key_limit)
    bool kkeep[kBsaTile];
    bool kwrite[kBsaTile];
    bool qkeep[kBsaTile];
  };
};

// p.window and p.dilation are at most p.seqlen (clamped by the launcher).
// grid = (band key tiles + dense CTAs, H_kv, B); blockIdx.x < num_band_tiles is a band key tile, else (part of) a tile of global keys,
// whose gradients are added to ws.split_grad_{k,v} when it is split.
template <typename Elem, int D>
__global__ void __launch_bounds__(BwdKernel<Elem, D>::kThreads)
    block_sparse_attention_bwd_kernel(const BlockSparseAttentionParams p, const BsaWorkspace ws, int num_band_tiles) {
  using namespace cute;
  using K = BwdKernel<Elem, D>;
  using Tiles = typename K::Tiles;
  using PTiles = typename K::PTiles;
  constexpr int kThreads = K::kThreads;
  constexpr int kLd = Tiles::kLd;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& ss = *reinterpret_cast<typename K::Shared*>(smem_raw);

  const int tid = threadIdx.x;
  const int b = blockIdx.z, hk = blockIdx.y;
  const int L = static_cast<int>(p.seqlen), d = static_cast<int>(p.dilation), w = static_cast<int>(p.window);
  const int Lq = static_cast<int>(p.q_len), offset = static_cast<int>(p.query_offset);
  const bool causal = p.causal;
  const int S = source_length(p, b);
  const int group = static_cast<int>(p.heads / p.kv_heads);  // query heads hk * group .. per key/value head
  const int64_t bhk = static_cast<int64_t>(b) * p.kv_heads + hk;
  const Elem* k = static_cast<const Elem*>(p.k) + p.k_strides.at(b, hk, 0);
  const Elem* v = static_cast<const Elem*>(p.v) + p.v_strides.at(b, hk, 0);
  Elem* dk = static_cast<Elem*>(p.grad_k) + p.grad_k_strides.at(b, hk, 0);
  Elem* dv = static_cast<Elem*>(p.grad_v) + p.grad_v_strides.at(b, hk, 0);
  const PositionFlags flags = position_flags(p, b);
  const GlobalList global_rows = global_list(p, ws, b, /*keys=*/false);

  // The keys of this CTA and the query tiles that see them: first n_first band query tiles
  // (or, for global keys, every query tile of the L_q rows), then n_second tiles of the
  // global-row list from entry g_first on; all of them from the first query that may see the
  // first key (first_query_seeing).
  const bool band = static_cast<int>(blockIdx.x) < num_band_tiles;
  TileRows krows;
  DenseTile dense;
  int residue = 0, c0 = 0, lo = 0, hi = 0, n_first, n_second, g_first = 0;
  if (band) {
    const BandTile tile = band_key_tile(blockIdx.x, p, S);
    residue = tile.residue;
    c0 = tile.first;
    lo = tile.lo;
    hi = tile.hi;
    krows = strided_rows(residue, d, c0, tile.len);
    g_first = count_below(global_rows.positions, global_rows.count, first_query_seeing(residue + d * c0, S, causal));
    n_first = tiles_of(hi - lo);
    n_second = tiles_of(global_rows.count - g_first);
  } else {
    dense = dense_tile(static_cast<int>(blockIdx.x) - num_band_tiles, L, Lq, ws.num_splits);
    const int g0 = dense.tile * kBsaTile;
    const GlobalList keys = global_list(p, ws, b, /*keys=*/true);
    if (g0 >= keys.count) return;  // the whole CTA: fewer global keys than launched tiles
    krows = gathered_rows(keys.positions, g0, keys.count);
    causal_query_tiles(dense, dense_first_row(first_query_seeing(keys.positions[g0], S, causal), offset, Lq));
    n_first = dense.end - dense.first;
    n_second = 0;
  }

  bool key_dropped = false, target_key = false;
  if (tid < kBsaTile) {
    const int pos = krows.position(tid);
    const bool valid = pos >= 0;
    // A band tile leaves its global keys to the global-key tiles, which write their gradients.
    const bool global_key = valid && flags.is_global(pos) && !flags.is_padded(pos);
    ss.kpos[tid] = pos;
    ss.kkeep[tid] = valid && (band ? !flags.is_padded(pos) && !flags.is_global(pos) : true);
    ss.kwrite[tid] = valid && (!band || !global_key);
    key_dropped = !ss.kkeep[tid];
    target_key = valid && pos >= S;
  }
  const bool any_key_dropped = __syncthreads_or(key_dropped);
  const bool any_target_key = __syncthreads_or(target_key);
  load_tile_async<D, kLd, kThreads>(ss.k, k, p.k_strides.row, ss.kpos, tid);
  load_tile_async<D, kLd, kThreads>(ss.v, v, p.v_strides.row, ss.kpos, tid);
  cp_async_commit();

  typename K::TiledMma mma;
  auto thr = mma.get_slice(tid);
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Tiles::Rows{});       // (keys, D)
  Tensor sKt = make_tensor(make_smem_ptr(ss.k), typename Tiles::Cols_{});     // (D, keys)
  Tensor sV = make_tensor(make_smem_ptr(ss.v), typename Tiles::Rows{});       // (keys, D)
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Tiles::Rows{});       // (queries, D)
  Tensor sQt = make_tensor(make_smem_ptr(ss.q), typename Tiles::Cols_{});     // (D, queries)
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout), typename Tiles::Rows{});   // (queries, D)
  Tensor sdOt = make_tensor(make_smem_ptr(ss.dout), typename Tiles::Cols_{}); // (D, queries)
  Tensor sP = make_tensor(make_smem_ptr(ss.p), typename PTiles::Rows{});      // (queries, keys)
  Tensor sPt = make_tensor(make_smem_ptr(ss.p), typename PTiles::Cols_{});    // (keys, queries)
  Tensor sdS = make_tensor(make_smem_ptr(ss.ds), typename PTiles::Rows{});    // (queries, keys)
  Tensor sdSt = make_tensor(make_smem_ptr(ss.ds), typename PTiles::Cols_{});  // (keys, queries)

  // Operand copies: ldmatrix for K-major operands, transposing ldmatrix for the others.
  auto copy_a = make_tiled_copy_A(LdsmN<Elem>{}, mma);
  auto copy_b = make_tiled_copy_B(LdsmN<Elem>{}, mma);
  auto copy_at = make_tiled_copy_A(LdsmT<Elem>{}, mma);
  auto copy_bt = make_tiled_copy_B(LdsmT<Elem>{}, mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto thr_b = copy_b.get_thread_slice(tid);
  auto thr_at = copy_at.get_thread_slice(tid);
  auto thr_bt = copy_bt.get_thread_slice(tid);

  // acc += A B^T over the K mode, operands loaded k-block by k-block from shared memory.
  auto product = [&](auto& copy_atom_a, auto& thr_copy_a, auto const& sA, auto& copy_atom_b, auto& thr_copy_b,
                     auto const& sB, auto& acc) {
    Tensor rA = thr.partition_fragment_A(sA);
    Tensor rB = thr.partition_fragment_B(sB);
    Tensor sA_part = thr_copy_a.partition_S(sA);
    Tensor sB_part = thr_copy_b.partition_S(sB);
    Tensor rA_view = thr_copy_a.retile_D(rA);
    Tensor rB_view = thr_copy_b.retile_D(rB);
    CUTE_UNROLL
    for (int kk = 0; kk < size<2>(rA); ++kk) {
      copy(copy_atom_a, sA_part(_, _, kk), rA_view(_, _, kk));
      copy(copy_atom_b, sB_part(_, _, kk), rB_view(_, _, kk));
      gemm(mma, rA(_, _, kk), rB(_, _, kk), acc);
    }
  };

  Tensor acc_dk = partition_fragment_C(mma, Shape<Int<kBsaTile>, Int<D>>{});
  Tensor acc_dv = partition_fragment_C(mma, Shape<Int<kBsaTile>, Int<D>>{});
  clear(acc_dk);
  clear(acc_dv);
  Tensor cS = thr.partition_C(make_identity_tensor(Shape<Int<kBsaTile>, Int<kBsaTile>>{}));  // (query, key)
  Tensor cQ = thr.partition_C(make_identity_tensor(Shape<Int<kBsaTile>, Int<D>>{}));         // (query, D)
  Tensor tSsP = thr.partition_C(sP);
  Tensor tSsdS = thr.partition_C(sdS);
  const float scale_log2 = p.scale * kLog2e;

  // Every query head of the group, each over the same query tiles.
  const int n_tiles = n_first + n_second;
  for (int step = 0; step < group * n_tiles; ++step) {
    const int h = hk * group + step / n_tiles, j = step % n_tiles;
    const int64_t bh = static_cast<int64_t>(b) * p.heads + h;
    const Elem* q = static_cast<const Elem*>(p.q) + p.q_strides.at(b, h, 0);
    const Elem* dout = static_cast<const Elem*>(p.grad_out) + p.grad_out_strides.at(b, h, 0);
    float* dq_accum = ws.grad_q_accum + bh * Lq * D;
    const float* lse = p.lse + bh * Lq;
    const float* delta = ws.delta + bh * Lq;
    TileRows qrows;
    bool geometry = false;
    int t0 = 0;
    if (j < n_first) {
      if (band) {
        t0 = lo + j * kBsaTile;
        qrows = strided_rows(residue, d, t0, hi);
        geometry = true;
      } else {
        qrows = strided_rows(offset, 1, (dense.first + j) * kBsaTile, Lq);  // rows offset + s
      }
    } else {
      qrows = gathered_rows(global_rows.positions, g_first + (j - n_first) * kBsaTile, global_rows.count);
    }
    __syncthreads();  // the previous query tile is no longer read
    bool source_row = false;
    if (tid < kBsaTile) {
      const int pos = qrows.position(tid);
      // Global rows of a band tile are taken by the global-row tiles.
      const bool keep = pos >= 0 && !(geometry && flags.is_global(pos));
      const int row = pos >= 0 ? pos - offset : -1;
      ss.qrow[tid] = row;
      ss.qlimit[tid] = pos >= 0 ? static_cast<int>(bsa_key_limit(pos, S, L, causal)) : -1;
      ss.qkeep[tid] = keep;
      ss.lse[tid] = keep ? lse[row] : INFINITY;  // +inf: probabilities 0
      ss.delta[tid] = keep ? delta[row] : 0.f;
      source_row = keep && pos < S;
    }
    // a source row and a target key: pairs past a row's key limit are masked
    const bool crosses = __syncthreads_or(source_row) && any_target_key;
    // Causal pairs of band tiles are part of their geometry; other tiles, and tiles across the
    // source end, compare key positions with each row's key limit.
    const bool by_position = (causal && !geometry) || crosses;
    const bool need_mask =
        any_key_dropped || by_position || (geometry && !band_block_full(t0, c0, kBsaTile, w, causal));
    load_tile_async<D, kLd, kThreads>(ss.q, q, p.q_strides.row, ss.qrow, tid);
    load_tile_async<D, kLd, kThreads>(ss.dout, dout, p.grad_out_strides.row, ss.qrow, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // S = Q K^T and dP = dO V^T, (queries, keys).
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBsaTile>, Int<kBsaTile>>{});
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBsaTile>, Int<kBsaTile>>{});
    clear(acc_s);
    clear(acc_dp);
    product(copy_a, thr_a, sQ, copy_b, thr_b, sK, acc_s);
    product(copy_a, thr_a, sdO, copy_b, thr_b, sV, acc_dp);
    // P = exp(scale S - lse), dS = P (dP - delta); both to shared memory.
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) {
      const int row = get<0>(cS(i)), col = get<1>(cS(i));
      bool ok = true;
      if (need_mask) {
        ok = ss.kkeep[col];
        if (geometry) ok = ok && band_pair((t0 + row) - (c0 + col), w, causal);
        if (by_position) ok = ok && ss.kpos[col] <= ss.qlimit[row];
      }
      // The forward rounds the score to log2 units (s2 = S * scale_log2) and saves
      // lse = fl(fl(max s2 * ln2) + log(sum)). Replaying those roundings (the same MMA gives the
      // same S bit for bit; __f*_rn are never fused) makes s2 * ln2 - lse exact for the row's
      // maximum, so its probability survives a huge scale, where the ulp of the score dwarfs
      // log(sum) and a log2 <-> ln round trip of lse is off by ulps of the score. <= 0 in exact
      // arithmetic; clamped so that rounding cannot overflow.
      const float s_ln = __fmul_rn(__fmul_rn(acc_s(i), scale_log2), kLn2);
      const float prob = ok ? exp2f(__fmul_rn(fminf(__fsub_rn(s_ln, ss.lse[row]), 0.f), kLog2e)) : 0.f;
      tSsP(i) = static_cast<Elem>(prob);
      tSsdS(i) = static_cast<Elem>(prob * (acc_dp(i) - ss.delta[row]));
    }
    __syncthreads();

    // dV += P^T dO and dK += dS^T Q, (keys, D).
    product(copy_at, thr_at, sPt, copy_bt, thr_bt, sdOt, acc_dv);
    product(copy_at, thr_at, sdSt, copy_bt, thr_bt, sQt, acc_dk);
    // dQ += scale dS K, (queries, D), into the float32 buffer.
    Tensor acc_dq = partition_fragment_C(mma, Shape<Int<kBsaTile>, Int<D>>{});
    clear(acc_dq);
    product(copy_a, thr_a, sdS, copy_bt, thr_bt, sKt, acc_dq);
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dq); ++i) {
      const int row = get<0>(cQ(i)), col = get<1>(cQ(i));
      if (ss.qkeep[row]) atomicAdd(dq_accum + static_cast<int64_t>(ss.qrow[row]) * D + col, acc_dq(i) * p.scale);
    }
  }

  // With no query tile (a causal split of global keys whose query range is empty) the K and V
  // copies are still in flight: wait for them before the CTA can exit or reuse shared memory.
  cp_async_wait<0>();

  if (dense.partial) {
    // Part of the query tiles: add to the float32 sums that block_sparse_attention_finish_keys_kernel writes out.
    const int64_t slot = (bhk * kBsaSplitTiles + dense.tile) * kBsaTile;
    float* part_dk = ws.split_grad_k + slot * D;
    float* part_dv = ws.split_grad_v + slot * D;
    Tensor cK = thr.partition_C(make_identity_tensor(Shape<Int<kBsaTile>, Int<D>>{}));  // (key, D)
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dk); ++i) {
      const int row = get<0>(cK(i)), col = get<1>(cK(i));
      atomicAdd(part_dk + row * D + col, acc_dk(i) * p.scale);
      atomicAdd(part_dv + row * D + col, acc_dv(i));
    }
    return;
  }

  // dK = scale dS^T Q; both tiles through shared memory to the key rows this CTA owns.
  __syncthreads();
  Tensor tKsK = thr.partition_C(sQ);
  Tensor tVsV = thr.partition_C(sdO);
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dk); ++i) {
    tKsK(i) = static_cast<Elem>(acc_dk(i) * p.scale);
    tVsV(i) = static_cast<Elem>(acc_dv(i));
  }
  __syncthreads();
  store_tile<D, kLd, kThreads>(dk, p.grad_k_strides.row, ss.q, ss.kpos, ss.kwrite, tid);
  store_tile<D, kLd, kThreads>(dv, p.grad_v_strides.row, ss.dout, ss.kpos, ss.kwrite, tid);
}

template <typename Elem, int D>
cudaError_t run_block_sparse_attention_bwd(const BlockSparseAttentionParams& p, const BsaWorkspace& ws,
                                           cudaStream_t stream) {
  using K = BwdKernel<Elem, D>;
  // one CTA per key/value head: it sums dK and dV over the query heads of its group
  return launch_tiles(block_sparse_attention_bwd_kernel<Elem, D>, K::kThreads, sizeof(typename K::Shared), p.kv_heads,
                      p, ws, /*backward=*/true, stream);
}

}  // namespace moediffuseq::cuda
