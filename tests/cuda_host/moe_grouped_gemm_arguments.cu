// Host-side check of the MoE grouped GEMM's argument plumbing (csrc/moe/cuda/moe_grouped_gemm.cuh):
// the packed CUTLASS strides of every layout, and that CUTLASS's own can_implement accepts the
// problems the MoE layer sends (ragged group sizes, M = 1, a K of the weight gradients that is
// not a multiple of 8) and refuses misaligned widths, so the glue falls back to matmuls. No
// kernel is launched: this runs without a GPU (cmake/cuda_compile_check builds and runs it).
#include <cstdio>
#include <vector>

#include "moe/cuda/moe_grouped_gemm.cuh"

using namespace moediffuseq;
using namespace moediffuseq::cuda;

namespace {

int errors = 0;

void expect(bool ok, const char* what) {
  if (!ok && errors++ < 20) std::printf("FAILED: %s\n", what);
}

template <GemmLayout kLayout>
void check_strides(const char* name) {
  using G = MoeGroupedGemm<DType::kBFloat16, kLayout>;
  const int m = 24, n = 40, k = 56;
  const auto sa = packed_stride<typename G::StrideA>(m, k);
  const auto sb = packed_stride<typename G::StrideB>(n, k);
  const auto sd = packed_stride<typename G::StrideD>(m, n);
  // element (i, j) of A (M, K), of B in CUTLASS's (N, K) view, of D (M, N), at these offsets
  const bool a_row = kLayout != GemmLayout::kColRow, b_row = kLayout != GemmLayout::kRowCol;
  const long a01 = cute::get<1>(sa), a10 = cute::get<0>(sa);
  const long b01 = cute::get<1>(sb), b10 = cute::get<0>(sb);
  std::printf("%s: A strides (%ld, %ld), B (N, K) strides (%ld, %ld), D strides (%ld, %ld)\n", name, a10, a01, b10,
              b01, static_cast<long>(cute::get<0>(sd)), static_cast<long>(cute::get<1>(sd)));
  expect(a_row ? (a10 == k && a01 == 1) : (a10 == 1 && a01 == m), "A stride");
  // B row-major (k x n, n contiguous): B(n_i, k_j) at k_j * n + n_i; column-major: n_i * k + k_j
  expect(b_row ? (b10 == 1 && b01 == n) : (b10 == k && b01 == 1), "B stride");
  expect(cute::get<0>(sd) == n && cute::get<1>(sd) == 1, "D stride");
}

// Groups of the MoE layer with ragged row counts (as the routing produces them).
std::vector<GroupedGemmProblem> moe_problems(GemmLayout layout, int D, int F, const std::vector<int>& rows) {
  static std::vector<char> storage(1 << 20);
  const void* p = reinterpret_cast<const void*>((reinterpret_cast<uintptr_t>(storage.data()) + 255) / 256 * 256);
  std::vector<GroupedGemmProblem> out;
  for (int n : rows) {
    GroupedGemmProblem g;
    if (layout == GemmLayout::kColRow) {  // grad w2: (F x n) (n x D)
      g.m = F, g.n = D, g.k = n;
    } else if (layout == GemmLayout::kRowCol) {  // dy w2^T: (n x D) (D x F)
      g.m = n, g.n = F, g.k = D;
    } else {  // x w1: (n x D) (D x F)
      g.m = n, g.n = F, g.k = D;
    }
    g.a = p, g.b = p, g.d = const_cast<void*>(p);
    out.push_back(g);
  }
  return out;
}

template <DType kDType, GemmLayout kLayout>
void check_supported(const char* name) {
  using G = MoeGroupedGemm<kDType, kLayout>;
  const std::vector<int> rows = {1, 7, 300, 8191, 13};
  const auto good = moe_problems(kLayout, 2048, 4096, rows);
  const char* refusal = G::refusal(static_cast<int>(good.size()), good.data(), 0, 132);
  std::printf("%s: aligned MoE problems supported: %d\n", name, refusal == nullptr);
  expect(refusal == nullptr, "aligned problems refused");
  const auto odd = moe_problems(kLayout, 2048, 4100 + 2, rows);  // F = 4102: rows of 8204 bytes
  const char* odd_refusal = G::refusal(static_cast<int>(odd.size()), odd.data(), 0, 132);
  std::printf("%s: misaligned width refused: %s\n", name, odd_refusal ? odd_refusal : "(accepted)");
  expect(odd_refusal != nullptr, "misaligned width accepted");
  const size_t bytes = G::workspace_size(static_cast<int>(good.size()), good.data(), 0, 132);
  std::printf("%s: workspace %zu bytes\n", name, bytes);
  expect(bytes >= typename G::Arrays(static_cast<int>(good.size())).bytes, "workspace smaller than the arrays");
}

}  // namespace

int main() {
  check_strides<GemmLayout::kRowRow>("row-row");
  check_strides<GemmLayout::kRowCol>("row-col");
  check_strides<GemmLayout::kColRow>("col-row");
  check_supported<DType::kBFloat16, GemmLayout::kRowRow>("bf16 row-row");
  check_supported<DType::kBFloat16, GemmLayout::kRowCol>("bf16 row-col");
  check_supported<DType::kBFloat16, GemmLayout::kColRow>("bf16 col-row");
  check_supported<DType::kFloat16, GemmLayout::kColRow>("fp16 col-row");
  if (errors) std::printf("%d check(s) failed\n", errors);
  return errors ? 1 : 0;
}
