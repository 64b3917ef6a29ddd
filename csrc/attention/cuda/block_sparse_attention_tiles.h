// Tile decomposition of block-sparse attention on the GPU, torch-free (host and device).
//
// Dilation d is handled as d interleaved plain windows: the positions with one residue
// r = i mod d form a subsequence (slot t = i / d) in which the dilated window is a plain
// window of half-width w. A band tile is 64 consecutive slots of one residue subsequence, so
// its rows are read from memory with a stride of d rows (no permuted copy of q, k, v).
//
// The allowed pairs are split into three disjoint parts, each computed once:
//   band     query i not global, key j not global and not padded, same residue, |t_i - t_j| <= w
//   g-keys   any query i, key j global and not padded
//   g-rows   query i global, key j not global and not padded
// The forward visits, for a band query tile (r, t0), the band key tiles of residue r over the
// slots [t0 - w, t0 + 64 + w) and then the tiles of the compact list of global keys; a tile
// of global query rows visits every key tile (g-keys and g-rows together). The backward runs
// per key tile: a band key tile (r, c0) visits the band query tiles of slots [c0 - w, c0 + 64 + w)
// and the tiles of the global-query list; a tile of the global-key list visits every query.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MOEDIFFUSEQ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOEDIFFUSEQ_HOST_DEVICE inline
#endif

namespace moediffuseq {

constexpr int kBsaTile = 64;  // rows of a query tile and of a key tile

// Residue subsequences of positions 0..L-1 under dilation d.
struct ResidueTiles {
  int64_t L = 0;
  int64_t d = 1;

  // Number of positions i < L with i mod d == r.
  MOEDIFFUSEQ_HOST_DEVICE int64_t length(int64_t r) const { return r < L ? (L - r + d - 1) / d : 0; }
  MOEDIFFUSEQ_HOST_DEVICE static int64_t tiles_of(int64_t n) { return (n + kBsaTile - 1) / kBsaTile; }
  // Band tiles over all residues: the first L mod d residues have L / d + 1 slots, the others L / d.
  MOEDIFFUSEQ_HOST_DEVICE int64_t num_tiles() const {
    const int64_t m = L % d, q = L / d;
    return m * tiles_of(q + 1) + (d - m) * tiles_of(q);
  }
  // Band tile number x -> (residue r, first slot t0).
  MOEDIFFUSEQ_HOST_DEVICE void decode(int64_t x, int64_t& r, int64_t& t0) const {
    const int64_t m = L % d, q = L / d;
    const int64_t a = tiles_of(q + 1), b = tiles_of(q);
    if (x < m * a) {
      r = x / a;
      t0 = (x % a) * kBsaTile;
    } else {
      x -= m * a;
      r = m + x / b;
      t0 = (x % b) * kBsaTile;
    }
  }
};

// Slots [lo, hi) of residue r that the band rows [t0, t0 + 64) reach with half-width w.
MOEDIFFUSEQ_HOST_DEVICE void band_range(int64_t len, int64_t t0, int64_t w, int64_t& lo, int64_t& hi) {
  const int64_t t1 = t0 + kBsaTile < len ? t0 + kBsaTile : len;
  lo = t0 - w > 0 ? t0 - w : 0;
  hi = t1 + w < len ? t1 + w : len;
}

}  // namespace moediffuseq
