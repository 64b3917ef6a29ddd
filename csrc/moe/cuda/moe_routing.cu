// MoE routing on the GPU.
//  moe_topk_softmax: one warp per token; k rounds of a warp arg-max over the logits still
//    available (order: value descending, then index ascending, so ties go to the lowest
//    expert index), then the softmax over the chosen logits = the renormalised probabilities.
//    NaN / +inf rows are reported through an atomic minimum of the row index.
//  moe_ffn routing: the T*k slots grouped by expert with a stable counting sort in three
//    kernels (per-block histograms, a column scan giving each block its base row per expert,
//    and a scatter ranking slots inside a block with warp match masks).
#include <climits>
#include <cmath>

#include "common/cuda/cuda_elementwise.cuh"
#include "moe/cuda/moe_kernels.h"

namespace moediffuseq::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kTopkWarps = 8;  // tokens per block

// a precedes b in the selection order (larger value first, then the lower index); index
// INT_MAX means "nothing".
__device__ __forceinline__ bool precedes(float av, int ai, float bv, int bi) {
  if (ai == INT_MAX) return false;
  if (bi == INT_MAX) return true;
  return av > bv || (av == bv && ai < bi);
}

template <typename T>
__global__ void topk_softmax_kernel(const T* __restrict__ logits, int64_t tokens, int E, int k,
                                    float* __restrict__ weights, int64_t* __restrict__ indices,
                                    unsigned long long* bad_row) {
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTopkWarps + threadIdx.x / 32;
  if (t >= tokens) return;  // whole warps leave together
  const T* row = logits + t * E;

  bool bad = false;
  for (int e = lane; e < E; e += 32) bad |= !(to_float(row[e]) < INFINITY);  // NaN or +inf
  if (__any_sync(kFull, bad)) {
    if (lane == 0) atomicMin(bad_row, static_cast<unsigned long long>(t));
    return;
  }

  float* w = weights + t * k;
  int64_t* ix = indices + t * k;
  float prev_v = INFINITY, top = 0.f, sum = 0.f;
  int prev_i = -1;
  for (int j = 0; j < k; ++j) {
    float best_v = -INFINITY;
    int best_i = INT_MAX;
    for (int e = lane; e < E; e += 32) {
      const float v = to_float(row[e]);
      const bool available = v < prev_v || (v == prev_v && e > prev_i);  // after the previous pick
      if (available && precedes(v, e, best_v, best_i)) {
        best_v = v;
        best_i = e;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(kFull, best_v, off);
      const int oi = __shfl_xor_sync(kFull, best_i, off);
      if (precedes(ov, oi, best_v, best_i)) {
        best_v = ov;
        best_i = oi;
      }
    }
    prev_v = best_v;
    prev_i = best_i;
    if (j == 0) top = best_v;
    const float p = top == -INFINITY ? 1.f : expf(best_v - top);  // all chosen -inf: uniform
    sum += p;
    if (lane == 0) {
      w[j] = p;
      ix[j] = best_i;
    }
  }
  if (lane == 0) {
    for (int j = 0; j < k; ++j) w[j] /= sum;
  }
}

// Per block of kMoeRoutingBlock slots: counts[b][e] and the lowest bad flat position (INT_MAX if none).
__global__ void routing_count_kernel(const int64_t* __restrict__ indices, int64_t n, int E,
                                     int32_t* __restrict__ counts, int32_t* __restrict__ block_bad) {
  extern __shared__ int32_t hist[];  // (E)
  __shared__ int32_t bad;
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  if (threadIdx.x == 0) bad = INT_MAX;
  __syncthreads();
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kMoeRoutingBlock + threadIdx.x;
  if (s < n) {
    const int64_t e = indices[s];
    if (e >= 0 && e < E) {
      atomicAdd(&hist[e], 1);
    } else if (e != -1) {
      atomicMin(&bad, static_cast<int32_t>(s));
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[static_cast<int64_t>(blockIdx.x) * E + e] = hist[e];
  if (threadIdx.x == 0) block_bad[blockIdx.x] = bad;
}

// One block: turns counts[b][e] into the first grouped row of block b for expert e, and writes
// meta = [lowest bad position or -1, offsets[0..E]].
__global__ void routing_scan_kernel(int32_t* __restrict__ counts, const int32_t* __restrict__ block_bad,
                                    int64_t blocks, int E, int64_t* __restrict__ meta) {
  __shared__ int32_t start[kMoeMaxExperts];  // totals, then offsets
  __shared__ int32_t bad;
  if (threadIdx.x == 0) bad = INT_MAX;
  __syncthreads();
  int32_t my_bad = INT_MAX;
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) my_bad = min(my_bad, block_bad[b]);
  atomicMin(&bad, my_bad);
  const int e = threadIdx.x;
  if (e < E) {  // exclusive scan down the column of expert e (coalesced across experts)
    int32_t run = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      const int32_t c = counts[b * E + e];
      counts[b * E + e] = run;
      run += c;
    }
    start[e] = run;
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // E <= 1024: a serial scan over the experts
    int64_t offset = 0;
    for (int x = 0; x < E; ++x) {
      const int32_t total = start[x];
      meta[1 + x] = offset;
      start[x] = static_cast<int32_t>(offset);
      offset += total;
    }
    meta[1 + E] = offset;
    meta[0] = bad == INT_MAX ? -1 : bad;
  }
  __syncthreads();
  if (e < E) {
    for (int64_t b = 0; b < blocks; ++b) counts[b * E + e] += start[e];
  }
}

// Each slot's grouped row: its block's base row for its expert, plus the slots of that expert
// in earlier warps of the block, plus the earlier lanes of its warp (token order is kept).
__global__ void routing_scatter_kernel(const int64_t* __restrict__ indices, int64_t n, int E,
                                       const int32_t* __restrict__ base, int32_t* __restrict__ row_of_slot,
                                       int32_t* __restrict__ slot_of_row) {
  constexpr int kWarps = kMoeRoutingBlock / 32;
  extern __shared__ int32_t warp_count[];  // (kWarps, E)
  for (int i = threadIdx.x; i < kWarps * E; i += blockDim.x) warp_count[i] = 0;
  __syncthreads();
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kMoeRoutingBlock + threadIdx.x;
  int e = -1;
  if (s < n) {
    const int64_t v = indices[s];
    e = v >= 0 && v < E ? static_cast<int>(v) : -1;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned peers = __match_any_sync(kFull, e);
  const int rank = __popc(peers & ((1u << lane) - 1u));
  if (e >= 0 && rank == 0) warp_count[warp * E + e] = __popc(peers);
  __syncthreads();
  if (s >= n) return;
  if (e < 0) {
    row_of_slot[s] = -1;
    return;
  }
  int32_t row = base[static_cast<int64_t>(blockIdx.x) * E + e] + rank;
  for (int w = 0; w < warp; ++w) row += warp_count[w * E + e];
  row_of_slot[s] = row;
  slot_of_row[row] = static_cast<int32_t>(s);
}

}  // namespace

cudaError_t launch_moe_topk_softmax(const MoeTopkSoftmaxParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((p.tokens + kTopkWarps - 1) / kTopkWarps);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    topk_softmax_kernel<T><<<blocks, kTopkWarps * 32, 0, stream>>>(
        static_cast<const T*>(p.logits), p.tokens, p.num_experts, p.k, p.weights, p.indices,
        reinterpret_cast<unsigned long long*>(p.bad_row));
    return cudaGetLastError();
  });
}

cudaError_t launch_moe_routing(const MoeRoutingParams& p, cudaStream_t stream) {
  const int64_t blocks = moe_routing_blocks(p.num_slots);
  const int E = p.num_experts;
  int32_t* counts = p.scratch;                // (blocks, E)
  int32_t* block_bad = p.scratch + blocks * E;  // (blocks)
  if (blocks > 0) {
    routing_count_kernel<<<static_cast<unsigned>(blocks), kMoeRoutingBlock, E * sizeof(int32_t), stream>>>(
        p.indices, p.num_slots, E, counts, block_bad);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  routing_scan_kernel<<<1, kMoeMaxExperts, 0, stream>>>(counts, block_bad, blocks, E, p.meta);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  if (blocks > 0) {
    const size_t smem = (kMoeRoutingBlock / 32) * E * sizeof(int32_t);
    routing_scatter_kernel<<<static_cast<unsigned>(blocks), kMoeRoutingBlock, smem, stream>>>(
        p.indices, p.num_slots, E, counts, p.row_of_slot, p.slot_of_row);
  }
  return cudaGetLastError();
}

}  // namespace moediffuseq::cuda
