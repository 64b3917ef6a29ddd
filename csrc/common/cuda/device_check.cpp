// check_device_supported / device_runs_sm90a (device_check.h): the device's capability from
// torch's cached properties against the architectures this library was built for.
#include "common/cuda/device_check.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <string>

#include "common/cuda/cuda_arch_support.h"

namespace moediffuseq::cuda {
namespace {

constexpr int kMaxDevices = 64;
// Per device: 0 = not checked yet, 1 = supported (an unsupported device raises every time).
std::array<std::atomic<unsigned char>, kMaxDevices> g_supported{};

}  // namespace

void check_device_supported(c10::DeviceIndex device) {
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && g_supported[device].load(std::memory_order_relaxed)) return;
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(device);
  const std::string name = "cuda:" + std::to_string(device) + " (" + props->name + ")";
  const std::string error = cuda_arch_mismatch(MOEDIFFUSEQ_CUDA_ARCHS, name, props->major, props->minor);
  TORCH_CHECK(error.empty(), error);
  if (cached) g_supported[device].store(1, std::memory_order_relaxed);
}

bool device_runs_sm90a(c10::DeviceIndex device) {
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(device);
  return props->major == 9 && props->minor == 0 && cuda_archs_contain(MOEDIFFUSEQ_CUDA_ARCHS, 9, 0, 'a');
}

}  // namespace moediffuseq::cuda
