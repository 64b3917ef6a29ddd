// Host-side check of the work decomposition of the CUDA block-sparse attention kernels: the band
// tiles (attention/block_sparse_attention_residues.h: band_keys, band_queries, band_pair,
// band_block_full; attention/cuda/block_sparse_attention_tile_io.cuh: band_query_tile,
// band_key_tile), the global-key and global-row tiles and the dense tiles with their trimming
// to each row's key limit (bsa_key_limit, first_query_seeing, crosses_source) are replayed here
// pair by pair, as the forward and backward kernels visit and mask them, and every allowed
// (query, key) pair must be computed exactly once and nothing else, for causal and
// bidirectional windows, dilation, global tokens, padding, split dense tiles, query rows at an
// offset (L_q <= L) and source isolation (source lengths 0, L, on and beside tile borders,
// inside a tile). Runs without a GPU (make cuda-check).
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "attention/cuda/block_sparse_attention_tile_io.cuh"
using namespace moediffuseq;
using namespace moediffuseq::cuda;

namespace {

struct Problem {
  int L = 1, Lq = 1, offset = 0, S = 0, d = 1, w = 0, splits = 1;
  bool causal = false;
  std::vector<char> global, padded;
  std::vector<int> global_queries, global_keys;  // the kernels' compact lists, ascending

  BlockSparseAttentionParams params() const {
    BlockSparseAttentionParams p;
    p.seqlen = L;
    p.q_len = Lq;
    p.query_offset = offset;
    p.dilation = d;
    p.window = w;
    p.causal = causal;
    return p;
  }
  int limit(int i) const { return int(bsa_key_limit(i, S, L, causal)); }
};

bool allowed(const Problem& p, int i, int j) {
  if (p.padded[j]) return false;
  if (p.causal && j > i) return false;
  if (i < p.S && j >= p.S) return false;
  if (p.global[i] || p.global[j]) return true;
  const int diff = i > j ? i - j : j - i;
  return (i - j) % p.d == 0 && diff / p.d <= p.w;
}

// count[(i - offset) * L + j] += 1 for each pair a kernel computes (for a row it writes:
// forward; for a key and query it keeps: backward); a row outside the query rows is an error,
// and so is work that isolation must skip, not mask (skip): in the forward a tile of source
// queries loads no target key, in the backward no tile pair has only source queries and only
// target keys.
struct Coverage {
  const Problem& p;
  std::vector<int> count;
  int outside = 0, unskipped = 0;
  void skip(int last_query, int key) {
    if (key >= 0 && last_query >= 0 && last_query < p.S && key >= p.S) unskipped++;
  }
  explicit Coverage(const Problem& prob) : p(prob), count(size_t(prob.Lq) * prob.L, 0) {}
  void add(int i, int j) {
    if (i < p.offset || i >= p.offset + p.Lq || j < 0 || j >= p.L) {
      outside++;
      return;
    }
    count[size_t(i - p.offset) * p.L + j]++;
  }
  int errors(const char* what) const {
    int bad = outside + unskipped;
    if (outside) printf("%s: %d pairs outside the query rows or keys\n", what, outside);
    if (unskipped) {
      printf("%s L %d L_q %d offset %d S %d d %d w %d causal %d: %d source x target tiles not skipped\n", what,
             p.L, p.Lq, p.offset, p.S, p.d, p.w, int(p.causal), unskipped);
    }
    for (int i = p.offset; i < p.offset + p.Lq; ++i) {
      for (int j = 0; j < p.L; ++j) {
        const int want = allowed(p, i, j) ? 1 : 0, got = count[size_t(i - p.offset) * p.L + j];
        if (got != want && bad++ < 3) {
          printf("%s L %d L_q %d offset %d S %d d %d w %d causal %d splits %d: pair (%d, %d) computed %d times, "
                 "want %d\n", what, p.L, p.Lq, p.offset, p.S, p.d, p.w, int(p.causal), p.splits, i, j, got, want);
        }
      }
    }
    return bad;
  }
};

// A strided tile of 64 slots [first, first + 64) below `end`, or a gathered one of the entries
// [first, first + 64) below `end`; -1 past the end.
int strided(int residue, int d, int first, int end, int k) { return first + k < end ? residue + d * (first + k) : -1; }
int gathered(const std::vector<int>& list, int first, int end, int k) { return first + k < end ? list[first + k] : -1; }

// The forward: per band query tile its band key tiles, then the global-key tiles up to its key
// limit; per dense tile of global rows every key tile up to its key limit.
int check_forward(const Problem& p) {
  Coverage cov(p);
  const BlockSparseAttentionParams prm = p.params();
  const int num_keys = int(p.global_keys.size());
  for (int64_t x = 0; x < band_tiles_of(prm, /*backward=*/false); ++x) {
    const BandTile tile = band_query_tile(x, prm, p.S);
    const int r = tile.residue, t0 = tile.first, len = tile.len, lo = tile.lo, hi = tile.hi;
    const int last = r + p.d * ((t0 + kBsaTile < len ? t0 + kBsaTile : len) - 1);
    const int key_count = count_below(p.global_keys.data(), num_keys, int64_t(p.limit(last)) + 1);
    const int n_first = tiles_of(hi - lo), n_second = tiles_of(key_count);
    const int first_query = strided(r, p.d, t0, len, 0);
    for (int j = 0; j < n_first + n_second; ++j) {
      const bool geometry = j < n_first;
      const int c0 = lo + j * kBsaTile;
      int kpos[kBsaTile];
      bool keep[kBsaTile], dropped = false, crosses = false;
      for (int c = 0; c < kBsaTile; ++c) {
        kpos[c] = geometry ? strided(r, p.d, c0, hi, c) : gathered(p.global_keys, (j - n_first) * kBsaTile, key_count, c);
        keep[c] = kpos[c] >= 0 && (!geometry || (!p.padded[kpos[c]] && !p.global[kpos[c]]));
        dropped |= !keep[c];
        crosses |= kpos[c] >= 0 && crosses_source(first_query, kpos[c], p.S);
        cov.skip(last, kpos[c]);
      }
      const bool by_position = (p.causal && !geometry) || crosses;
      const bool need_mask = dropped || by_position || (geometry && !band_block_full(t0, c0, kBsaTile, p.w, p.causal));
      for (int row = 0; row < kBsaTile; ++row) {
        const int i = strided(r, p.d, t0, len, row);
        if (i < 0 || p.global[i]) continue;  // not written by this tile
        for (int c = 0; c < kBsaTile; ++c) {
          bool ok = true;
          if (need_mask) {
            ok = keep[c];
            if (geometry) ok = ok && band_pair((t0 + row) - (c0 + c), p.w, p.causal);
            if (by_position) ok = ok && kpos[c] <= p.limit(i);
          }
          if (ok) cov.add(i, kpos[c]);
        }
      }
    }
  }
  const int num_rows = int(p.global_queries.size());
  if (num_rows > 0) {
    for (int x = 0; x < int(dense_ctas(p.Lq, p.splits)); ++x) {
      DenseTile t = dense_tile(x, p.Lq, p.L, p.splits);
      const int g0 = t.tile * kBsaTile;
      if (g0 >= num_rows) continue;
      const int key_end = p.limit(p.global_queries[(g0 + kBsaTile < num_rows ? g0 + kBsaTile : num_rows) - 1]) + 1;
      causal_key_tiles(t, key_end - 1);
      const int first_query = p.global_queries[g0];
      const int last_query = p.global_queries[(g0 + kBsaTile < num_rows ? g0 + kBsaTile : num_rows) - 1];
      for (int j = 0; j < t.end - t.first; ++j) {
        int kpos[kBsaTile];
        bool keep[kBsaTile], dropped = false, crosses = false;
        for (int c = 0; c < kBsaTile; ++c) {
          kpos[c] = strided(0, 1, (t.first + j) * kBsaTile, key_end, c);
          keep[c] = kpos[c] >= 0 && !p.padded[kpos[c]];
          dropped |= !keep[c];
          crosses |= kpos[c] >= 0 && crosses_source(first_query, kpos[c], p.S);
          cov.skip(last_query, kpos[c]);
        }
        const bool by_position = p.causal || crosses, need_mask = dropped || by_position;
        for (int row = 0; row < kBsaTile; ++row) {
          const int i = gathered(p.global_queries, g0, num_rows, row);
          if (i < 0) continue;
          for (int c = 0; c < kBsaTile; ++c) {
            const bool ok = !need_mask || (keep[c] && (!by_position || kpos[c] <= p.limit(i)));
            if (ok) cov.add(i, kpos[c]);
          }
        }
      }
    }
  }
  return cov.errors("forward");
}

// The backward: per band key tile its band query tiles, then the global-row tiles from the
// first row that may see it; per dense tile of global keys every query tile from that row on.
int check_backward(const Problem& p) {
  Coverage cov(p);
  const BlockSparseAttentionParams prm = p.params();
  const int num_rows = int(p.global_queries.size());
  for (int64_t x = 0; x < band_tiles_of(prm, /*backward=*/true); ++x) {
    const BandTile tile = band_key_tile(x, prm, p.S);
    const int r = tile.residue, c0 = tile.first, len = tile.len, lo = tile.lo, hi = tile.hi;
    int kpos[kBsaTile];
    bool kkeep[kBsaTile], dropped = false, any_target = false;
    for (int c = 0; c < kBsaTile; ++c) {
      kpos[c] = strided(r, p.d, c0, len, c);
      kkeep[c] = kpos[c] >= 0 && !p.padded[kpos[c]] && !p.global[kpos[c]];
      dropped |= !kkeep[c];
      any_target |= kpos[c] >= 0 && kpos[c] >= p.S;
    }
    const int g_first = count_below(p.global_queries.data(), num_rows, first_query_seeing(r + p.d * c0, p.S, p.causal));
    const int n_first = tiles_of(hi - lo), n_second = tiles_of(num_rows - g_first);
    for (int j = 0; j < n_first + n_second; ++j) {
      const bool geometry = j < n_first;
      const int t0 = lo + j * kBsaTile;
      int qpos[kBsaTile];
      bool qkeep[kBsaTile], source_row = false;
      for (int row = 0; row < kBsaTile; ++row) {
        qpos[row] = geometry ? strided(r, p.d, t0, hi, row)
                             : gathered(p.global_queries, g_first + (j - n_first) * kBsaTile, num_rows, row);
        qkeep[row] = qpos[row] >= 0 && !(geometry && p.global[qpos[row]]);  // rows the tile keeps
        source_row |= qkeep[row] && qpos[row] < p.S;
      }
      int last_row = -1;
      for (int row = 0; row < kBsaTile; ++row) last_row = qpos[row] > last_row ? qpos[row] : last_row;
      cov.skip(last_row, r + p.d * c0);  // a key tile of target keys visits no tile of source rows
      const bool by_position = (p.causal && !geometry) || (source_row && any_target);
      const bool need_mask = dropped || by_position || (geometry && !band_block_full(t0, c0, kBsaTile, p.w, p.causal));
      for (int row = 0; row < kBsaTile; ++row) {
        const int i = qpos[row];
        if (!qkeep[row]) continue;
        for (int c = 0; c < kBsaTile; ++c) {
          if (kpos[c] < 0) continue;
          bool ok = true;
          if (need_mask) {
            ok = kkeep[c];
            if (geometry) ok = ok && band_pair((t0 + row) - (c0 + c), p.w, p.causal);
            if (by_position) ok = ok && kpos[c] <= p.limit(i);
          }
          if (ok) cov.add(i, kpos[c]);
        }
      }
    }
  }
  const int num_keys = int(p.global_keys.size());
  if (num_keys > 0) {
    for (int x = 0; x < int(dense_ctas(p.L, p.splits)); ++x) {
      DenseTile t = dense_tile(x, p.L, p.Lq, p.splits);
      const int g0 = t.tile * kBsaTile;
      if (g0 >= num_keys) continue;
      causal_query_tiles(t, dense_first_row(first_query_seeing(p.global_keys[g0], p.S, p.causal), p.offset, p.Lq));
      int kpos[kBsaTile];
      bool dropped = false, any_target = false;
      for (int c = 0; c < kBsaTile; ++c) {
        kpos[c] = gathered(p.global_keys, g0, num_keys, c);
        dropped |= kpos[c] < 0;
        any_target |= kpos[c] >= 0 && kpos[c] >= p.S;
      }
      for (int j = 0; j < t.end - t.first; ++j) {
        int qpos[kBsaTile];
        bool source_row = false;
        for (int row = 0; row < kBsaTile; ++row) {
          qpos[row] = strided(p.offset, 1, (t.first + j) * kBsaTile, p.Lq, row);
          source_row |= qpos[row] >= 0 && qpos[row] < p.S;
          if (row == kBsaTile - 1 || strided(p.offset, 1, (t.first + j) * kBsaTile, p.Lq, row + 1) < 0) {
            cov.skip(qpos[row], kpos[0]);  // the last row: no tile of source rows for target keys
          }
        }
        const bool by_position = p.causal || (source_row && any_target), need_mask = dropped || by_position;
        for (int row = 0; row < kBsaTile; ++row) {
          const int i = qpos[row];
          if (i < 0) continue;
          for (int c = 0; c < kBsaTile; ++c) {
            if (kpos[c] < 0) continue;
            const bool ok = !need_mask || !by_position || kpos[c] <= p.limit(i);
            if (ok) cov.add(i, kpos[c]);
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
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  for (int L : {1, 2, 63, 64, 65, 130, 300, 700}) {
    for (int d : {1, 2, 3, 7}) {
      for (int w : {0, 1, 5, 63, 64, 70, 1000}) {
        for (bool causal : {false, true}) {
          for (double p_global : {0.0, 0.03, 0.5}) {
            // the whole sequence without isolation, then one drawn (offset, L_q, S): source
            // lengths 0, L, tile borders and their neighbours, or inside; query rows all, one
            // (first or last), or a drawn run
            for (int variant = 0; variant < 2; ++variant) {
              Problem p;
              p.L = L;
              p.d = d < L ? d : L;
              p.w = w < L ? w : L;
              p.causal = causal;
              p.splits = (L % 2) ? 1 : 3;  // the split dense tiles too
              p.Lq = L;
              if (variant == 1) {
                const int border = 64 * pick(1, 4) + pick(-1, 1);
                const int sources[] = {0, L, border <= L ? border : L, pick(0, L)};
                p.S = sources[pick(0, 3)];
                switch (pick(0, 3)) {
                  case 0: break;
                  case 1: p.Lq = 1; p.offset = pick(0, 1) ? L - 1 : 0; break;
                  case 2: p.Lq = pick(1, L); p.offset = L - p.Lq; break;
                  default: p.Lq = pick(1, L); p.offset = pick(0, L - p.Lq); break;
                }
              }
              std::bernoulli_distribution is_global(p_global), is_padded(0.1);
              for (int i = 0; i < L; ++i) {
                p.global.push_back(is_global(rng));
                p.padded.push_back(is_padded(rng));
                if (p.global[i] && i >= p.offset && i < p.offset + p.Lq) p.global_queries.push_back(i);
                if (p.global[i] && !p.padded[i]) p.global_keys.push_back(i);
              }
              errors += check_forward(p) + check_backward(p);
              problems++;
            }
            if (errors > 20) break;
          }
        }
      }
    }
  }
  printf("block_sparse_attention schedule: %s (%d problems, %d errors)\n", errors ? "FAIL" : "ok", problems, errors);
  return errors != 0;
}
