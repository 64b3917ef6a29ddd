// Forward kernel of block-sparse attention (flash-attention-2 style, CuTe, SM80 tensor-core
// atoms that Hopper runs). One CTA of 4 warps per (query tile, head, batch): each warp owns 16
// query rows, keeps Q in registers, and runs an online softmax over the key tiles that the
// tile decomposition of attention/cuda/block_sparse_attention_tile_io.cuh assigns to its query
// tile. Element masks are applied only to key tiles that need them (partial, padded, global,
// off-band or, under causal or across the source end, pairs past a row's key limit); full band
// tiles skip them. Grouped-query heads read the key/value head h / (H / H_kv); every tensor is
// addressed through its strides. Query rows at an offset: the tiles hold key positions, q, out
// and lse are read and written at row position - query_offset.
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
struct FwdKernel {
  static constexpr int kThreads = 128;  // 4 warps x 16 query rows
  using Tiles = SmemTiles<D>;
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<MmaAtomFor<Elem>>, cute::Layout<cute::Shape<cute::_4, cute::_1, cute::_1>>,
                                  cute::Tile<cute::_64, cute::_16, cute::_16>>;
  static_assert(kBsaTile == 64, "the warp layout covers 64 query rows");

  struct alignas(16) Shared {
    Elem q[Tiles::kElems];  // also the staging tile of the output
    Elem k[Tiles::kElems];
    Elem v[Tiles::kElems];
    int qpos[kBsaTile];    // key positions of the query rows
    int qrow[kBsaTile];    // their rows of q, out and lse (-1: none)
    int qlimit[kBsaTile];  // the last key position each row may see (bsa_key_limit)
    int kpos[kBsaTile];
    bool qwrite[kBsaTile];
    bool kkeep[kBsaTile];
  };
};

// p.window and p.dilation are at most p.seqlen here (clamped by the launcher).
// grid = (band tiles + dense CTAs, H, B); blockIdx.x < num_band_tiles is a band query tile (of the L_q query rows), else
// (part of) a tile of global rows, whose partial results go to ws.split_out when it is split.
template <typename Elem, int D>
__global__ void __launch_bounds__(FwdKernel<Elem, D>::kThreads)
    block_sparse_attention_fwd_kernel(const BlockSparseAttentionParams p, const BsaWorkspace ws, int num_band_tiles) {
  using namespace cute;
  using K = FwdKernel<Elem, D>;
  using Tiles = typename K::Tiles;
  constexpr int kThreads = K::kThreads;
  constexpr int kLd = Tiles::kLd;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& ss = *reinterpret_cast<typename K::Shared*>(smem_raw);

  const int tid = threadIdx.x;
  const int b = blockIdx.z, h = blockIdx.y;
  const int L = static_cast<int>(p.seqlen), d = static_cast<int>(p.dilation), w = static_cast<int>(p.window);
  const int Lq = static_cast<int>(p.q_len), offset = static_cast<int>(p.query_offset);
  const bool causal = p.causal;
  const int S = source_length(p, b);
  const int64_t bh = static_cast<int64_t>(b) * p.heads + h;
  const int hk = h / static_cast<int>(p.heads / p.kv_heads);  // grouped-query: the key/value head
  const Elem* q = static_cast<const Elem*>(p.q) + p.q_strides.at(b, h, 0);
  const Elem* k = static_cast<const Elem*>(p.k) + p.k_strides.at(b, hk, 0);
  const Elem* v = static_cast<const Elem*>(p.v) + p.v_strides.at(b, hk, 0);
  Elem* out = static_cast<Elem*>(p.out_mut) + p.out_strides.at(b, h, 0);
  float* lse = p.lse + bh * Lq;
  const PositionFlags flags = position_flags(p, b);
  const GlobalList global_keys = global_list(p, ws, b, /*keys=*/true);

  // The query rows and the key tiles they visit: first n_first band tiles (or, for global
  // rows, every key tile), then n_second tiles of the global-key list; all of them up to the
  // key limit of the last row (key_end: dense key tiles, key_count: global keys).
  const bool band = static_cast<int>(blockIdx.x) < num_band_tiles;
  TileRows qrows;
  DenseTile dense;
  int residue = 0, t0 = 0, lo = 0, hi = 0, n_first, n_second, key_end = L, key_count = 0;
  if (band) {
    const BandTile tile = band_query_tile(blockIdx.x, p, S);
    residue = tile.residue;
    t0 = tile.first;
    lo = tile.lo;
    hi = tile.hi;
    qrows = strided_rows(residue, d, t0, tile.len);
    const int last = residue + d * ((t0 + kBsaTile < tile.len ? t0 + kBsaTile : tile.len) - 1);
    key_count = count_below(global_keys.positions, global_keys.count,
                            static_cast<int64_t>(bsa_key_limit(last, S, L, causal)) + 1);
    n_first = tiles_of(hi - lo);
    n_second = tiles_of(key_count);
  } else {
    dense = dense_tile(static_cast<int>(blockIdx.x) - num_band_tiles, Lq, L, ws.num_splits);
    const int g0 = dense.tile * kBsaTile;
    const GlobalList rows = global_list(p, ws, b, /*keys=*/false);
    if (g0 >= rows.count) return;  // the whole CTA: fewer global rows than launched tiles
    qrows = gathered_rows(rows.positions, g0, rows.count);
    const int last = rows.positions[(g0 + kBsaTile < rows.count ? g0 + kBsaTile : rows.count) - 1];
    key_end = static_cast<int>(bsa_key_limit(last, S, L, causal)) + 1;
    causal_key_tiles(dense, key_end - 1);
    n_first = dense.end - dense.first;
    n_second = 0;
  }

  if (tid < kBsaTile) {
    const int pos = qrows.position(tid);
    ss.qpos[tid] = pos;
    ss.qrow[tid] = pos >= 0 ? pos - offset : -1;
    ss.qlimit[tid] = pos >= 0 ? static_cast<int>(bsa_key_limit(pos, S, L, causal)) : -1;
    // Global rows of a band tile are computed but written by their own (dense) tile.
    ss.qwrite[tid] = pos >= 0 && (!band || !flags.is_global(pos));
  }
  __syncthreads();
  const int first_query = ss.qpos[0];  // rows ascend; the first one exists
  load_tile_async<D, kLd, kThreads>(ss.q, q, p.q_strides.row, ss.qrow, tid);
  cp_async_commit();

  typename K::TiledMma mma;
  auto thr = mma.get_slice(tid);
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Tiles::Rows{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Tiles::Rows{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v), typename Tiles::Cols_{});  // (D, keys)

  Tensor tSrQ = thr.partition_fragment_A(sQ);    // (MMA, 1, D / 16)
  Tensor tSrK = thr.partition_fragment_B(sK);    // (MMA, 8, D / 16)
  Tensor tOrVt = thr.partition_fragment_B(sVt);  // (MMA, D / 8, 4)
  auto copy_q = make_tiled_copy_A(LdsmN<Elem>{}, mma);
  auto thr_copy_q = copy_q.get_thread_slice(tid);
  Tensor tSsQ = thr_copy_q.partition_S(sQ);
  Tensor tSrQ_view = thr_copy_q.retile_D(tSrQ);
  auto copy_k = make_tiled_copy_B(LdsmN<Elem>{}, mma);
  auto thr_copy_k = copy_k.get_thread_slice(tid);
  Tensor tSsK = thr_copy_k.partition_S(sK);
  Tensor tSrK_view = thr_copy_k.retile_D(tSrK);
  auto copy_v = make_tiled_copy_B(LdsmT<Elem>{}, mma);
  auto thr_copy_v = copy_v.get_thread_slice(tid);
  Tensor tOsVt = thr_copy_v.partition_S(sVt);
  Tensor tOrVt_view = thr_copy_v.retile_D(tOrVt);

  // Coordinates (row, column) of this thread's accumulator elements, as (rows, columns):
  // each thread holds 2 rows (r and r + 8 of its warp's 16), row index 0 or 1 below.
  Tensor cS = rowcol_view(thr.partition_C(make_identity_tensor(Shape<Int<kBsaTile>, Int<kBsaTile>>{})));
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBsaTile>, Int<D>>{});
  Tensor acc_o_rc = rowcol_view(acc_o);
  clear(acc_o);
  static_assert(decltype(size<1>(acc_o))::value == 1, "one 16-row block per warp");
  static_assert(decltype(size<0>(cS))::value == 2);

  cp_async_wait<0>();
  __syncthreads();
  copy(copy_q, tSsQ, tSrQ_view);

  const float scale_log2 = p.scale * kLog2e;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 units
  float row_sum[2] = {0.f, 0.f};              // this thread's part of the row sums

  for (int j = 0; j < n_first + n_second; ++j) {
    TileRows krows;
    bool geometry = false;
    int c0 = 0;
    if (j < n_first) {
      if (band) {
        c0 = lo + j * kBsaTile;
        krows = strided_rows(residue, d, c0, hi);
        geometry = true;
      } else {
        krows = strided_rows(0, 1, (dense.first + j) * kBsaTile, key_end);
      }
    } else {
      krows = gathered_rows(global_keys.positions, (j - n_first) * kBsaTile, key_count);
    }
    __syncthreads();  // the previous tile's K and V are no longer read
    bool drop = false, target_key = false;
    if (tid < kBsaTile) {
      const int pos = krows.position(tid);
      bool keep = pos >= 0;
      if (keep && j < n_first) {
        // Band tiles leave global keys to the global-key tiles; dense rows take every key.
        keep = !flags.is_padded(pos) && !(band && flags.is_global(pos));
      }
      ss.kpos[tid] = pos;
      ss.kkeep[tid] = keep;
      drop = !keep;
      target_key = pos >= 0 && crosses_source(first_query, pos, S);
    }
    const bool any_dropped = __syncthreads_or(drop);
    const bool crosses = __syncthreads_or(target_key);  // a source row and a target key
    // Causal pairs of band tiles are part of their geometry; other tiles, and tiles across the
    // source end, compare key positions with each row's key limit.
    const bool by_position = (causal && !geometry) || crosses;
    const bool need_mask = any_dropped || by_position || (geometry && !band_block_full(t0, c0, kBsaTile, w, causal));
    load_tile_async<D, kLd, kThreads>(ss.k, k, p.k_strides.row, ss.kpos, tid);
    cp_async_commit();
    load_tile_async<D, kLd, kThreads>(ss.v, v, p.v_strides.row, ss.kpos, tid);
    cp_async_commit();
    cp_async_wait<1>();  // K has landed; V may still be in flight
    __syncthreads();

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBsaTile>, Int<kBsaTile>>{});
    clear(acc_s);
    CUTE_UNROLL
    for (int kk = 0; kk < size<2>(tSrQ); ++kk) {
      copy(copy_k, tSsK(_, _, kk), tSrK_view(_, _, kk));
      gemm(mma, tSrQ(_, _, kk), tSrK(_, _, kk), acc_s);
    }

    // Scale to log2 units, mask, and update the running row maxima.
    Tensor s_rc = rowcol_view(acc_s);
    float tile_max[2] = {-INFINITY, -INFINITY};
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s_rc); ++c) {
        float s = __fmul_rn(s_rc(r, c), scale_log2);  // rounded as the backward replays it
        if (need_mask) {
          const int row = get<0>(cS(r, c)), col = get<1>(cS(r, c));
          bool ok = ss.kkeep[col];
          if (geometry) ok = ok && band_pair((t0 + row) - (c0 + col), w, causal);
          if (by_position) ok = ok && ss.kpos[col] <= ss.qlimit[row];
          s = ok ? s : -INFINITY;
        }
        s_rc(r, c) = s;
        tile_max[r] = fmaxf(tile_max[r], s);
      }
    }
    float shift[2], correction[2];
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float new_max = fmaxf(row_max[r], tile_max[r]);
      shift[r] = new_max == -INFINITY ? 0.f : new_max;  // a row with no key yet stays at zero
      correction[r] = exp2f(row_max[r] - shift[r]);
      row_max[r] = new_max;
      row_sum[r] *= correction[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s_rc); ++c) {
        const float e = exp2f(s_rc(r, c) - shift[r]);
        row_sum[r] += e;
        s_rc(r, c) = e;
      }
      CUTE_UNROLL
      for (int c = 0; c < size<1>(acc_o_rc); ++c) acc_o_rc(r, c) *= correction[r];
    }

    // O += P V with P straight from registers.
    auto rP = convert_fragment<Elem>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), accumulator_as_a(rP.layout()));
    cp_async_wait<0>();
    __syncthreads();
    CUTE_UNROLL
    for (int kk = 0; kk < size<2>(tOrP); ++kk) {
      copy(copy_v, tOsVt(_, _, kk), tOrVt_view(_, _, kk));
      gemm(mma, tOrP(_, _, kk), tOrVt(_, _, kk), acc_o);
    }
  }

  CUTE_UNROLL
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
  if (dense.partial) {
    // Unnormalised rows with their max and sum, for bsa_combine_kernel; staged as float32
    // through the K and V tiles (adjacent in Shared) for coalesced stores.
    static_assert(kBsaTile * D * sizeof(float) <= 2 * Tiles::kElems * sizeof(Elem), "staging tile too large");
    const int64_t slot = ((bh * kBsaSplitTiles + dense.tile) * ws.num_splits + dense.split) * kBsaTile;
    float* stage = reinterpret_cast<float*>(ss.k);
    __syncthreads();  // every warp is past its last read of K and V
    Tensor tOsO = thr.partition_C(make_tensor(make_smem_ptr(stage), Layout<Shape<Int<kBsaTile>, Int<D>>, Stride<Int<D>, _1>>{}));
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); ++i) tOsO(i) = acc_o(i);
    if ((tid & 3) == 0) {
      CUTE_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int row = get<0>(cS(r, 0));
        ws.split_max_sum[(slot + row) * 2] = row_max[r];
        ws.split_max_sum[(slot + row) * 2 + 1] = row_sum[r];
      }
    }
    __syncthreads();
    float4* part_out = reinterpret_cast<float4*>(ws.split_out + slot * D);
    for (int idx = tid; idx < kBsaTile * D / 4; idx += kThreads) part_out[idx] = reinterpret_cast<const float4*>(stage)[idx];
    return;
  }

  // Normalise; rows with no allowed key output zeros and lse = +inf.
  CUTE_UNROLL
  for (int r = 0; r < 2; ++r) {
    const float inv_sum = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(acc_o_rc); ++c) acc_o_rc(r, c) *= inv_sum;
    const int row = get<0>(cS(r, 0));
    if ((tid & 3) == 0 && ss.qwrite[row]) {
      // two roundings, never fused: the backward rebuilds the row maximum's term exactly
      lse[ss.qrow[row]] = row_sum[r] > 0.f ? __fadd_rn(__fmul_rn(row_max[r], kLn2), logf(row_sum[r])) : INFINITY;
    }
  }
  __syncthreads();  // every warp is past its last read of sQ
  Tensor tOsO = thr.partition_C(sQ);
  CUTE_UNROLL
  for (int i = 0; i < size(acc_o); ++i) tOsO(i) = static_cast<Elem>(acc_o(i));
  __syncthreads();
  store_tile<D, kLd, kThreads>(out, p.out_strides.row, ss.q, ss.qrow, ss.qwrite, tid);
}

template <typename Elem, int D>
cudaError_t run_block_sparse_attention_fwd(const BlockSparseAttentionParams& p, const BsaWorkspace& ws,
                                           cudaStream_t stream) {
  using K = FwdKernel<Elem, D>;
  return launch_tiles(block_sparse_attention_fwd_kernel<Elem, D>, K::kThreads, sizeof(typename K::Shared), p.heads, p,
                      ws, /*backward=*/false, stream);
}

}  // namespace moediffuseq::cuda
