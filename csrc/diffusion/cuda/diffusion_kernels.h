// Host launchers of the diffusion CUDA kernels (csrc/diffusion/cuda/{soft_absorb_q_sample,
// denoise_step,nearest_embedding}_kernel.cu). Torch-free: the host entries fill the params
// structs of diffusion/diffusion_params.h, and diffusion_cuda.cpp registers each launcher for
// them, run on the current stream with its error checked. Each enqueues on `stream` and returns
// the launch error (cudaSuccess when nothing was launched).
#pragma once

#include <cuda_runtime_api.h>

#include "diffusion/diffusion_params.h"

namespace moediffuseq::cuda {

cudaError_t launch_soft_absorb_q_sample(const SoftAbsorbQSampleParams& p, cudaStream_t stream);
// Two kernels: grad_x0 with per-split partial sums of grad_m, then the sum over the splits.
cudaError_t launch_soft_absorb_q_sample_backward(const SoftAbsorbQSampleBackwardParams& p, cudaStream_t stream);
cudaError_t launch_denoise_step(const DenoiseStepParams& p, cudaStream_t stream);
cudaError_t launch_nearest_embedding_chunk(const NearestEmbeddingChunkParams& p, cudaStream_t stream);

}  // namespace moediffuseq::cuda
