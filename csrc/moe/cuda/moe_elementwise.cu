// The memory-bound kernels of the MoE layer around its grouped GEMMs: the gather of token rows
// into expert groups, the weighted combine back to tokens (float32 accumulation, no atomics:
// one thread owns an output chunk and reads its k rows), the routing-weight gradient, and the
// activations (forward, and backward fused with the recomputation of the activation).
// Rows are processed in 16-byte packs when the row width and the pointers allow, else by element.
#include <cmath>

#include "common/cuda/cuda_elementwise.cuh"
#include "moe/cuda/moe_kernels.h"

namespace moediffuseq::cuda {
namespace {

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------------------------
// Activations, float32 math, as the CPU kernels (csrc/moe/cpu/moe_activation.h).
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ float tanh_fast(float u) { return 1.f - 2.f / (1.f + expf(2.f * u)); }
__device__ __forceinline__ float gelu(float x) {
  const float t = tanh_fast(kGeluC * (x + kGeluA * x * x * x));
  return 0.5f * x * (1.f + t);
}
__device__ __forceinline__ float gelu_grad(float x) {
  const float t = tanh_fast(kGeluC * (x + kGeluA * x * x * x));
  return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kGeluC * (1.f + 3.f * kGeluA * x * x);
}
__device__ __forceinline__ float silu(float x) { return x * sigmoid(x); }
__device__ __forceinline__ float silu_grad(float x) {
  const float s = sigmoid(x);
  return s * (1.f + x * (1.f - s));
}

// ---------------------------------------------------------------------------------------------
template <typename T, int V>
__global__ void gather_kernel(MoeGatherParams p) {
  const int64_t chunks = p.dim / V, total = p.rows * chunks;
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / chunks, c = (i - r * chunks) * V;
    const int32_t slot = p.slot_of_row[r];
    const T* in = src + (slot / p.k) * p.dim + c;
    T* out = dst + r * p.dim + c;
    if (p.scale) {
      float v[V];
      load_float<T, V>(in, v);
      const float w = p.scale[slot];
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] *= w;
      store_float<T, V>(out, v);
    } else {
      copy_pack<T, V>(in, out);
    }
  }
}

template <typename T, int V>
__global__ void combine_kernel(MoeCombineParams p) {
  const int64_t chunks = p.dim / V, total = p.tokens * chunks;
  const T* rows = static_cast<const T*>(p.rows);
  T* out = static_cast<T*>(p.out);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / chunks, c = (i - t * chunks) * V;
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
    for (int j = 0; j < p.k; ++j) {
      const int32_t row = p.row_of_slot[t * p.k + j];
      if (row < 0) continue;  // dropped slot
      const float w = p.scale ? p.scale[t * p.k + j] : 1.f;
      float x[V];
      load_float<T, V>(rows + static_cast<int64_t>(row) * p.dim + c, x);
#pragma unroll
      for (int q = 0; q < V; ++q) acc[q] += w * x[q];
    }
    store_float<T, V>(out + t * p.dim + c, acc);
  }
}

// One warp per slot.
template <typename T, int V>
__global__ void grad_weights_kernel(MoeGradWeightsParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t slot = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (slot >= p.num_slots) return;
  const int32_t row = p.row_of_slot[slot];
  float sum = 0.f;
  if (row >= 0) {
    const T* a = static_cast<const T*>(p.grad_y) + (slot / p.k) * p.dim;
    const T* b = static_cast<const T*>(p.expert_out) + static_cast<int64_t>(row) * p.dim;
    for (int64_t c = static_cast<int64_t>(lane) * V; c < p.dim; c += 32 * V) {
      float fa[V], fb[V];
      load_float<T, V>(a + c, fa);
      load_float<T, V>(b + c, fb);
#pragma unroll
      for (int j = 0; j < V; ++j) sum = fmaf(fa[j], fb[j], sum);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) p.grad_weights[slot] = sum;  // 0 for a dropped slot
}

template <typename T, int V, MoeActivation kAct>
__global__ void activation_forward_kernel(MoeActivationParams p) {
  const int64_t F = p.width, F1 = kAct == MoeActivation::kSwiglu ? 2 * F : F;
  const int64_t chunks = F / V, total = p.rows * chunks;
  const T* h = static_cast<const T*>(p.h);
  T* a = static_cast<T*>(p.a);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / chunks, c = (i - r * chunks) * V;
    float x[V], out[V];
    load_float<T, V>(h + r * F1 + c, x);
    if constexpr (kAct == MoeActivation::kSwiglu) {
      float up[V];
      load_float<T, V>(h + r * F1 + F + c, up);
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = silu(x[j]) * up[j];
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = kAct == MoeActivation::kGelu ? gelu(x[j]) : silu(x[j]);
    }
    store_float<T, V>(a + r * F + c, out);
  }
}

template <typename T, int V, MoeActivation kAct>
__global__ void activation_backward_kernel(MoeActivationParams p) {
  const int64_t F = p.width, F1 = kAct == MoeActivation::kSwiglu ? 2 * F : F;
  const int64_t chunks = F / V, total = p.rows * chunks;
  const T* h = static_cast<const T*>(p.h);
  const T* da = static_cast<const T*>(p.da);
  T* a = static_cast<T*>(p.a);
  T* dh = static_cast<T*>(p.dh);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / chunks, c = (i - r * chunks) * V;
    float x[V], g[V], out[V], grad[V];
    load_float<T, V>(h + r * F1 + c, x);
    load_float<T, V>(da + r * F + c, g);
    if constexpr (kAct == MoeActivation::kSwiglu) {
      float up[V], grad_up[V];
      load_float<T, V>(h + r * F1 + F + c, up);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float s = silu(x[j]);
        out[j] = s * up[j];
        grad[j] = g[j] * silu_grad(x[j]) * up[j];  // d gate
        grad_up[j] = g[j] * s;                     // d up
      }
      store_float<T, V>(dh + r * F1 + F + c, grad_up);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if constexpr (kAct == MoeActivation::kGelu) {
          out[j] = gelu(x[j]);
          grad[j] = g[j] * gelu_grad(x[j]);
        } else {
          out[j] = silu(x[j]);
          grad[j] = g[j] * silu_grad(x[j]);
        }
      }
    }
    store_float<T, V>(a + r * F + c, out);
    store_float<T, V>(dh + r * F1 + c, grad);
  }
}

template <typename T, int V, template <typename, int, MoeActivation> class Kernel>
cudaError_t launch_activation(const MoeActivationParams& p, cudaStream_t stream) {
  const unsigned grid = grid_for(p.rows * (p.width / V), kThreads);
  switch (p.act) {
    case MoeActivation::kGelu:
      Kernel<T, V, MoeActivation::kGelu>::launch(grid, kThreads, stream, p);
      break;
    case MoeActivation::kSilu:
      Kernel<T, V, MoeActivation::kSilu>::launch(grid, kThreads, stream, p);
      break;
    case MoeActivation::kSwiglu:
      Kernel<T, V, MoeActivation::kSwiglu>::launch(grid, kThreads, stream, p);
      break;
  }
  return cudaGetLastError();
}

template <typename T, int V, MoeActivation kAct>
struct ForwardKernel {
  static void launch(unsigned grid, int threads, cudaStream_t stream, const MoeActivationParams& p) {
    activation_forward_kernel<T, V, kAct><<<grid, threads, 0, stream>>>(p);
  }
};
template <typename T, int V, MoeActivation kAct>
struct BackwardKernel {
  static void launch(unsigned grid, int threads, cudaStream_t stream, const MoeActivationParams& p) {
    activation_backward_kernel<T, V, kAct><<<grid, threads, 0, stream>>>(p);
  }
};

}  // namespace

cudaError_t launch_moe_gather(const MoeGatherParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = p.dim % kVec<T> == 0 && aligned16(p.src) && aligned16(p.dst);
    return dispatch_vec<T>(vec, [&](auto v) {
      constexpr int V = decltype(v)::value;
      gather_kernel<T, V><<<grid_for(p.rows * (p.dim / V), kThreads), kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_moe_combine(const MoeCombineParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.dim == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = p.dim % kVec<T> == 0 && aligned16(p.rows) && aligned16(p.out);
    return dispatch_vec<T>(vec, [&](auto v) {
      constexpr int V = decltype(v)::value;
      combine_kernel<T, V><<<grid_for(p.tokens * (p.dim / V), kThreads), kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_moe_grad_weights(const MoeGradWeightsParams& p, cudaStream_t stream) {
  if (p.num_slots == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = p.dim % kVec<T> == 0 && aligned16(p.grad_y) && aligned16(p.expert_out);
    return dispatch_vec<T>(vec, [&](auto v) {
      constexpr int V = decltype(v)::value;
      const unsigned blocks = static_cast<unsigned>((p.num_slots * 32 + kThreads - 1) / kThreads);
      grad_weights_kernel<T, V><<<blocks, kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_moe_activation_forward(const MoeActivationParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.width == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = p.width % kVec<T> == 0 && aligned16(p.h) && aligned16(p.a);
    return dispatch_vec<T>(vec, [&](auto v) { return launch_activation<T, decltype(v)::value, ForwardKernel>(p, stream); });
  });
}

cudaError_t launch_moe_activation_backward(const MoeActivationParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.width == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = p.width % kVec<T> == 0 && aligned16(p.h) && aligned16(p.a) && aligned16(p.da) &&
                     aligned16(p.dh);
    return dispatch_vec<T>(vec, [&](auto v) { return launch_activation<T, decltype(v)::value, BackwardKernel>(p, stream); });
  });
}

}  // namespace moediffuseq::cuda
