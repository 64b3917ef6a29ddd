// The CUTLASS 3.x grouped GEMM of the MoE layer for sm_90a, one (element, layout) pair per
// instantiation file (moe_grouped_gemm_<dtype>_<layout>.cu), so that nvcc compiles the
// handful of kernels in parallel and a build only pays for what it instantiates.
//   mainloop: TMA + warp-specialised cooperative WGMMA, fp32 accumulators;
//   epilogue: D = acc (no source operand), written by TMA in the element type.
// Group sizes come from the host: the problem shapes, operand pointers and strides are packed
// into one caller-given host staging buffer, which must be pinned (page-locked) memory so that
// the copy into the head of the device workspace is truly asynchronous (from pageable memory
// cudaMemcpyAsync stages the bytes and may synchronise the host on every launch), and which the
// caller keeps from reuse until the copy has run (an event on the stream).
#pragma once

// Device-side asserts inside the WGMMA main loop serialise the tensor-core pipeline (ptxas
// warns "wgmma serialized"): these files are release kernels whatever the build type.
#ifndef NDEBUG
#define NDEBUG
#endif

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#include "moe/moe_params.h"

namespace moediffuseq::cuda {

template <DType kDType>
struct CutlassElement;
template <>
struct CutlassElement<DType::kBFloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CutlassElement<DType::kFloat16> {
  using type = cutlass::half_t;
};

template <GemmLayout kLayout>
struct CutlassLayouts;
template <>
struct CutlassLayouts<GemmLayout::kRowRow> {
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::RowMajor;
};
template <>
struct CutlassLayouts<GemmLayout::kRowCol> {
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::ColumnMajor;
};
template <>
struct CutlassLayouts<GemmLayout::kColRow> {
  using A = cutlass::layout::ColumnMajor;
  using B = cutlass::layout::RowMajor;
};

// Stride of a packed (rows, cols, 1) operand in CUTLASS 3.x form: the contiguous mode has the
// static stride 1, the other one the extent of the contiguous mode.
template <class Stride>
Stride packed_stride(int rows, int cols) {
  Stride s{};
  if constexpr (cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<1>(s))>>) {
    cute::get<0>(s) = cols;  // mode 1 contiguous (row-major)
  } else {
    cute::get<1>(s) = rows;  // mode 0 contiguous (column-major)
  }
  if constexpr (!cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<2>(s))>>) {
    cute::get<2>(s) = static_cast<int64_t>(rows) * cols;
  }
  return s;
}

template <DType kDType, GemmLayout kLayout>
struct MoeGroupedGemm {
  using Element = typename CutlassElement<kDType>::type;
  using LayoutA = typename CutlassLayouts<kLayout>::A;
  using LayoutB = typename CutlassLayouts<kLayout>::B;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = kGroupedGemmAlignment;  // 16 bytes of 16-bit elements

  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K) per group

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlign,        // no source operand C
      Element, LayoutD*, kAlign,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, LayoutA*, kAlign,
      Element, LayoutB*, kAlign,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using Shape = typename ProblemShape::UnderlyingProblemShape;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;

  // The device arrays at the head of the workspace, each 128-byte aligned.
  struct Arrays {
    size_t shapes = 0, ptr_a = 0, ptr_b = 0, ptr_d = 0, stride_a = 0, stride_b = 0, stride_d = 0, bytes = 0;
    explicit Arrays(int groups) {
      size_t at = 0;
      auto take = [&](size_t bytes_each) {
        const size_t start = at;
        at += (bytes_each * groups + 127) / 128 * 128;
        return start;
      };
      shapes = take(sizeof(Shape));
      ptr_a = take(sizeof(const Element*));
      ptr_b = take(sizeof(const Element*));
      ptr_d = take(sizeof(Element*));
      stride_a = take(sizeof(StrideA));
      stride_b = take(sizeof(StrideB));
      stride_d = take(sizeof(StrideD));
      bytes = at;
    }
  };

  static typename Gemm::Arguments arguments(int groups, const Shape* host_shapes, uint8_t* arrays_base,
                                            const Arrays& arrays, int device, int sm_count) {
    cutlass::KernelHardwareInfo hw_info;
    hw_info.device_id = device;
    hw_info.sm_count = sm_count;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {groups, reinterpret_cast<Shape*>(arrays_base + arrays.shapes), host_shapes},
        {reinterpret_cast<const Element**>(arrays_base + arrays.ptr_a),
         reinterpret_cast<StrideA*>(arrays_base + arrays.stride_a),
         reinterpret_cast<const Element**>(arrays_base + arrays.ptr_b),
         reinterpret_cast<StrideB*>(arrays_base + arrays.stride_b)},
        {{}, nullptr, nullptr, reinterpret_cast<Element**>(arrays_base + arrays.ptr_d),
         reinterpret_cast<StrideD*>(arrays_base + arrays.stride_d)},
        hw_info};
    args.epilogue.thread.alpha = 1.f;
    args.epilogue.thread.beta = 0.f;
    return args;
  }

  static std::vector<Shape> shapes_of(int groups, const GroupedGemmProblem* problems) {
    std::vector<Shape> shapes(groups);
    for (int g = 0; g < groups; ++g) shapes[g] = Shape{problems[g].m, problems[g].n, problems[g].k};
    return shapes;
  }

  // nullptr when CUTLASS takes these problems (alignment of every group's extents), else the
  // status can_implement returned.
  static const char* refusal(int groups, const GroupedGemmProblem* problems, int device, int sm_count) {
    const Arrays arrays(groups);
    const std::vector<Shape> shapes = shapes_of(groups, problems);
    const auto args = arguments(groups, shapes.data(), nullptr, arrays, device, sm_count);
    const cutlass::Status status = Gemm::can_implement(args);
    return status == cutlass::Status::kSuccess ? nullptr : cutlass::cutlassGetStatusString(status);
  }

  static size_t workspace_size(int groups, const GroupedGemmProblem* problems, int device, int sm_count) {
    const Arrays arrays(groups);
    const std::vector<Shape> shapes = shapes_of(groups, problems);
    // The CUTLASS workspace depends on the problem count and the machine, not on the pointers.
    const auto args = arguments(groups, shapes.data(), nullptr, arrays, device, sm_count);
    return arrays.bytes + Gemm::get_workspace_size(args);
  }

  static const char* run(int groups, const GroupedGemmProblem* problems, void* workspace, size_t workspace_bytes,
                         void* host_staging, size_t host_bytes, int device, int sm_count, cudaStream_t stream) {
    const Arrays arrays(groups);
    if (host_staging == nullptr || host_bytes < arrays.bytes) return "host staging buffer missing or too small";
    const std::vector<Shape> shapes = shapes_of(groups, problems);
    uint8_t* host = static_cast<uint8_t*>(host_staging);
    auto fill = [&](size_t offset, int g, const auto& value) {
      std::memcpy(host + offset + g * sizeof(value), &value, sizeof(value));
    };
    for (int g = 0; g < groups; ++g) {
      const GroupedGemmProblem& p = problems[g];
      fill(arrays.shapes, g, shapes[g]);
      fill(arrays.ptr_a, g, static_cast<const Element*>(p.a));
      fill(arrays.ptr_b, g, static_cast<const Element*>(p.b));
      fill(arrays.ptr_d, g, static_cast<Element*>(p.d));
      // Packed strides: A is (M, K), B is (N, K) in CUTLASS 3.x terms, D is (M, N).
      fill(arrays.stride_a, g, packed_stride<StrideA>(p.m, p.k));
      fill(arrays.stride_b, g, packed_stride<StrideB>(p.n, p.k));
      fill(arrays.stride_d, g, packed_stride<StrideD>(p.m, p.n));
    }
    uint8_t* base = static_cast<uint8_t*>(workspace);
    const auto args = arguments(groups, shapes.data(), base, arrays, device, sm_count);
    Gemm gemm;
    if (workspace_bytes < arrays.bytes + Gemm::get_workspace_size(args)) return "workspace too small";
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "problem not supported (alignment)";
    // Pinned source: the copy is only enqueued, the caller keeps `host_staging` until it has run.
    if (cudaMemcpyAsync(base, host, arrays.bytes, cudaMemcpyHostToDevice, stream) != cudaSuccess) {
      return "copy of the problem arrays failed";
    }
    if (gemm.initialize(args, base + arrays.bytes, stream) != cutlass::Status::kSuccess) return "initialize failed";
    if (gemm.run(stream) != cutlass::Status::kSuccess) return "launch failed";
    return nullptr;
  }
};

}  // namespace moediffuseq::cuda

// Explicit instantiation, one per file: MOEDIFFUSEQ_INSTANTIATE_GROUPED_GEMM(kBFloat16, kRowRow).
#define MOEDIFFUSEQ_INSTANTIATE_GROUPED_GEMM(DTYPE, LAYOUT)                                            \
  namespace moediffuseq::cuda {                                                                       \
  const char* moe_grouped_gemm_refusal_##DTYPE##_##LAYOUT(int groups, const GroupedGemmProblem* p,    \
                                                          int device, int sm_count) {                 \
    return MoeGroupedGemm<DType::DTYPE, GemmLayout::LAYOUT>::refusal(groups, p, device, sm_count);    \
  }                                                                                                   \
  size_t moe_grouped_gemm_workspace_size_##DTYPE##_##LAYOUT(int groups, const GroupedGemmProblem* p,  \
                                                            int device, int sm_count) {               \
    return MoeGroupedGemm<DType::DTYPE, GemmLayout::LAYOUT>::workspace_size(groups, p, device, sm_count); \
  }                                                                                                   \
  const char* moe_grouped_gemm_##DTYPE##_##LAYOUT(int groups, const GroupedGemmProblem* p, void* ws,   \
                                                  size_t bytes, void* host, size_t host_bytes,        \
                                                  int device, int sm_count, cudaStream_t stream) {    \
    return MoeGroupedGemm<DType::DTYPE, GemmLayout::LAYOUT>::run(groups, p, ws, bytes, host, host_bytes, \
                                                                 device, sm_count, stream);           \
  }                                                                                                   \
  }
