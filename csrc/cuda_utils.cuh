// Device helpers shared by csrc/*_cuda.cu: dtype conversion through fp32 and the dtype switch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_launchers.h"

namespace impasto_native {
namespace cuda {

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kThreads = 256;

// Runs BODY with `scalar_t` bound to the device type of `dtype`.
#define IMPASTO_CUDA_DISPATCH(dtype, ...)             \
  switch (dtype) {                                    \
    case DType::kFloat32: {                           \
      using scalar_t = float;                         \
      __VA_ARGS__;                                    \
      break;                                          \
    }                                                 \
    case DType::kFloat16: {                           \
      using scalar_t = __half;                        \
      __VA_ARGS__;                                    \
      break;                                          \
    }                                                 \
    case DType::kBFloat16: {                          \
      using scalar_t = __nv_bfloat16;                 \
      __VA_ARGS__;                                    \
      break;                                          \
    }                                                 \
    default:                                          \
      return cudaErrorInvalidValue;                   \
  }

}  // namespace cuda
}  // namespace impasto_native
