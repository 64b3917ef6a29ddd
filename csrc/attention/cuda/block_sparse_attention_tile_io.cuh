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
// Query rows at an offset: the query rows are the positions [offset, offset + L_q); the
// forward's band tiles tile their residue subsequences (band_query_tile), the backward clips
// the query slots of a key tile to them (band_key_tile), and the dense parts take the L_q rows.
// Source isolation (S = the batch's source length, 0 without): every part is clipped to the
// keys up to the last row's key limit (bsa_key_limit) and to the queries that may see its
// first key (first_query_seeing), so a tile of source queries never loads a target key; only
// a pair of tiles with a source query and a target key (crosses_source) masks pair by pair.
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

// Tiles of 64 rows that n rows take (0 for n <= 0).
MOEDIFFUSEQ_HOST_DEVICE int tiles_of(int64_t n) {
  return n > 0 ? static_cast<int>(ResidueSubsequences::blocks_of(n, kBsaTile)) : 0;
}

// The first query position that may see key position j: causal queries start at j, and a
// target key (j >= S) is seen by target queries only.
MOEDIFFUSEQ_HOST_DEVICE int64_t first_query_seeing(int64_t j, int64_t S, bool causal) {
  int64_t first = causal ? j : 0;
  if (j >= S && S > first) first = S;
  return first;
}

// Whether a tile pair holds a source query and a target key (queries from position qmin on,
// keys up to position kmax): then its pairs are masked by each row's key limit.
MOEDIFFUSEQ_HOST_DEVICE bool crosses_source(int64_t qmin, int64_t kmax, int64_t S) { return qmin < S && kmax >= S; }

// Entries of an ascending list below `bound` (a lower bound).
MOEDIFFUSEQ_HOST_DEVICE int count_below(const int* list, int count, int64_t bound) {
  int lo = 0, hi = count;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (list[mid] < bound) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Forward band tile x: 64 query slots of one residue subsequence of the query rows, and the
// key slots [lo, hi) they visit (band_keys, then clipped to the last row's key limit). Tile x
// of the (L_q, d) decomposition of the rows, relative residue r' (positions offset + r' + d t'),
// is absolute residue (offset + r') mod d from slot (offset + r') / d on. `len` is the end slot
// of the query rows of the residue.
MOEDIFFUSEQ_HOST_DEVICE BandTile band_query_tile(int64_t x, const BlockSparseAttentionParams& p, int64_t S) {
  const int64_t d = p.dilation, offset = p.query_offset;
  const ResidueSubsequences rows{p.q_len, d}, keys{p.seqlen, d};
  int64_t rel, t;
  rows.decode(x, kBsaTile, rel, t);
  const int64_t r = (offset + rel) % d, shift = (offset + rel) / d, n = rows.length(rel);
  const int64_t first = shift + t, end = shift + (t + kBsaTile < n ? t + kBsaTile : n);
  int64_t lo, hi;
  band_keys(keys.length(r), first, end, p.window, p.causal, lo, hi);
  const int64_t top = keys.slots_below(bsa_key_limit(r + d * (end - 1), S, p.seqlen, p.causal) + 1, r);
  if (hi > top) hi = top;
  BandTile tile;
  tile.residue = static_cast<int>(r);
  tile.first = static_cast<int>(first);
  tile.len = static_cast<int>(shift + n);
  tile.lo = static_cast<int>(lo);
  tile.hi = static_cast<int>(hi > lo ? hi : lo);
  return tile;
}

// Backward band tile x: 64 key slots of one residue subsequence, and the query slots [lo, hi)
// that see them (band_queries, clipped to the query rows and to the queries that may see its
// first key). `len` is the end slot of the keys of the residue.
MOEDIFFUSEQ_HOST_DEVICE BandTile band_key_tile(int64_t x, const BlockSparseAttentionParams& p, int64_t S) {
  BandTile tile = band_tile(x, p.seqlen, p.dilation, p.window, p.causal, /*queries_of_keys=*/true);
  const ResidueSubsequences keys{p.seqlen, p.dilation};
  const int64_t r = tile.residue, first_key = r + p.dilation * tile.first;
  const int64_t q_first = first_query_seeing(first_key, S, /*causal=*/false);  // band_queries has the causal part
  const int64_t lo = keys.slots_below(q_first > p.query_offset ? q_first : p.query_offset, r);
  const int64_t hi = keys.slots_below(p.query_offset + p.q_len, r);
  if (tile.lo < lo) tile.lo = static_cast<int>(lo);
  if (tile.hi > hi) tile.hi = static_cast<int>(hi);
  if (tile.hi < tile.lo) tile.hi = tile.lo;
  return tile;
}

// Per-position flags of batch b (masks may be null).
struct PositionFlags {
  const bool* global = nullptr;  // (L) of batch b
  const bool* padded = nullptr;  // (L) of batch b
  __device__ __forceinline__ bool is_global(int p) const { return global && global[p]; }
  __device__ __forceinline__ bool is_padded(int p) const { return padded && padded[p]; }
};

// The source length of batch b (0 without isolation).
__device__ __forceinline__ int source_length(const BlockSparseAttentionParams& p, int b) {
  return p.source_lengths ? static_cast<int>(p.source_lengths[b]) : 0;
}

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
// in the forward, at most L_q; global keys in the backward, at most L) against every tile of
// the other side (forward: the L keys; backward: the L_q query rows). The first
// kBsaSplitTiles tiles of the list run as num_splits CTAs each (split = which part of the
// other side's tiles), the others as one CTA each.
struct DenseTile {
  int tile = 0;     // tile of the compact list: rows [64 tile, 64 tile + 64)
  int split = 0;    // part of the other side's tiles
  bool partial = false;
  int first = 0;    // other side's tiles [first, end)
  int end = 0;
};

// Tiles of the compact list (of at most list_len entries) that are split.
MOEDIFFUSEQ_HOST_DEVICE int split_list_tiles(int64_t list_len, int num_splits) {
  const int total = tiles_of(list_len);
  return num_splits > 1 ? (total < kBsaSplitTiles ? total : kBsaSplitTiles) : 0;
}

MOEDIFFUSEQ_HOST_DEVICE DenseTile dense_tile(int x, int64_t list_len, int64_t other_len, int num_splits) {
  const int total = tiles_of(other_len);
  const int split_tiles = split_list_tiles(list_len, num_splits);
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

// The tiles of the other side that a dense tile needs. Its rows (forward: global queries whose
// last row may see keys up to position key_limit) see key tiles [0, key_limit / 64]; its keys
// (backward: global keys first seen by query row first_row, a row index) are seen by query
// tiles [first_row / 64, total).
MOEDIFFUSEQ_HOST_DEVICE void causal_key_tiles(DenseTile& t, int key_limit) {
  const int end = key_limit / kBsaTile + 1;
  if (t.end > end) t.end = end > t.first ? end : t.first;
}
MOEDIFFUSEQ_HOST_DEVICE void causal_query_tiles(DenseTile& t, int first_row) {
  const int first = first_row / kBsaTile;
  if (t.first < first) t.first = first < t.end ? first : t.end;
}

// The query row (of the L_q rows at `offset`) from which the query tiles of a global-key tile
// start: that of the first query that may see its first key (first_query_seeing), or past the
// last tile when no query row may.
MOEDIFFUSEQ_HOST_DEVICE int dense_first_row(int64_t first_query, int64_t offset, int64_t q_len) {
  const int64_t row = first_query - offset;
  if (row >= q_len) return tiles_of(q_len) * kBsaTile;
  return row > 0 ? static_cast<int>(row) : 0;
}

// CTAs past the band tiles: one per dense tile of the list that is not split, num_splits per
// split one.
MOEDIFFUSEQ_HOST_DEVICE int64_t dense_ctas(int64_t list_len, int num_splits) {
  const int64_t split_tiles = split_list_tiles(list_len, num_splits);
  return split_tiles * num_splits + (tiles_of(list_len) - split_tiles);
}

// Band tiles of a direction: the query tiles of the L_q rows (forward) or the key tiles of the
// L keys (backward); and the length of the dense list: global rows (forward) or keys (backward).
MOEDIFFUSEQ_HOST_DEVICE int64_t band_tiles_of(const BlockSparseAttentionParams& p, bool backward) {
  return ResidueSubsequences{backward ? p.seqlen : p.q_len, p.dilation}.num_blocks(kBsaTile);
}
MOEDIFFUSEQ_HOST_DEVICE int64_t dense_list_len(const BlockSparseAttentionParams& p, bool backward) {
  return backward ? p.seqlen : p.q_len;
}

// Launches a forward or backward kernel over grid (band tiles + dense CTAs, heads, B), with
// `smem` bytes of dynamic shared memory; the kernel takes (params, workspace, band tiles).
template <typename Kernel>
cudaError_t launch_tiles(Kernel kernel, int threads, int smem, int64_t heads, const BlockSparseAttentionParams& p,
                         const BsaWorkspace& ws, bool backward, cudaStream_t stream) {
  const int64_t band_tiles = band_tiles_of(p, backward);
  const int64_t global_ctas = p.global_mask ? dense_ctas(dense_list_len(p, backward), ws.num_splits) : 0;
  const dim3 grid(static_cast<unsigned>(band_tiles + global_ctas), static_cast<unsigned>(heads),
                  static_cast<unsigned>(p.batch));
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(p, ws, static_cast<int>(band_tiles));
  return cudaGetLastError();
}

}  // namespace moediffuseq::cuda
