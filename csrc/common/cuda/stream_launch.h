// A torch-free launcher `cudaError_t launch(const Params&, cudaStream_t)` as the `run` of a
// ParamsKernel (common/backends.h): enqueued on the current stream of the current device (the
// host entry's OpDeviceGuard made it the op's), the launch error checked.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace moediffuseq::cuda {

template <typename Params, cudaError_t (*Launch)(const Params&, cudaStream_t)>
void launch_on_current_stream(const Params& p) {
  C10_CUDA_CHECK(Launch(p, at::cuda::getCurrentCUDAStream()));
}

}  // namespace moediffuseq::cuda
