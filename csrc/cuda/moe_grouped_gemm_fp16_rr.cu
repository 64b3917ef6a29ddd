// Grouped GEMM instantiation: float16, A row-major, B row-major (the forward GEMMs).
#include "cuda/moe_grouped_gemm.cuh"
MOEDIFFUSEQ_INSTANTIATE_GROUPED_GEMM(kFloat16, kRowRow)
