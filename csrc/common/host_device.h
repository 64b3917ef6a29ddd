// MOEDIFFUSEQ_HOST_DEVICE: a small function callable from host code and, when nvcc compiles
// it, from device code; for the torch-free headers that both backends include.
#pragma once

#if defined(__CUDACC__)
#define MOEDIFFUSEQ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOEDIFFUSEQ_HOST_DEVICE inline
#endif
