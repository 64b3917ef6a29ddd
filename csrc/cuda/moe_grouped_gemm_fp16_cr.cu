// Grouped GEMM instantiation: float16, A column-major, B row-major (the weight gradients).
#include "cuda/moe_grouped_gemm.cuh"
MOEDIFFUSEQ_INSTANTIATE_GROUPED_GEMM(kFloat16, kColRow)
