// soft_absorb_q_sample on the GPU: one pass over (B, L, d) in 16-byte packs where the row
// width allows. The backward writes grad_x0 and reduces grad_m deterministically: each block
// owns a split of the rows and a tile of columns (threads (x, y): x over column packs, y over
// rows), sums its rows in registers and shared memory, and a second kernel adds the splits.
#include "common/cuda/cuda_elementwise.cuh"
#include "diffusion/cuda/diffusion_kernels.h"

namespace moediffuseq::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int V>
__global__ void q_sample_kernel(SoftAbsorbQSampleParams p) {
  const int64_t chunks = p.dim / V, rows = p.batch * p.seqlen, total = rows * chunks;
  T* out = static_cast<T*>(p.out);
  const T* x0 = static_cast<const T*>(p.x0);
  const T* noise = static_cast<const T*>(p.noise);
  const T* m = static_cast<const T*>(p.m);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / chunks, c = (i - row * chunks) * V, at = row * p.dim + c;
    const int64_t b = row / p.seqlen;
    if (!p.target_mask[row]) {
      copy_pack<T, V>(x0 + at, out + at);  // source: x0, bit-exact
    } else if (p.uniform[row] < p.gamma * p.sqrt_1mab[b]) {
      copy_pack<T, V>(m + c, out + at);  // absorbed: m
    } else {
      const float a = p.sqrt_ab[b], s = p.sqrt_1mab[b];
      float x[V], n[V], mf[V], o[V];
      load_float<T, V>(x0 + at, x);
      load_float<T, V>(noise + at, n);
      load_float<T, V>(m + c, mf);
#pragma unroll
      for (int j = 0; j < V; ++j) o[j] = a * (x[j] - mf[j]) + s * n[j] + mf[j];
      store_float<T, V>(out + at, o);
    }
  }
}

// grid (splits, column tiles); block (tx, ty), tx * ty = kThreads; thread (x, y) owns the
// column pack x of the tile and the rows y, y + ty, ... of the split.
template <typename T, int V>
__global__ void q_sample_backward_kernel(SoftAbsorbQSampleBackwardParams p, int64_t rows_per_split) {
  __shared__ float sums[kThreads * V];
  const int64_t rows = p.batch * p.seqlen;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  const bool in_cols = c < p.dim;
  const int64_t row0 = blockIdx.x * rows_per_split;
  const int64_t row1 = row0 + rows_per_split < rows ? row0 + rows_per_split : rows;
  const T* grad = static_cast<const T*>(p.grad);
  T* grad_x0 = static_cast<T*>(p.grad_x0);
  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.f;
  if (in_cols) {
    for (int64_t row = row0 + threadIdx.y; row < row1; row += blockDim.y) {
      const int64_t b = row / p.seqlen, at = row * p.dim + c;
      if (!p.target_mask[row]) {  // source: x_t = x0
        copy_pack<T, V>(grad + at, grad_x0 + at);
        continue;
      }
      float g[V], o[V];
      load_float<T, V>(grad + at, g);
      const bool absorbed = p.uniform[row] < p.gamma * p.sqrt_1mab[b];
      const float a = p.sqrt_ab[b];
      const float wx = absorbed ? 0.f : a, wm = absorbed ? 1.f : 1.f - a;  // x_t = wx x0 + wm m (+ noise)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        o[j] = wx * g[j];
        acc[j] += wm * g[j];
      }
      store_float<T, V>(grad_x0 + at, o);
    }
  }
  // Sum the ty row groups of each column.
#pragma unroll
  for (int j = 0; j < V; ++j) sums[(threadIdx.y * blockDim.x + threadIdx.x) * V + j] = acc[j];
  __syncthreads();
  if (threadIdx.y == 0 && in_cols) {
    for (int y = 1; y < static_cast<int>(blockDim.y); ++y) {
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += sums[(y * blockDim.x + threadIdx.x) * V + j];
    }
    float* out = p.partial + blockIdx.x * p.dim + c;
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = acc[j];
  }
}

__global__ void sum_splits_kernel(const float* __restrict__ partial, int64_t splits, int64_t dim,
                                  float* __restrict__ out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= dim) return;
  float sum = 0.f;
  for (int64_t s = 0; s < splits; ++s) sum += partial[s * dim + c];
  out[c] = sum;
}

}  // namespace

cudaError_t launch_soft_absorb_q_sample(const SoftAbsorbQSampleParams& p, cudaStream_t stream) {
  return launch_packed(p.dtype, p.batch * p.seqlen, p.dim, {p.x0, p.noise, p.m, p.out}, kThreads, stream, p,
                       [](auto tag, auto v) { return &q_sample_kernel<decltype(tag), decltype(v)::value>; });
}

cudaError_t launch_soft_absorb_q_sample_backward(const SoftAbsorbQSampleBackwardParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.seqlen;
  if (p.dim == 0) return cudaSuccess;
  const int64_t splits = soft_absorb_backward_splits(rows);
  if (rows > 0) {
    const cudaError_t err = dispatch_dtype(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      const bool vec = p.dim % kVec<T> == 0 && aligned16(p.grad) && aligned16(p.grad_x0);
      return dispatch_vec<T>(vec, [&](auto v) {
        constexpr int V = decltype(v)::value;
        const int64_t packs = p.dim / V;
        int tx = 32;
        while (tx < kThreads && tx < packs) tx *= 2;
        const dim3 block(tx, kThreads / tx);
        const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>((packs + tx - 1) / tx));
        const int64_t rows_per_split = (rows + splits - 1) / splits;
        q_sample_backward_kernel<T, V><<<grid, block, 0, stream>>>(p, rows_per_split);
        return cudaGetLastError();
      });
    });
    if (err != cudaSuccess) return err;
  } else {
    cudaMemsetAsync(p.partial, 0, sizeof(float) * splits * p.dim, stream);
  }
  sum_splits_kernel<<<static_cast<unsigned>((p.dim + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      p.partial, splits, p.dim, p.grad_m);
  return cudaGetLastError();
}

}  // namespace moediffuseq::cuda
