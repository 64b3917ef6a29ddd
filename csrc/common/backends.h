// How a host entry, written once for every backend, reaches the kernels of the op's device.
//   - The kernels of an op are a struct of function pointers: MoeKernels (moe/moe_backend.h)
//     for the MoE ops, ParamsKernel<Params> below for an op whose host entry fills one params
//     struct. Each backend file registers its own for its device type at load time:
//       const KernelsRegistration<MoeKernels> registration(c10::DeviceType::CPU, {...});
//   - The host entry takes `kernels_for<MoeKernels>(x.device(), op)`, holds an OpDeviceGuard
//     for the whole op, and is registered with the dispatcher for the CPU key and, in a build
//     with CUDA kernels, the CUDA key: MOEDIFFUSEQ_IMPL_CPU_AND_CUDA(m.impl("op", &op);).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <optional>

#if MOEDIFFUSEQ_WITH_CUDA
#include "common/cuda/device_check.h"
#endif

namespace moediffuseq {

namespace detail {
template <typename Kernels>
std::array<std::optional<Kernels>, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>&
kernel_tables() {
  static std::array<std::optional<Kernels>, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>
      tables;
  return tables;
}
}  // namespace detail

// Registers (a copy of) `kernels` for the device type: a backend file's static object.
template <typename Kernels>
struct KernelsRegistration {
  KernelsRegistration(c10::DeviceType type, const Kernels& kernels) {
    detail::kernel_tables<Kernels>()[static_cast<size_t>(type)] = kernels;
  }
};

template <typename Kernels>
const Kernels& kernels_for(const c10::Device& device, const char* op) {
  const std::optional<Kernels>& kernels = detail::kernel_tables<Kernels>()[static_cast<size_t>(device.type())];
  TORCH_CHECK(kernels.has_value(), op, ": no kernels for device ", device);
  return *kernels;
}

// The kernel of an op whose host entry fills one params struct (`run` enqueues it; on CUDA on
// the current stream, the launch checked).
template <typename Params>
struct ParamsKernel {
  bool allow_half = false;  // float16 accepted
  void (*run)(const Params& p) = nullptr;
};

// The op's device made current for its whole run (on CUDA, as a CUDAGuard; the backends take
// that device's current stream), with the check, on CUDA, that this build holds code for it.
class OpDeviceGuard {
 public:
  explicit OpDeviceGuard(const c10::Device& device) : guard_(device) {
#if MOEDIFFUSEQ_WITH_CUDA
    if (device.is_cuda()) cuda::check_device_supported(guard_.current_device().index());
#endif
  }

 private:
  c10::DeviceGuard guard_;
};

}  // namespace moediffuseq

// MOEDIFFUSEQ_IMPL_CPU_AND_CUDA(m.impl("op", &op); ...): the statements, on the library `m`,
// for the CPU key and, in a build with CUDA kernels, the CUDA key.
#if MOEDIFFUSEQ_WITH_CUDA
#define MOEDIFFUSEQ_IMPL_CPU_AND_CUDA(...)                     \
  TORCH_LIBRARY_IMPL(moediffuseq, CPU, m) { __VA_ARGS__ }  \
  TORCH_LIBRARY_IMPL(moediffuseq, CUDA, m) { __VA_ARGS__ }
#else
#define MOEDIFFUSEQ_IMPL_CPU_AND_CUDA(...) \
  TORCH_LIBRARY_IMPL(moediffuseq, CPU, m) { __VA_ARGS__ }
#endif
