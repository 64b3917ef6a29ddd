// Dispatch of the grouped GEMM to its instantiations (moe_grouped_gemm_<dtype>_<layout>.cu).
#include "moe/cuda/moe_kernels.h"

#define MOEDIFFUSEQ_DECLARE_GROUPED_GEMM(DTYPE, LAYOUT)                                                  \
  const char* moe_grouped_gemm_refusal_##DTYPE##_##LAYOUT(int, const GroupedGemmProblem*, int, int);    \
  size_t moe_grouped_gemm_workspace_size_##DTYPE##_##LAYOUT(int, const GroupedGemmProblem*, int, int); \
  const char* moe_grouped_gemm_##DTYPE##_##LAYOUT(int, const GroupedGemmProblem*, void*, size_t, void*, size_t, \
                                                  int, int, cudaStream_t);

namespace moediffuseq::cuda {

MOEDIFFUSEQ_DECLARE_GROUPED_GEMM(kBFloat16, kRowRow)
MOEDIFFUSEQ_DECLARE_GROUPED_GEMM(kBFloat16, kRowCol)
MOEDIFFUSEQ_DECLARE_GROUPED_GEMM(kBFloat16, kColRow)
MOEDIFFUSEQ_DECLARE_GROUPED_GEMM(kFloat16, kRowRow)
MOEDIFFUSEQ_DECLARE_GROUPED_GEMM(kFloat16, kRowCol)
MOEDIFFUSEQ_DECLARE_GROUPED_GEMM(kFloat16, kColRow)

#define MOEDIFFUSEQ_GROUPED_GEMM_CASES(FN, ...)                                     \
  switch (layout) {                                                                 \
    case GemmLayout::kRowRow:                                                       \
      return dtype == DType::kBFloat16 ? FN##_kBFloat16_kRowRow(__VA_ARGS__)        \
                                       : FN##_kFloat16_kRowRow(__VA_ARGS__);        \
    case GemmLayout::kRowCol:                                                       \
      return dtype == DType::kBFloat16 ? FN##_kBFloat16_kRowCol(__VA_ARGS__)        \
                                       : FN##_kFloat16_kRowCol(__VA_ARGS__);        \
    case GemmLayout::kColRow:                                                       \
      return dtype == DType::kBFloat16 ? FN##_kBFloat16_kColRow(__VA_ARGS__)        \
                                       : FN##_kFloat16_kColRow(__VA_ARGS__);        \
  }

const char* moe_grouped_gemm_refusal(DType dtype, GemmLayout layout, int groups, const GroupedGemmProblem* problems,
                                     int device, int sm_count) {
  if (groups == 0) return nullptr;
  if (dtype == DType::kFloat32) return "float32 operands";
  MOEDIFFUSEQ_GROUPED_GEMM_CASES(moe_grouped_gemm_refusal, groups, problems, device, sm_count)
  return "unknown layout";
}

size_t moe_grouped_gemm_workspace_size(DType dtype, GemmLayout layout, int groups,
                                       const GroupedGemmProblem* problems, int device, int sm_count) {
  if (groups == 0 || dtype == DType::kFloat32) return 0;
  MOEDIFFUSEQ_GROUPED_GEMM_CASES(moe_grouped_gemm_workspace_size, groups, problems, device, sm_count)
  return 0;
}

const char* moe_grouped_gemm(DType dtype, GemmLayout layout, int groups, const GroupedGemmProblem* problems,
                             void* workspace, size_t workspace_bytes, void* host_staging, size_t host_bytes,
                             int device, int sm_count, cudaStream_t stream) {
  if (groups == 0) return nullptr;
  if (dtype == DType::kFloat32) return "float32 operands have no tensor-core grouped GEMM";
  MOEDIFFUSEQ_GROUPED_GEMM_CASES(moe_grouped_gemm, groups, problems, workspace, workspace_bytes, host_staging,
                                 host_bytes, device, sm_count, stream)
  return "unknown layout";
}

}  // namespace moediffuseq::cuda
