// Grouped GEMM instantiation: bfloat16, A row-major, B row-major (the forward GEMMs).
#include "cuda/moe_grouped_gemm.cuh"
MOEDIFFUSEQ_INSTANTIATE_GROUPED_GEMM(kBFloat16, kRowRow)
