// Tiles of block-sparse attention on the GPU and their movement, shared by the forward and
// backward kernels: row descriptors (which sequence positions the 64 rows of a tile hold),
// asynchronous global -> shared copies of (64, D) tiles with zero fill, shared -> global row
// stores, and the CTAs of the dense parts. Torch-free: included by the .cu files only.
//
// A band tile is 64 consecutive slots of one residue subsequence
// (attention/block_sparse_attention_residues.h). The allowed pairs are split into three
// disjoint parts, each computed once:
//   band     query i not global, key j not global and not padded, same residue, band_pair(t_i - t_j)
//   g-keys   any query i, key j global and not padded (causal: j <= i)
//   g-rows   query i global, key j not global and not padded (causal: j <= i)
// The forward visits, for a band query tile, the band key tiles of band_keys() and then the
// tiles of the compact list of global keys; a tile of global query rows visits every key tile
// (g-keys and g-rows together; causal: up to its last row). The backward runs per key tile: a
// band key tile visits the band query tiles of band_queries() and the tiles of the global-query
// list; a tile of the global-key list visits every query tile (causal: from its first key on).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/cuda/block_sparse_attention_cuda.h"
#include "attention/block_sparse_attention_residues.h"

namespace moediffuseq::cuda {

// The rows of one tile: either strided (position = residue + dilation * slot for the slots
// [first, end)) or gathered (position = list[first + k] for first + k < end).
struct TileRows {
  const int* list = nullptr;  // gathered when set
  int residue = 0;
  int dilation = 1;
  int first = 0;
  int end = 0;

  __device__ __forceinline__ int position(int k) const {
    const int s = first + k;
    if (s >= end) return -1;
    return list ? list[s] : residue + dilation * s;
  }
  __device__ __forceinline__ int slot(int k) const { return first + k; }
};

__device__ __forceinline__ TileRows strided_rows(int residue, int dilation, int first, int end) {
  TileRows t;
  t.residue = residue;
  t.dilation = dilation;
  t.first = first;
  t.end = end;
  return t;
}

__device__ __forceinline__ TileRows gathered_rows(const int* list, int first, int end) {
  TileRows t;
  t.list = list;
  t.first = first;
  t.end = end;
  return t;
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// smem (64 rows, leading dimension kLd) <- rows pos[k] of x (L rows of D, `ld` elements apart);
// rows with pos < 0 are zero. x and ld keep every row 16-byte aligned (the host entry ensures it).
template <int D, int kLd, int kThreads, typename Elem>
__device__ __forceinline__ void load_tile_async(Elem* smem, const Elem* x, int64_t ld, const int* pos, int tid) {
  constexpr int kChunks = D * int(sizeof(Elem)) / 16;  // 16-byte pieces per row
  constexpr int kPerRow = 16 / int(sizeof(Elem));
#pragma unroll
  for (int idx = tid; idx < kBsaTile * kChunks; idx += kThreads) {
    const int row = idx / kChunks, chunk = idx % kChunks;
    const int p = pos[row];
    const Elem* src = x + static_cast<int64_t>(p < 0 ? 0 : p) * ld + chunk * kPerRow;
    cp_async_16(smem + row * kLd + chunk * kPerRow, src, p >= 0);
  }
}

// Rows pos[k] of y (L rows of D, `ld` elements apart) <- smem rows k, for the rows with write[k] set.
template <int D, int kLd, int kThreads, typename Elem>
__device__ __forceinline__ void store_tile(Elem* y, int64_t ld, const Elem* smem, const int* pos, const bool* write,
                                           int tid) {
  constexpr int kChunks = D * int(sizeof(Elem)) / 16;
  constexpr int kPerRow = 16 / int(sizeof(Elem));
#pragma unroll
  for (int idx = tid; idx < kBsaTile * kChunks; idx += kThreads) {
    const int row = idx / kChunks, chunk = idx % kChunks;
    if (!write[row]) continue;
    *reinterpret_cast<uint4*>(y + static_cast<int64_t>(pos[row]) * ld + chunk * kPerRow) =
        *reinterpret_cast<const uint4*>(smem + row * kLd + chunk * kPerRow);
  }
}

// A band tile: the 64 slots [first, first + 64) of residue `residue` (a subsequence of `len`
// slots), and the slots [lo, hi) of the other side that it visits: the keys of a query tile
// (forward, band_keys) or the queries of a key tile (backward, band_queries).
struct BandTile {
  int residue = 0, first = 0, len = 0, lo = 0, hi = 0;
};

MOEDIFFUSEQ_HOST_DEVICE BandTile band_tile(int64_t x, int64_t L, int64_t d, int64_t w, bool causal,
                                           bool queries_of_keys) {
  const ResidueSubsequences seq{L, d};
  int64_t r, first, lo, hi;
  seq.decode(x, kBsaTile, r, first);
  const int64_t len = seq.length(r), end = first + kBsaTile < len ? first + kBsaTile : len;
  if (queries_of_keys) {
    band_queries(len, first, end, w, causal, lo, hi);
  } else {
    band_keys(len, first, end, w, causal, lo, hi);
  }
  BandTile t;
  t.residue = static_cast<int>(r);
  t.first = static_cast<int>(first);
  t.len = static_cast<int>(len);
  t.lo = static_cast<int>(lo);
  t.hi = static_cast<int>(hi);
  return t;
}

// Tiles of 64 rows that n rows take.
MOEDIFFUSEQ_HOST_DEVICE int tiles_of(int64_t n) { return static_cast<int>(ResidueSubsequences::blocks_of(n, kBsaTile)); }

// Per-position flags of batch b (masks may be null).
struct PositionFlags {
  const bool* global = nullptr;  // (L) of batch b
  const bool* padded = nullptr;  // (L) of batch b
  __device__ __forceinline__ bool is_global(int p) const { return global && global[p]; }
  __device__ __forceinline__ bool is_padded(int p) const { return padded && padded[p]; }
};

__device__ __forceinline__ PositionFlags position_flags(const BlockSparseAttentionParams& p, int b) {
  PositionFlags flags;
  flags.global = p.global_mask ? p.global_mask + static_cast<int64_t>(b) * p.seqlen : nullptr;
  flags.padded = p.key_padding_mask ? p.key_padding_mask + static_cast<int64_t>(b) * p.seqlen : nullptr;
  return flags;
}

// The compact list of batch b's global query rows (keys = false) or global, not padded keys
// (keys = true): positions ascending, and their count (0 without a global mask).
struct GlobalList {
  const int* positions = nullptr;
  int count = 0;
};

__device__ __forceinline__ GlobalList global_list(const BlockSparseAttentionParams& p, const BsaWorkspace& ws, int b,
                                                  bool keys) {
  GlobalList list;
  if (p.global_mask == nullptr) return list;
  list.positions = (keys ? ws.global_keys : ws.global_queries) + static_cast<int64_t>(b) * p.seqlen;
  list.count = ws.num_global[keys ? p.batch + b : b];
  return list;
}

// The dense parts: the CTAs past the band tiles take the tiles of a compact list (global rows
// in the forward, global keys in the backward) against every tile of the other side. The
// first kBsaSplitTiles tiles of the list run as num_splits CTAs each (split = which part of the
// other side's tiles), the others as one CTA each.
struct DenseTile {
  int tile = 0;     // tile of the compact list: rows [64 tile, 64 tile + 64)
  int split = 0;    // part of the other side's tiles
  bool partial = false;
  int first = 0;    // other side's tiles [first, end)
  int end = 0;
};

MOEDIFFUSEQ_HOST_DEVICE DenseTile dense_tile(int x, int seqlen, int num_splits) {
  const int total = tiles_of(seqlen);
  const int split_tiles = num_splits > 1 ? (total < kBsaSplitTiles ? total : kBsaSplitTiles) : 0;
  DenseTile t;
  if (x < split_tiles * num_splits) {
    t.tile = x / num_splits;
    t.split = x % num_splits;
    t.partial = true;
    const int chunk = (total + num_splits - 1) / num_splits;
    t.first = t.split * chunk < total ? t.split * chunk : total;
    t.end = t.first + chunk < total ? t.first + chunk : total;
  } else {
    t.tile = split_tiles + (x - split_tiles * num_splits);
    t.first = 0;
    t.end = total;
  }
  return t;
}

// Causal: the tiles of the other side that a dense tile needs. Its rows (forward: global
// queries up to position last_query) see key tiles [0, last_query / 64]; its keys (backward:
// global keys from position first_key on) are seen by query tiles [first_key / 64, total).
MOEDIFFUSEQ_HOST_DEVICE void causal_key_tiles(DenseTile& t, int last_query) {
  const int end = last_query / kBsaTile + 1;
  if (t.end > end) t.end = end > t.first ? end : t.first;
}
MOEDIFFUSEQ_HOST_DEVICE void causal_query_tiles(DenseTile& t, int first_key) {
  const int first = first_key / kBsaTile;
  if (t.first < first) t.first = first < t.end ? first : t.end;
}

// CTAs past the band tiles: one per dense tile that is not split, num_splits per split one.
inline int64_t dense_ctas(int64_t seqlen, int num_splits) {
  const int64_t total = ResidueSubsequences::blocks_of(seqlen, kBsaTile);
  const int64_t split_tiles = num_splits > 1 ? (total < kBsaSplitTiles ? total : kBsaSplitTiles) : 0;
  return split_tiles * num_splits + (total - split_tiles);
}

// Launches a forward or backward kernel over grid (band tiles + dense CTAs, heads, B), with
// `smem` bytes of dynamic shared memory; the kernel takes (params, workspace, band tiles).
template <typename Kernel>
cudaError_t launch_tiles(Kernel kernel, int threads, int smem, int64_t heads, const BlockSparseAttentionParams& p,
                         const BsaWorkspace& ws, cudaStream_t stream) {
  const int64_t band_tiles = ResidueSubsequences{p.seqlen, p.dilation}.num_blocks(kBsaTile);
  const int64_t global_ctas = p.global_mask ? dense_ctas(p.seqlen, ws.num_splits) : 0;
  const dim3 grid(static_cast<unsigned>(band_tiles + global_ctas), static_cast<unsigned>(heads),
                  static_cast<unsigned>(p.batch));
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(p, ws, static_cast<int>(band_tiles));
  return cudaGetLastError();
}

}  // namespace moediffuseq::cuda
