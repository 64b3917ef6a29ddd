// The C++ element type of a kernel DType (common/dtype.h) on the CPU: the CPU kernels that
// take a params struct dispatch on it as the CUDA ones do (common/cuda/cuda_elementwise.cuh).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "common/dtype.h"

namespace moediffuseq::cpu {

// f(T{}) with T the element type of `dtype` (float, c10::BFloat16, c10::Half).
template <typename F>
void dispatch_cpu_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(float{});
      return;
    case DType::kBFloat16:
      f(c10::BFloat16{});
      return;
    case DType::kFloat16:
      f(c10::Half{});
      return;
  }
  TORCH_CHECK(false, "no CPU kernel for dtype ", static_cast<int>(dtype));
}

}  // namespace moediffuseq::cpu
