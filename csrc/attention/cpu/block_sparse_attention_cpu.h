// CPU kernels of block-sparse attention (csrc/attention/cpu/block_sparse_attention_{fwd,bwd}.cpp).
#pragma once

#include <c10/core/ScalarType.h>

#include "attention/block_sparse_attention_params.h"

namespace moediffuseq::cpu {

// dtype: Float or BFloat16. Tensors with strides (last dimension contiguous); see
// BlockSparseAttentionParams.
void block_sparse_attention_fwd_cpu(const BlockSparseAttentionParams& params, c10::ScalarType dtype);
void block_sparse_attention_bwd_cpu(const BlockSparseAttentionParams& params, c10::ScalarType dtype);

}  // namespace moediffuseq::cpu
