// Host launchers of block-sparse attention on CUDA: the global lists (built on the GPU on
// every call, one small kernel), the backward's preprocessing (delta = rowsum(dO * O)) and
// dQ conversion, and the dispatch over (dtype, head dim) to the generated kernel files.
// Torch-free: compiled by nvcc alone.
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>
#include <cutlass/numeric_types.h>

#include <algorithm>

#include "attention/cuda/block_sparse_attention_cuda.h"
#include "attention/cuda/block_sparse_attention_kernels.h"
#include "attention/cuda/block_sparse_attention_tile_io.cuh"
#include "attention/block_sparse_attention_residues.h"

namespace moediffuseq::cuda {
namespace {

constexpr int kListThreads = 512;
constexpr float kBsaLn2 = 0.6931471805599453f;

// One CTA per batch element: the positions of its global rows (those among the query rows
// [q_begin, q_end)), and of its global keys that are not padded, in increasing order, and their
// counts. O(L) work, no host synchronisation.
__global__ void __launch_bounds__(kListThreads)
    build_global_lists_kernel(const bool* global_mask, const bool* key_padding_mask, int batch, int L, int q_begin,
                              int q_end, int* global_queries, int* global_keys, int* num_global) {
  using Scan = cub::BlockScan<int, kListThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int base_rows, base_keys;
  const int b = blockIdx.x;
  const bool* g = global_mask + static_cast<int64_t>(b) * L;
  const bool* pad = key_padding_mask ? key_padding_mask + static_cast<int64_t>(b) * L : nullptr;
  int* rows = global_queries + static_cast<int64_t>(b) * L;
  int* keys = global_keys + static_cast<int64_t>(b) * L;
  if (threadIdx.x == 0) base_rows = base_keys = 0;
  __syncthreads();
  for (int start = 0; start < L; start += kListThreads) {
    const int i = start + threadIdx.x;
    const bool global = i < L && g[i];
    const bool is_row = global && i >= q_begin && i < q_end;
    const bool is_key = global && !(pad && pad[i]);
    // Both counts in one scan: rows in the low 16 bits, keys above (at most 512 each per chunk).
    int offset, total;
    Scan(scan_storage).ExclusiveSum(int(is_row) | (int(is_key) << 16), offset, total);
    if (is_row) rows[base_rows + (offset & 0xffff)] = i;
    if (is_key) keys[base_keys + (offset >> 16)] = i;
    __syncthreads();  // every thread has read the bases and the scan storage
    if (threadIdx.x == 0) {
      base_rows += total & 0xffff;
      base_keys += total >> 16;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    num_global[b] = base_rows;
    num_global[batch + b] = base_keys;
  }
}

// Row (b, h, l) of a logical (B, H, L_q, D) tensor from its flat index b H L_q + h L_q + l.
__device__ __forceinline__ int64_t row_offset(const BsaStrides& s, int64_t row, int64_t heads, int64_t q_len) {
  const int64_t l = row % q_len, bh = row / q_len;
  return s.at(bh / heads, bh % heads, l);
}

// delta[row] = sum over D of grad_out * out, one warp per (b, h, l) row, float32.
template <typename Elem>
__global__ void bsa_delta_kernel(const BlockSparseAttentionParams p, float* delta, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32, D = static_cast<int>(p.head_dim);
  const Elem* grad_out = static_cast<const Elem*>(p.grad_out) + row_offset(p.grad_out_strides, row, p.heads, p.q_len);
  const Elem* out = static_cast<const Elem*>(p.out) + row_offset(p.out_strides, row, p.heads, p.q_len);
  float sum = 0.f;
  for (int c = lane; c < D; c += 32) sum += static_cast<float>(grad_out[c]) * static_cast<float>(out[c]);
  for (int m = 16; m > 0; m /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, m);
  if (lane == 0) delta[row] = sum;
}

// The split tiles of global rows: merges the num_splits partial softmax results of every row
// (max and sum in log2 units, unnormalised output) into its output row and lse. One warp per row.
template <typename Elem>
__global__ void bsa_combine_kernel(const BlockSparseAttentionParams p, const BsaWorkspace ws) {
  const int tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int L = static_cast<int>(p.seqlen), D = static_cast<int>(p.head_dim), S = ws.num_splits;
  const int64_t Lq = p.q_len, offset = p.query_offset;
  const int64_t bh = static_cast<int64_t>(b) * p.heads + h;
  const int num_rows = ws.num_global[b];
  const int lane = threadIdx.x % 32;
  for (int tile_row = threadIdx.x / 32; tile_row < kBsaTile; tile_row += blockDim.x / 32) {
    const int g = tile * kBsaTile + tile_row;
    if (g >= num_rows) break;
    const int64_t row = ws.global_queries[static_cast<int64_t>(b) * L + g] - offset;  // of out and lse
    const int64_t first = (bh * kBsaSplitTiles + tile) * S * kBsaTile + tile_row;  // slot of split 0
    float max_all = -INFINITY;
    for (int s = 0; s < S; ++s) max_all = fmaxf(max_all, ws.split_max_sum[(first + s * kBsaTile) * 2]);
    const float shift = max_all == -INFINITY ? 0.f : max_all;
    float sum = 0.f;
    for (int s = 0; s < S; ++s) {
      const float* ms = ws.split_max_sum + (first + s * kBsaTile) * 2;
      sum += ms[1] * exp2f(ms[0] - shift);
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    Elem* out = static_cast<Elem*>(p.out_mut) + p.out_strides.at(b, h, row);
    for (int c = lane; c < D; c += 32) {
      float acc = 0.f;
      for (int s = 0; s < S; ++s) {
        const int64_t slot = first + s * kBsaTile;
        acc += ws.split_out[slot * D + c] * exp2f(ws.split_max_sum[slot * 2] - shift);
      }
      out[c] = static_cast<Elem>(acc * inv);
    }
    // rounded as the forward kernel's lse (the backward replays these roundings)
    if (lane == 0) p.lse[bh * Lq + row] = sum > 0.f ? __fadd_rn(__fmul_rn(max_all, kBsaLn2), logf(sum)) : INFINITY;
  }
}

// The split tiles of global keys: their float32 gradient sums to the dK and dV rows.
// grid = (split tiles, H_kv, B).
template <typename Elem>
__global__ void bsa_finish_keys_kernel(const BlockSparseAttentionParams p, const BsaWorkspace ws) {
  const int tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int L = static_cast<int>(p.seqlen), D = static_cast<int>(p.head_dim);
  const int64_t bh = static_cast<int64_t>(b) * p.kv_heads + h;
  const int num_keys = ws.num_global[p.batch + b];
  for (int idx = threadIdx.x; idx < kBsaTile * D; idx += blockDim.x) {
    const int row = idx / D, c = idx % D;
    const int g = tile * kBsaTile + row;
    if (g >= num_keys) break;
    const int pos = ws.global_keys[static_cast<int64_t>(b) * L + g];
    const int64_t from = ((bh * kBsaSplitTiles + tile) * kBsaTile + row) * D + c;
    static_cast<Elem*>(p.grad_k)[p.grad_k_strides.at(b, h, pos) + c] = static_cast<Elem>(ws.split_grad_k[from]);
    static_cast<Elem*>(p.grad_v)[p.grad_v_strides.at(b, h, pos) + c] = static_cast<Elem>(ws.split_grad_v[from]);
  }
}

// Tiles of the compact list of a direction that are split (see dense_tile).
unsigned split_tiles(const BlockSparseAttentionParams& p, const BsaWorkspace& ws, bool backward) {
  if (!p.global_mask) return 0;
  return static_cast<unsigned>(split_list_tiles(dense_list_len(p, backward), ws.num_splits));
}

// grad_q (through its strides) <- the contiguous (B, H, L_q, D) float32 accumulator.
template <typename Elem>
__global__ void bsa_convert_kernel(const BlockSparseAttentionParams p, const float* in, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x, D = p.head_dim;
  Elem* out = static_cast<Elem*>(p.grad_q);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[row_offset(p.grad_q_strides, i / D, p.heads, p.q_len) + i % D] = static_cast<Elem>(in[i]);
  }
}

cudaError_t build_global_lists(const BlockSparseAttentionParams& p, const BsaWorkspace& ws, cudaStream_t stream) {
  if (!p.global_mask) return cudaSuccess;
  build_global_lists_kernel<<<static_cast<unsigned>(p.batch), kListThreads, 0, stream>>>(
      p.global_mask, p.key_padding_mask, static_cast<int>(p.batch), static_cast<int>(p.seqlen),
      static_cast<int>(p.query_offset), static_cast<int>(p.query_offset + p.q_len), ws.global_queries, ws.global_keys,
      ws.num_global);
  return cudaGetLastError();
}

// Window and dilation saturated at the sequence (make_bsa_params already did it; kept for
// callers of the launchers that fill the params themselves): the kernels cast them to int.
BlockSparseAttentionParams clamped(const BlockSparseAttentionParams& p) {
  BlockSparseAttentionParams c = p;
  clamp_window_and_dilation(c);
  return c;
}

// No splitting without global tokens or without the split buffers.
BsaWorkspace checked(const BsaWorkspace& ws, const BlockSparseAttentionParams& p, bool backward) {
  BsaWorkspace c = ws;
  const bool buffers = backward ? (ws.split_grad_k && ws.split_grad_v) : (ws.split_out && ws.split_max_sum);
  if (!p.global_mask || !buffers || c.num_splits < 1) c.num_splits = 1;
  return c;
}

// The generated kernel of (Elem, head dim, direction).
template <typename Elem, bool kBackward>
cudaError_t run_head_dim(const BlockSparseAttentionParams& p, const BsaWorkspace& ws, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64:
      return kBackward ? run_block_sparse_attention_bwd<Elem, 64>(p, ws, stream)
                       : run_block_sparse_attention_fwd<Elem, 64>(p, ws, stream);
    case 128:
      return kBackward ? run_block_sparse_attention_bwd<Elem, 128>(p, ws, stream)
                       : run_block_sparse_attention_fwd<Elem, 128>(p, ws, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename Elem>
cudaError_t dispatch_fwd(const BlockSparseAttentionParams& p, const BsaWorkspace& ws, cudaStream_t stream) {
  cudaError_t err = run_head_dim<Elem, false>(p, ws, stream);
  if (err != cudaSuccess) return err;
  if (const unsigned tiles = split_tiles(p, ws, /*backward=*/false)) {
    bsa_combine_kernel<Elem><<<dim3(tiles, static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch)), 256, 0,
                               stream>>>(p, ws);
    err = cudaGetLastError();
  }
  return err;
}

template <typename Elem>
cudaError_t dispatch_bwd(const BlockSparseAttentionParams& p, const BsaWorkspace& ws, cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads * p.q_len;
  const int warps_per_block = 8;
  bsa_delta_kernel<Elem><<<static_cast<unsigned>((rows + warps_per_block - 1) / warps_per_block), 32 * warps_per_block,
                           0, stream>>>(p, ws.delta, rows);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = run_head_dim<Elem, true>(p, ws, stream);
  if (err != cudaSuccess) return err;
  if (const unsigned tiles = split_tiles(p, ws, /*backward=*/true)) {
    bsa_finish_keys_kernel<Elem><<<dim3(tiles, static_cast<unsigned>(p.kv_heads), static_cast<unsigned>(p.batch)), 256,
                                   0, stream>>>(p, ws);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int64_t n = rows * p.head_dim;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 65536);
  bsa_convert_kernel<Elem><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p, ws.grad_q_accum, n);
  return cudaGetLastError();
}

// Both directions: the clamped params, the workspace checked, the global lists, then the
// kernels of the dtype.
template <bool kBackward>
cudaError_t launch(const BlockSparseAttentionParams& params, DType dtype, const BsaWorkspace& workspace,
                   cudaStream_t stream) {
  const BlockSparseAttentionParams p = clamped(params);
  const BsaWorkspace ws = checked(workspace, p, kBackward);
  cudaError_t err = build_global_lists(p, ws, stream);
  if (err != cudaSuccess) return err;
  switch (dtype) {
    case DType::kBFloat16:
      return kBackward ? dispatch_bwd<cutlass::bfloat16_t>(p, ws, stream) : dispatch_fwd<cutlass::bfloat16_t>(p, ws, stream);
    case DType::kFloat16:
      return kBackward ? dispatch_bwd<cutlass::half_t>(p, ws, stream) : dispatch_fwd<cutlass::half_t>(p, ws, stream);
    default:
      return cudaErrorInvalidValue;  // tensor-core kernels: 16-bit only
  }
}

}  // namespace

cudaError_t block_sparse_attention_fwd_cuda(const BlockSparseAttentionParams& params, DType dtype,
                                            const BsaWorkspace& workspace, cudaStream_t stream) {
  return launch</*kBackward=*/false>(params, dtype, workspace, stream);
}

cudaError_t block_sparse_attention_bwd_cuda(const BlockSparseAttentionParams& params, DType dtype,
                                            const BsaWorkspace& workspace, cudaStream_t stream) {
  return launch</*kBackward=*/true>(params, dtype, workspace, stream);
}

}  // namespace moediffuseq::cuda
