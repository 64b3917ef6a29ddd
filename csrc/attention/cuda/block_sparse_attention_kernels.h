// Declarations of the per-(dtype, head dim) kernel launchers of block-sparse attention; each
// is instantiated in its own generated file block_sparse_attention_{fwd,bwd}_<dtype>_hdim<D>.cu
// (see generate_block_sparse_attention_kernels.py) so that nvcc compiles them in parallel.
#pragma once

#include <cuda_runtime_api.h>
#include <cutlass/numeric_types.h>

#include "attention/block_sparse_attention_params.h"
#include "attention/cuda/block_sparse_attention_cuda.h"

namespace moediffuseq::cuda {

template <typename Elem, int D>
cudaError_t run_block_sparse_attention_fwd(const BlockSparseAttentionParams& p, const BsaWorkspace& ws,
                                           cudaStream_t stream);
template <typename Elem, int D>
cudaError_t run_block_sparse_attention_bwd(const BlockSparseAttentionParams& p, const BsaWorkspace& ws,
                                           cudaStream_t stream);

}  // namespace moediffuseq::cuda
