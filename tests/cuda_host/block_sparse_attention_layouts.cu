// Host-side check of the CuTe layouts the block-sparse attention kernels rely on, and of the
// tile decoding of attention/block_sparse_attention_residues.h. CuTe layouts are plain host
// code, so this runs on any machine with nvcc, without a GPU; cmake/cuda_compile_check builds and runs it
// (make cuda-check). Exits non-zero on the first kind of mismatch, after printing a few.
#include <cstdio>
#include <map>
#include <set>
#include <utility>

#include "attention/cuda/block_sparse_attention_bwd_kernel.cuh"
#include "attention/cuda/block_sparse_attention_fwd_kernel.cuh"
#include "attention/cuda/block_sparse_attention_tile_io.cuh"
using namespace cute;
using namespace moediffuseq::cuda;

int main() {
  int errors = 0;
  using K = FwdKernel<cutlass::bfloat16_t, 128>;
  typename K::TiledMma mma;
  std::map<int, std::set<int>> owners;  // row -> tids
  for (int tid = 0; tid < 128; ++tid) {
    auto thr = mma.get_slice(tid);
    Tensor cS = thr.partition_C(make_identity_tensor(Shape<_64, _64>{}));
    Tensor cS_rc = rowcol_view(cS);
    int warp = tid / 32, lane = tid % 32;
    for (int r = 0; r < 2; ++r)
      for (int c = 0; c < size<1>(cS_rc); ++c) {
        int row = get<0>(cS_rc(r, c));
        if (row != warp * 16 + lane / 4 + 8 * r) { if (errors++ < 5) printf("rowcol tid %d r %d c %d row %d\n", tid, r, c, row); }
        owners[row].insert(tid);
      }
    // P as the A operand of the next product: C coordinates == A coordinates.
    Tensor cA = thr.partition_fragment_A(make_tensor(make_smem_ptr((cutlass::bfloat16_t*)nullptr), Layout<Shape<_64, _64>, Stride<_64, _1>>{}));
    Tensor idA = thr.partition_A(make_identity_tensor(Shape<_64, _64>{}));
    Tensor cAsC = make_tensor(cS.data(), accumulator_as_a(cS.layout()));
    if (size(cAsC) != size(idA)) { printf("size mismatch %d %d\n", int(size(cAsC)), int(size(idA))); return 1; }
    if (!(shape(cAsC.layout()) == shape(idA.layout()))) { }
    for (int m = 0; m < size<1>(idA); ++m)
      for (int kk = 0; kk < size<2>(idA); ++kk)
        for (int v = 0; v < size<0>(idA); ++v) {
          auto a = idA(v, m, kk);
          auto c = cAsC(v, m, kk);
          if (get<0>(a) != get<0>(c) || get<1>(a) != get<1>(c)) {
            if (errors++ < 5) printf("A/C mismatch tid %d v %d kk %d: A (%d,%d) C (%d,%d)\n", tid, v, kk, int(get<0>(a)), int(get<1>(a)), int(get<0>(c)), int(get<1>(c)));
          }
        }
    (void)cA;
  }
  for (auto& [row, tids] : owners) {
    int first = *tids.begin();
    bool quad = tids.size() == 4 && first % 4 == 0 && *tids.rbegin() == first + 3;
    if (!quad) { if (errors++ < 5) printf("row %d owned by %zu threads from %d\n", row, tids.size(), first); }
  }
  if (owners.size() != 64) { printf("rows covered %zu\n", owners.size()); errors++; }
  // Backward tiled MMA: every (query, key) of a 64x64 tile is owned exactly once.
  using BK = BwdKernel<cutlass::bfloat16_t, 128>;
  typename BK::TiledMma bmma;
  std::map<std::pair<int,int>, int> seen;
  for (int tid = 0; tid < 256; ++tid) {
    Tensor c = bmma.get_slice(tid).partition_C(make_identity_tensor(Shape<_64, _64>{}));
    for (int i = 0; i < size(c); ++i) seen[{get<0>(c(i)), get<1>(c(i))}]++;
  }
  for (auto& [k, n] : seen) if (n != 1) errors++;
  if (seen.size() != 64 * 64) { printf("bwd coverage %zu\n", seen.size()); errors++; }
  // Band tiles: decode() enumerates every (residue, 64-slot tile) exactly once.
  for (int64_t L : {1, 2, 63, 64, 65, 97, 1000, 4097}) {
    for (int64_t d : {1, 2, 3, 7, 64, 5000}) {
      const moediffuseq::ResidueSubsequences tiles{L, d};
      const int64_t num_tiles = tiles.num_blocks(kBsaTile);
      std::set<std::pair<int64_t, int64_t>> got;
      for (int64_t x = 0; x < num_tiles; ++x) {
        int64_t r, t0;
        tiles.decode(x, kBsaTile, r, t0);
        if (r < 0 || r >= d || t0 < 0 || t0 >= tiles.length(r) || t0 % kBsaTile) errors++;
        got.insert({r, t0});
      }
      int64_t expect = 0;
      for (int64_t r = 0; r < d; ++r) expect += moediffuseq::ResidueSubsequences::blocks_of(tiles.length(r), kBsaTile);
      if (int64_t(got.size()) != num_tiles || expect != num_tiles) {
        if (errors++ < 5) printf("decode L %ld d %ld: %zu distinct of %ld, expected %ld\n", long(L), long(d), got.size(),
                                 long(num_tiles), long(expect));
      }
    }
  }
  // Dense tiles: dense_ctas() CTAs cover every (list tile, other-side tile) pair exactly once,
  // and only the first kBsaSplitTiles list tiles are split; the list (global rows or keys) and
  // the other side (keys or query rows) may differ in length (query rows at an offset).
  for (int L : {1, 64, 65, 4096, 8191, 131072}) {
    for (int list_len : {L, (L + 1) / 2, 1}) {
      for (int splits : {1, 2, 3, 16, moediffuseq::cuda::bsa_cuda_num_splits(L)}) {
        for (bool list_is_shorter : {false, true}) {
          const int other_len = list_is_shorter ? L : list_len, rows = list_is_shorter ? list_len : L;
          const int list_tiles = int(moediffuseq::ResidueSubsequences::blocks_of(rows, kBsaTile));
          const int other_tiles = int(moediffuseq::ResidueSubsequences::blocks_of(other_len, kBsaTile));
          std::map<std::pair<int, int>, int> covered;
          for (int x = 0; x < int(moediffuseq::cuda::dense_ctas(rows, splits)); ++x) {
            const auto t = moediffuseq::cuda::dense_tile(x, rows, other_len, splits);
            if (t.partial != (splits > 1 && t.tile < moediffuseq::cuda::kBsaSplitTiles)) errors++;
            for (int j = t.first; j < t.end; ++j) covered[{t.tile, j}]++;
          }
          bool ok = int(covered.size()) == list_tiles * other_tiles;
          for (auto& [key, n] : covered) ok = ok && n == 1 && key.first < list_tiles && key.second < other_tiles;
          if (!ok && errors++ < 5) {
            printf("dense tiles list %d other %d splits %d: %zu pairs\n", rows, other_len, splits, covered.size());
          }
        }
      }
    }
  }
  printf("block_sparse_attention layouts and tiles: %s (%d errors)\n", errors ? "FAIL" : "ok", errors);
  return errors != 0;
}
