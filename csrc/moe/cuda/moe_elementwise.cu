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
  for_each_pack<V>(p.rows, p.dim, [&](int64_t r, int64_t c) {
    const int32_t slot = p.slot_of_row[r];
    const T* in = static_cast<const T*>(p.src) + (slot / p.k) * p.dim + c;
    T* out = static_cast<T*>(p.dst) + r * p.dim + c;
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
  });
}

template <typename T, int V>
__global__ void combine_kernel(MoeCombineParams p) {
  const T* rows = static_cast<const T*>(p.rows);
  for_each_pack<V>(p.tokens, p.dim, [&](int64_t t, int64_t c) {
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
    store_float<T, V>(static_cast<T*>(p.out) + t * p.dim + c, acc);
  });
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

// The activation kernel of `act`, forward or backward, for elements T in packs of V.
template <bool kBackward, typename T, int V, MoeActivation kAct>
auto activation_kernel() {
  if constexpr (kBackward) {
    return &activation_backward_kernel<T, V, kAct>;
  } else {
    return &activation_forward_kernel<T, V, kAct>;
  }
}

template <bool kBackward>
cudaError_t launch_activation(const MoeActivationParams& p, std::initializer_list<const void*> ptrs,
                              cudaStream_t stream) {
  return launch_packed(p.dtype, p.rows, p.width, ptrs, kThreads, stream, p, [&](auto tag, auto v) {
    using T = decltype(tag);
    constexpr int V = decltype(v)::value;
    switch (p.act) {
      case MoeActivation::kGelu:
        return activation_kernel<kBackward, T, V, MoeActivation::kGelu>();
      case MoeActivation::kSilu:
        return activation_kernel<kBackward, T, V, MoeActivation::kSilu>();
      default:
        return activation_kernel<kBackward, T, V, MoeActivation::kSwiglu>();
    }
  });
}

}  // namespace

cudaError_t launch_moe_gather(const MoeGatherParams& p, cudaStream_t stream) {
  return launch_packed(p.dtype, p.rows, p.dim, {p.src, p.dst}, kThreads, stream, p,
                       [](auto tag, auto v) { return &gather_kernel<decltype(tag), decltype(v)::value>; });
}

cudaError_t launch_moe_combine(const MoeCombineParams& p, cudaStream_t stream) {
  return launch_packed(p.dtype, p.tokens, p.dim, {p.rows, p.out}, kThreads, stream, p,
                       [](auto tag, auto v) { return &combine_kernel<decltype(tag), decltype(v)::value>; });
}

// One warp per slot (32 threads per grid item).
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
  return launch_activation</*kBackward=*/false>(p, {p.h, p.a}, stream);
}

cudaError_t launch_moe_activation_backward(const MoeActivationParams& p, cudaStream_t stream) {
  return launch_activation</*kBackward=*/true>(p, {p.h, p.a, p.da, p.dh}, stream);
}

}  // namespace moediffuseq::cuda
