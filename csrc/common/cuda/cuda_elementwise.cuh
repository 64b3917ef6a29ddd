// Device helpers of the memory-bound CUDA kernels (MoE gather/combine/activations, diffusion
// steps): element types, float conversion, 16-byte packs, dtype and vector-width dispatch.
// Torch-free; included by csrc/*/cuda/*.cu only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common/dtype.h"

namespace moediffuseq::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// V elements loaded and stored as one aligned access (16 bytes when V = 16 / sizeof(T)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_float(const T* p, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_float(pk.v[j]);
}

template <typename T, int V>
__device__ __forceinline__ void store_float(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int j = 0; j < V; ++j) pk.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

template <typename T, int V>
__device__ __forceinline__ void copy_pack(const T* src, T* dst) {
  *reinterpret_cast<Pack<T, V>*>(dst) = *reinterpret_cast<const Pack<T, V>*>(src);
}

// Elements per 16-byte access.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// f(T{}) with T the element type of `dtype` (float, __nv_bfloat16, __half).
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
    case DType::kFloat16:
      return f(__half{});
  }
  return cudaErrorInvalidValue;
}

// f(std::integral_constant<int, V>{}) with V = kVec<T> when `vectorise`, else 1.
template <typename T, typename F>
cudaError_t dispatch_vec(bool vectorise, F&& f) {
  if (vectorise) return f(std::integral_constant<int, kVec<T>>{});
  return f(std::integral_constant<int, 1>{});
}

// f(r, c) for every pack of V elements (row r, first column c) of a (rows, width) grid of
// elements, width a multiple of V: the grid-stride loop of the elementwise kernels.
template <int V, typename F>
__device__ __forceinline__ void for_each_pack(int64_t rows, int64_t width, const F& f) {
  const int64_t packs = width / V, total = rows * packs;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / packs;
    f(r, (i - r * packs) * V);
  }
}

// Blocks of `threads` for a grid-stride loop over n items (at least one block).
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > (1 << 20) ? (1 << 20) : blocks));
}

// Launches pick(T{}, std::integral_constant<int, V>{}) -- a pointer to a kernel taking `p` -- on
// rows x width elements in packs of V (one grid-stride item per pack): T the element type of
// `dtype`, V = kVec<T> when `width` is a multiple of it and every non-null pointer of `ptrs` is
// 16-byte aligned, else 1. Nothing is launched for an empty grid.
template <typename P, typename Pick>
cudaError_t launch_packed(DType dtype, int64_t rows, int64_t width, std::initializer_list<const void*> ptrs,
                          int threads, cudaStream_t stream, const P& p, const Pick& pick) {
  if (rows == 0 || width == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    bool vectorise = width % kVec<T> == 0;
    for (const void* ptr : ptrs) vectorise = vectorise && (ptr == nullptr || aligned16(ptr));
    return dispatch_vec<T>(vectorise, [&](auto v) {
      const auto kernel = pick(tag, v);
      kernel<<<grid_for(rows * (width / decltype(v)::value), threads), threads, 0, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

}  // namespace moediffuseq::cuda
