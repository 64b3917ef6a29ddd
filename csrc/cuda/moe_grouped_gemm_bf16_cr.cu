// Grouped GEMM instantiation: bfloat16, A column-major, B row-major (the weight gradients).
#include "cuda/moe_grouped_gemm.cuh"
MOEDIFFUSEQ_INSTANTIATE_GROUPED_GEMM(kBFloat16, kColRow)
