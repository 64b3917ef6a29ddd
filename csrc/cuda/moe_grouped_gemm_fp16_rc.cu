// Grouped GEMM instantiation: float16, A row-major, B column-major (the input gradients).
#include "cuda/moe_grouped_gemm.cuh"
MOEDIFFUSEQ_INSTANTIATE_GROUPED_GEMM(kFloat16, kRowCol)
