// Host launchers of the mixture-of-experts CUDA kernels (csrc/moe/cuda/moe_*.cu). Torch-free: the
// kernels compile with nvcc alone; the CUDA kernel table (moe_kernels_cuda.cpp) and the host
// entries fill the params structs of moe/moe_params.h, and the table checks the returned errors.
// Every launcher enqueues on `stream` and returns the launch error (cudaSuccess when nothing was
// launched).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "moe/moe_params.h"

namespace moediffuseq::cuda {

cudaError_t launch_moe_topk_softmax(const MoeTopkSoftmaxParams& p, cudaStream_t stream);

// Three kernels: per-block expert counts, a column scan of the counts (offsets, bad index),
// and the stable scatter of the slots to their grouped rows.
cudaError_t launch_moe_routing(const MoeRoutingParams& p, cudaStream_t stream);

cudaError_t launch_moe_gather(const MoeGatherParams& p, cudaStream_t stream);
cudaError_t launch_moe_combine(const MoeCombineParams& p, cudaStream_t stream);
cudaError_t launch_moe_grad_weights(const MoeGradWeightsParams& p, cudaStream_t stream);
cudaError_t launch_moe_activation_forward(const MoeActivationParams& p, cudaStream_t stream);
cudaError_t launch_moe_activation_backward(const MoeActivationParams& p, cudaStream_t stream);

// Tensor-core grouped GEMM (CUTLASS 3.x ptr-array, sm_90a) for bfloat16 / float16 operands
// with float32 accumulation; the group sizes come from the host (every m, n, k >= 1).
// moe_grouped_gemm_workspace_size: device bytes the run needs (problem, pointer and stride
// arrays plus the CUTLASS workspace). moe_grouped_gemm: returns nullptr on success, else a
// message naming the failed step; `host_staging` (at least workspace_bytes) is pinned host
// memory that packs the problem arrays for an asynchronous copy, and the caller must keep it from
// reuse until that copy has run on `stream` (record an event).
// moe_grouped_gemm_refusal: nullptr when the kernel takes the problems, else why not
// (float32: always refused; 16-bit: the alignment rules above, checked by CUTLASS's
// can_implement, whose status string is returned).
const char* moe_grouped_gemm_refusal(DType dtype, GemmLayout layout, int groups, const GroupedGemmProblem* problems,
                                     int device, int sm_count);
size_t moe_grouped_gemm_workspace_size(DType dtype, GemmLayout layout, int groups,
                                       const GroupedGemmProblem* problems, int device, int sm_count);
const char* moe_grouped_gemm(DType dtype, GemmLayout layout, int groups, const GroupedGemmProblem* problems,
                             void* workspace, size_t workspace_bytes, void* host_staging, size_t host_bytes,
                             int device, int sm_count, cudaStream_t stream);

}  // namespace moediffuseq::cuda
