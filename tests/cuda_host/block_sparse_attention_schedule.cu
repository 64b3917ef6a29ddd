// Host-side check of the work decomposition of the CUDA block-sparse attention kernels: the band
// tiles (attention/block_sparse_attention_residues.h: band_keys, band_queries, band_pair,
// band_block_full), the global-key and global-row tiles and the dense tiles with their causal
// trimming (attention/cuda/block_sparse_attention_tile_io.cuh) are replayed here pair by pair, as
// the forward and backward kernels visit and mask them, and every allowed (query, key) pair must
// be computed exactly once and nothing else, for causal and bidirectional windows, dilation,
// global tokens, padding and split dense tiles. Runs without a GPU (make cuda-check).
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "attention/cuda/block_sparse_attention_tile_io.cuh"
using namespace moediffuseq;
using namespace moediffuseq::cuda;

namespace {

struct Problem {
  int L = 1, d = 1, w = 0, splits = 1;
  bool causal = false;
  std::vector<char> global, padded;
  std::vector<int> global_queries, global_keys;  // the kernels' compact lists, ascending
};

bool allowed(const Problem& p, int i, int j) {
  if (p.padded[j]) return false;
  if (p.causal && j > i) return false;
  if (p.global[i] || p.global[j]) return true;
  const int diff = i > j ? i - j : j - i;
  return (i - j) % p.d == 0 && diff / p.d <= p.w;
}

// count[i * L + j] += 1 for each pair a kernel computes (for a row it writes: forward; for a
// key and query it keeps: backward).
struct Coverage {
  const Problem& p;
  std::vector<int> count;
  explicit Coverage(const Problem& prob) : p(prob), count(size_t(prob.L) * prob.L, 0) {}
  void add(int i, int j) { count[size_t(i) * p.L + j]++; }
  int errors(const char* what) const {
    int bad = 0;
    for (int i = 0; i < p.L; ++i) {
      for (int j = 0; j < p.L; ++j) {
        const int want = allowed(p, i, j) ? 1 : 0, got = count[size_t(i) * p.L + j];
        if (got != want && bad++ < 3) {
          printf("%s L %d d %d w %d causal %d splits %d: pair (%d, %d) computed %d times, want %d\n", what, p.L, p.d,
                 p.w, int(p.causal), p.splits, i, j, got, want);
        }
      }
    }
    return bad;
  }
};

int position(int residue, int d, int slot) { return residue + d * slot; }

// A strided tile of 64 slots [first, first + 64) below `end`, or a gathered one; -1 past the end.
int strided(int residue, int d, int first, int end, int k) {
  return first + k < end ? position(residue, d, first + k) : -1;
}
int gathered(const std::vector<int>& list, int first, int k) {
  return first + k < int(list.size()) ? list[first + k] : -1;
}

// The forward: per band query tile its band key tiles, then the global-key tiles; per dense
// tile of global rows every key tile (causal: trimmed).
int check_forward(const Problem& p) {
  Coverage cov(p);
  const ResidueSubsequences seq{p.L, p.d};
  for (int64_t x = 0; x < seq.num_blocks(kBsaTile); ++x) {
    const BandTile tile = band_tile(x, p.L, p.d, p.w, p.causal, /*queries_of_keys=*/false);
    const int r = tile.residue, t0 = tile.first, len = tile.len, lo = tile.lo, hi = tile.hi;
    const int n_first = tiles_of(hi - lo), n_second = tiles_of(p.global_keys.size());
    for (int j = 0; j < n_first + n_second; ++j) {
      const bool geometry = j < n_first;
      const int c0 = lo + j * kBsaTile;
      int kpos[kBsaTile];
      bool keep[kBsaTile], dropped = false;
      for (int c = 0; c < kBsaTile; ++c) {
        kpos[c] = geometry ? strided(r, p.d, c0, hi, c) : gathered(p.global_keys, (j - n_first) * kBsaTile, c);
        keep[c] = kpos[c] >= 0 && (!geometry || (!p.padded[kpos[c]] && !p.global[kpos[c]]));
        dropped |= !keep[c];
      }
      const bool by_position = p.causal && !geometry;
      const bool need_mask = dropped || by_position || (geometry && !band_block_full(t0, c0, kBsaTile, p.w, p.causal));
      for (int row = 0; row < kBsaTile; ++row) {
        const int i = strided(r, p.d, t0, len, row);
        if (i < 0 || p.global[i]) continue;  // not written by this tile
        for (int c = 0; c < kBsaTile; ++c) {
          bool ok = true;
          if (need_mask) {
            ok = keep[c];
            if (geometry) ok = ok && band_pair((t0 + row) - (c0 + c), p.w, p.causal);
            if (by_position) ok = ok && kpos[c] <= i;
          }
          if (ok) cov.add(i, kpos[c]);
        }
      }
    }
  }
  if (!p.global_queries.empty()) {
    const int num_rows = int(p.global_queries.size());
    for (int x = 0; x < int(dense_ctas(p.L, p.splits)); ++x) {
      DenseTile t = dense_tile(x, p.L, p.splits);
      const int g0 = t.tile * kBsaTile;
      if (g0 >= num_rows) continue;
      if (p.causal) causal_key_tiles(t, p.global_queries[(g0 + kBsaTile < num_rows ? g0 + kBsaTile : num_rows) - 1]);
      for (int j = 0; j < t.end - t.first; ++j) {
        for (int row = 0; row < kBsaTile; ++row) {
          const int i = gathered(p.global_queries, g0, row);
          if (i < 0) continue;
          for (int c = 0; c < kBsaTile; ++c) {
            const int key = strided(0, 1, (t.first + j) * kBsaTile, p.L, c);
            if (key >= 0 && !p.padded[key] && (!p.causal || key <= i)) cov.add(i, key);
          }
        }
      }
    }
  }
  return cov.errors("forward");
}

// The backward: per band key tile its band query tiles, then the global-row tiles; per dense
// tile of global keys every query tile (causal: trimmed).
int check_backward(const Problem& p) {
  Coverage cov(p);
  const ResidueSubsequences seq{p.L, p.d};
  for (int64_t x = 0; x < seq.num_blocks(kBsaTile); ++x) {
    const BandTile tile = band_tile(x, p.L, p.d, p.w, p.causal, /*queries_of_keys=*/true);
    const int r = tile.residue, c0 = tile.first, len = tile.len, lo = tile.lo, hi = tile.hi;
    int kpos[kBsaTile];
    bool kkeep[kBsaTile], dropped = false;
    for (int c = 0; c < kBsaTile; ++c) {
      kpos[c] = strided(r, p.d, c0, len, c);
      kkeep[c] = kpos[c] >= 0 && !p.padded[kpos[c]] && !p.global[kpos[c]];
      dropped |= !kkeep[c];
    }
    const int n_first = tiles_of(hi - lo), n_second = tiles_of(p.global_queries.size());
    for (int j = 0; j < n_first + n_second; ++j) {
      const bool geometry = j < n_first;
      const int t0 = lo + j * kBsaTile;
      const bool by_position = p.causal && !geometry;
      const bool need_mask = dropped || by_position || (geometry && !band_block_full(t0, c0, kBsaTile, p.w, p.causal));
      for (int row = 0; row < kBsaTile; ++row) {
        const int i = geometry ? strided(r, p.d, t0, hi, row)
                               : gathered(p.global_queries, (j - n_first) * kBsaTile, row);
        if (i < 0 || (geometry && p.global[i])) continue;  // a row the tile does not keep
        for (int c = 0; c < kBsaTile; ++c) {
          if (kpos[c] < 0) continue;
          bool ok = true;
          if (need_mask) {
            ok = kkeep[c];
            if (geometry) ok = ok && band_pair((t0 + row) - (c0 + c), p.w, p.causal);
            if (by_position) ok = ok && kpos[c] <= i;
          }
          if (ok) cov.add(i, kpos[c]);
        }
      }
    }
  }
  if (!p.global_keys.empty()) {
    const int num_keys = int(p.global_keys.size());
    for (int x = 0; x < int(dense_ctas(p.L, p.splits)); ++x) {
      DenseTile t = dense_tile(x, p.L, p.splits);
      const int g0 = t.tile * kBsaTile;
      if (g0 >= num_keys) continue;
      if (p.causal) causal_query_tiles(t, p.global_keys[g0]);
      for (int j = 0; j < t.end - t.first; ++j) {
        for (int row = 0; row < kBsaTile; ++row) {
          const int i = strided(0, 1, (t.first + j) * kBsaTile, p.L, row);
          if (i < 0) continue;
          for (int c = 0; c < kBsaTile; ++c) {
            const int key = gathered(p.global_keys, g0, c);
            if (key >= 0 && (!p.causal || key <= i)) cov.add(i, key);
          }
        }
      }
    }
  }
  return cov.errors("backward");
}

}  // namespace

int main() {
  std::mt19937 rng(2024);
  int errors = 0, problems = 0;
  for (int L : {1, 2, 63, 64, 65, 130, 300, 700}) {
    for (int d : {1, 2, 3, 7}) {
      for (int w : {0, 1, 5, 63, 64, 70, 1000}) {
        for (bool causal : {false, true}) {
          for (double p_global : {0.0, 0.03, 0.5}) {
            Problem p;
            p.L = L;
            p.d = d < L ? d : L;
            p.w = w < L ? w : L;
            p.causal = causal;
            p.splits = (L % 2) ? 1 : 3;  // the split dense tiles too
            std::bernoulli_distribution is_global(p_global), is_padded(0.1);
            for (int i = 0; i < L; ++i) {
              p.global.push_back(is_global(rng));
              p.padded.push_back(is_padded(rng));
              if (p.global[i]) p.global_queries.push_back(i);
              if (p.global[i] && !p.padded[i]) p.global_keys.push_back(i);
            }
            errors += check_forward(p) + check_backward(p);
            problems++;
            if (errors > 20) break;
          }
        }
      }
    }
  }
  printf("block_sparse_attention schedule: %s (%d problems, %d errors)\n", errors ? "FAIL" : "ok", problems, errors);
  return errors != 0;
}
