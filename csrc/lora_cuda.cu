// Multi-adapter LoRA on CUDA: Punica's shrink + expand, as kernels/lora.py's Triton pair.
//
// Semantics: impasto.kernels.lora_apply. shrink: one block per (group of pairs sharing a slot,
// 32 gathered tokens): the tokens of a group's pairs are concatenated, so a slot's weights are
// staged in shared memory once per block whatever rows use it (segment-sorted rows, one launch
// per rank bucket). The rank-R intermediate is fp32 (vllm#2893). expand: one block per (row, 32
// tokens, 64 outputs) sums the row's M adapters and is the only writer of its tile: no atomics,
// one rounding, rows without an adapter untouched. Products use explicit fmaf (the file is
// built with -fmad=false for the guidance blend's sake).

#include "cuda_utils.cuh"

namespace impasto_native {
namespace cuda {
namespace {

constexpr int kShrinkT = 32;  // gathered tokens per block
constexpr int kShrinkK = 32;  // input features per shared-memory step
constexpr int kShrinkPer = kShrinkT * kMaxRank / kThreads;  // outputs per thread at R = kMaxRank

template <typename T>
__global__ void __launch_bounds__(kThreads) lora_shrink_kernel(
    const T* __restrict__ x,            // [rows, T, K]
    const T* __restrict__ A,            // [S, K, R]
    float* __restrict__ tmp,            // [P, T, R]; written for the pairs of active groups
    const float* __restrict__ scales,   // [P]
    const int32_t* __restrict__ pair_order, const int32_t* __restrict__ group_slot,
    const int32_t* __restrict__ group_start, int64_t tokens, int64_t K, int64_t R, int64_t M) {
  const int g = blockIdx.y;
  const int64_t start = group_start[g];
  const int64_t count = static_cast<int64_t>(group_start[g + 1] - start) * tokens;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.x) * kShrinkT;
  if (tok0 >= count) return;
  const int64_t slot = group_slot[g];
  __shared__ float xs[kShrinkT][kShrinkK + 1];
  __shared__ float as[kShrinkK][kMaxRank];
  __shared__ int64_t x_off[kShrinkT], t_off[kShrinkT];
  __shared__ float t_scale[kShrinkT];
  if (threadIdx.x < kShrinkT) {
    const int64_t idx = tok0 + threadIdx.x;
    if (idx < count) {
      const int64_t pair = pair_order[start + idx / tokens], tok = idx % tokens;
      x_off[threadIdx.x] = ((pair / M) * tokens + tok) * K;
      t_off[threadIdx.x] = (pair * tokens + tok) * R;
      t_scale[threadIdx.x] = scales[pair];
    } else {
      x_off[threadIdx.x] = -1;
      t_off[threadIdx.x] = -1;
      t_scale[threadIdx.x] = 0.f;
    }
  }
  __syncthreads();
  const int outputs = kShrinkT * static_cast<int>(R);  // (token, q), token-major
  float acc[kShrinkPer];
#pragma unroll
  for (int j = 0; j < kShrinkPer; ++j) acc[j] = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += kShrinkK) {
    for (int i = threadIdx.x; i < kShrinkT * kShrinkK; i += kThreads) {
      const int t = i / kShrinkK, kk = i % kShrinkK;
      const int64_t k = k0 + kk;
      xs[t][kk] = (x_off[t] >= 0 && k < K) ? to_f(x[x_off[t] + k]) : 0.f;
    }
    for (int i = threadIdx.x; i < kShrinkK * R; i += kThreads) {
      const int kk = i / R, q = i % R;
      const int64_t k = k0 + kk;
      as[kk][q] = k < K ? to_f(A[(slot * K + k) * R + q]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kShrinkPer; ++j) {
      const int o = threadIdx.x + j * kThreads;
      if (o < outputs) {
        const int t = o / R, q = o % R;
        float s = acc[j];
#pragma unroll 8
        for (int kk = 0; kk < kShrinkK; ++kk) s = fmaf(xs[t][kk], as[kk][q], s);
        acc[j] = s;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < kShrinkPer; ++j) {
    const int o = threadIdx.x + j * kThreads;
    if (o < outputs) {
      const int t = o / R, q = o % R;
      if (t_off[t] >= 0) tmp[t_off[t] + q] = acc[j] * t_scale[t];
    }
  }
}

constexpr int kExpandT = 32;  // tokens per block
constexpr int kExpandN = 64;  // outputs per block
constexpr int kExpandR = 32;  // rank entries per shared-memory step
constexpr int kExpandPer = kExpandT * kExpandN / kThreads;

template <typename T>
__global__ void __launch_bounds__(kThreads) lora_expand_kernel(
    const float* __restrict__ tmp,     // [rows * M, T, R]
    const T* __restrict__ B,           // [S, R, N]
    T* __restrict__ y,                 // [rows, T, N]; updated in place
    const int32_t* __restrict__ slots, // [rows, M]; -1 = none
    int64_t tokens, int64_t N, int64_t R, int64_t M) {
  const int64_t row = blockIdx.y;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kExpandT, n0 = static_cast<int64_t>(blockIdx.z) * kExpandN;
  bool any = false;
  for (int64_t m = 0; m < M; ++m) any |= slots[row * M + m] >= 0;
  if (!any) return;  // the row keeps its exact bits
  __shared__ float ts[kExpandT][kExpandR + 1];
  __shared__ float bs[kExpandR][kExpandN];
  float acc[kExpandPer];
#pragma unroll
  for (int j = 0; j < kExpandPer; ++j) acc[j] = 0.f;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t slot = slots[row * M + m];
    if (slot < 0) continue;  // uniform over the block
    const int64_t pair = row * M + m;
    for (int64_t r0 = 0; r0 < R; r0 += kExpandR) {
      for (int i = threadIdx.x; i < kExpandT * kExpandR; i += kThreads) {
        const int t = i / kExpandR, q = i % kExpandR;
        const int64_t tt = t0 + t, rr = r0 + q;
        ts[t][q] = (tt < tokens && rr < R) ? tmp[(pair * tokens + tt) * R + rr] : 0.f;
      }
      for (int i = threadIdx.x; i < kExpandR * kExpandN; i += kThreads) {
        const int q = i / kExpandN, n = i % kExpandN;
        const int64_t rr = r0 + q, nn = n0 + n;
        bs[q][n] = (rr < R && nn < N) ? to_f(B[(slot * R + rr) * N + nn]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kExpandPer; ++j) {
        const int o = threadIdx.x + j * kThreads;
        const int t = o / kExpandN, n = o % kExpandN;
        float s = acc[j];
#pragma unroll 8
        for (int q = 0; q < kExpandR; ++q) s = fmaf(ts[t][q], bs[q][n], s);
        acc[j] = s;
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int j = 0; j < kExpandPer; ++j) {
    const int o = threadIdx.x + j * kThreads;
    const int64_t tt = t0 + o / kExpandN, nn = n0 + o % kExpandN;
    if (tt < tokens && nn < N) {
      const int64_t idx = (row * tokens + tt) * N + nn;
      y[idx] = from_f<T>(to_f(y[idx]) + acc[j]);
    }
  }
}

}  // namespace

cudaError_t lora_shrink(DType dtype, const void* x, const void* A, float* tmp, const float* scales,
                        const int32_t* pair_order, const int32_t* group_slot, const int32_t* group_start,
                        int64_t groups, int64_t max_pairs, int64_t T, int64_t K, int64_t R, int64_t M,
                        cudaStream_t stream) {
  if (R > kMaxRank) return cudaErrorInvalidValue;
  if (groups == 0 || max_pairs * T == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((max_pairs * T + kShrinkT - 1) / kShrinkT), static_cast<unsigned>(groups));
  IMPASTO_CUDA_DISPATCH(dtype, lora_shrink_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
                                   static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(A), tmp, scales,
                                   pair_order, group_slot, group_start, T, K, R, M));
  return cudaGetLastError();
}

cudaError_t lora_expand(DType dtype, const float* tmp, const void* B, void* y, const int32_t* slots, int64_t rows,
                        int64_t T, int64_t N, int64_t R, int64_t M, cudaStream_t stream) {
  if (rows * T * N == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((T + kExpandT - 1) / kExpandT), static_cast<unsigned>(rows),
                  static_cast<unsigned>((N + kExpandN - 1) / kExpandN));
  IMPASTO_CUDA_DISPATCH(dtype, lora_expand_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
                                   tmp, static_cast<const scalar_t*>(B), static_cast<scalar_t*>(y), slots, T, N, R,
                                   M));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace impasto_native
