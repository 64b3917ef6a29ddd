// Element types of the kernels' activations, as plain enum values (torch-free).
#pragma once

namespace moediffuseq {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace moediffuseq
