// The check behind every host entry's device guard (OpDeviceGuard, common/backends.h): once per
// device, that this build holds code that runs on it, so that a GPU whose compute capability
// was not built gets a message naming the rebuild instead of "no kernel image is available".
// The decision is csrc/common/cuda/cuda_arch_support.h.
#pragma once

#include <c10/core/Device.h>

namespace moediffuseq::cuda {

// Raises when the build's architectures (MOEDIFFUSEQ_CUDA_ARCHS) have no code for `device`;
// the answer is cached per device, so the cost after the first call is one load.
void check_device_supported(c10::DeviceIndex device);

// Whether `device` runs this build's sm_90a code (the CUTLASS Hopper kernels): capability 9.0
// and 90a built.
bool device_runs_sm90a(c10::DeviceIndex device);

}  // namespace moediffuseq::cuda
