// What the one host entry of block_sparse_attention (attention/block_sparse_attention.cpp) asks
// of a backend: its limits, the tensors its kernels read in place, and the kernels. Each
// backend (attention/cpu/block_sparse_attention_cpu.cpp, attention/cuda/block_sparse_attention_cuda.cpp)
// registers one BsaKernels table for its device type (common/backends.h).
#pragma once

#include <ATen/core/Tensor.h>

#include "attention/block_sparse_attention_params.h"

namespace moediffuseq {

struct BsaKernels {
  // The backend's own limits, on the logical (B, H, L, D) views of q and k.
  void (*check)(const at::Tensor& q, const at::Tensor& k);
  // t itself when the kernels read its memory in place, else a copy they can read.
  at::Tensor (*readable)(const at::Tensor& t);
  // The kernels on the filled params (q: the logical query view, for its dtype and device), on
  // the current device and stream.
  void (*forward)(const BlockSparseAttentionParams& p, const at::Tensor& q);
  void (*backward)(const BlockSparseAttentionParams& p, const at::Tensor& q);
};

}  // namespace moediffuseq
