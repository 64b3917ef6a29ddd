// The CUDA kernels of the diffusion ops, registered for their host entries
// (diffusion/{soft_absorb_q_sample,denoise_step,nearest_embedding}.cpp): each torch-free
// launcher of diffusion_kernels.h runs on the current stream, its launch checked; every one
// takes float16 too. nearest_embedding's tiles: 4096 rows x 8192 words, a 128 MiB float32 buffer.
#include "common/backends.h"
#include "common/cuda/stream_launch.h"
#include "diffusion/cuda/diffusion_kernels.h"

namespace moediffuseq::cuda {
namespace {

template <typename Params, cudaError_t (*Launch)(const Params&, cudaStream_t)>
ParamsKernel<Params> on_current_stream() {
  return {/*allow_half=*/true, &launch_on_current_stream<Params, Launch>};
}

const KernelsRegistration<ParamsKernel<SoftAbsorbQSampleParams>> kQSample(
    c10::DeviceType::CUDA, on_current_stream<SoftAbsorbQSampleParams, launch_soft_absorb_q_sample>());
const KernelsRegistration<ParamsKernel<SoftAbsorbQSampleBackwardParams>> kQSampleBackward(
    c10::DeviceType::CUDA, on_current_stream<SoftAbsorbQSampleBackwardParams, launch_soft_absorb_q_sample_backward>());
const KernelsRegistration<ParamsKernel<DenoiseStepParams>> kDenoiseStep(
    c10::DeviceType::CUDA, on_current_stream<DenoiseStepParams, launch_denoise_step>());
const KernelsRegistration<NearestEmbeddingKernel> kNearestEmbedding(
    c10::DeviceType::CUDA,
    {/*allow_half=*/true, /*row_block=*/4096, /*vocab_chunk=*/8192,
     &launch_on_current_stream<NearestEmbeddingChunkParams, launch_nearest_embedding_chunk>});

}  // namespace
}  // namespace moediffuseq::cuda
