// CuTe building blocks shared by the forward and backward kernels of block-sparse attention:
// the tensor-core atom per input dtype (SM80 mma.sync, which Hopper runs), the shared-memory
// tile layouts, ldmatrix copy atoms and the accumulator -> A-operand register view.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include <type_traits>

#include "attention/cuda/block_sparse_attention_cuda.h"

namespace moediffuseq::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 16x8x16 tensor-core product, float32 accumulation.
template <typename Elem>
using MmaAtomFor = std::conditional_t<std::is_same_v<Elem, cutlass::bfloat16_t>,
                                      cute::SM80_16x8x16_F32BF16BF16F32_TN, cute::SM80_16x8x16_F32F16F16F32_TN>;

// Shared-memory tiles of kBsaTile rows: rows padded by 16 bytes so that the 8 rows read by
// one ldmatrix fall into different banks.
template <int Cols>
struct SmemTiles {
  static constexpr int kLd = Cols + 8;
  using Rows = cute::Layout<cute::Shape<cute::Int<kBsaTile>, cute::Int<Cols>>, cute::Stride<cute::Int<kLd>, cute::_1>>;
  // The same memory seen as (Cols, rows): the transposed operand of a product.
  using Cols_ = cute::Layout<cute::Shape<cute::Int<Cols>, cute::Int<kBsaTile>>, cute::Stride<cute::_1, cute::Int<kLd>>>;
  static constexpr int kElems = kBsaTile * kLd;
};

template <typename Elem>
using LdsmN = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Elem>;  // K-major operand
template <typename Elem>
using LdsmT = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Elem>;  // MN-major operand

// The accumulator of a product, ((2, 2), M, N) per thread in the m16n8 C layout, read as the
// A operand of the next product, (((2, 2), 2), M, N / 2): A's k-block kk is the pair of
// C n-blocks 2 kk and 2 kk + 1 (same rows, columns 8 apart).
template <class Layout>
CUTE_HOST_DEVICE auto accumulator_as_a(Layout layout) {
  using namespace cute;
  static_assert(rank(Layout{}) == 3 && size<0>(Layout{}) == 4 && size<2>(Layout{}) % 2 == 0);
  auto split = logical_divide(layout, Shape<Underscore, Underscore, _2>{});  // ((2,2), M, (2, N/2))
  return make_layout(make_layout(get<0>(split), get<2, 0>(split)), get<1>(split), get<2, 1>(split));
}

// The accumulator ((2, 2), M, N) seen as (rows, columns) = ((2, M), (2, N)): mode 0 of the
// m16n8 C layout is (2 adjacent columns, rows r and r + 8).
template <class Layout>
CUTE_HOST_DEVICE auto accumulator_rowcol(Layout layout) {
  using namespace cute;
  static_assert(rank(Layout{}) == 3 && size<0>(Layout{}) == 4);
  return make_layout(make_layout(get<0, 1>(layout), get<1>(layout)), make_layout(get<0, 0>(layout), get<2>(layout)));
}

template <class Tensor>
CUTE_HOST_DEVICE auto rowcol_view(Tensor&& t) {
  return cute::make_tensor(t.data(), accumulator_rowcol(t.layout()));
}

// An owning register copy of a float accumulator, converted to Elem.
template <typename Elem, class Tensor>
__device__ __forceinline__ auto convert_fragment(const Tensor& acc) {
  auto out = cute::make_tensor<Elem>(acc.layout());
#pragma unroll
  for (int i = 0; i < cute::size(acc); ++i) out(i) = static_cast<Elem>(acc(i));
  return out;
}

}  // namespace moediffuseq::cuda
