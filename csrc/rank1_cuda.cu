// Perfusion's gated rank-one edit on CUDA, M concept slots per row.
//
// Semantics: impasto.kernels.rank1_edit. One block per (row, token): the token's encoding is
// staged in shared memory as fp32, each warp computes some of the 2M stacked coefficients
// ([P; G] . e, a lane-strided dot and a shuffle reduction), the gate is applied, and the
// block's threads write out[n] = base[n] + sum_c c[c] * [WU; O][c, n], rounded once. Both
// products are fp32 (s(e) is a ratio that fp16 ruins). A prompt's 77 tokens make rows * 77
// blocks, enough to fill a GPU for the batches the engine runs.

#include "cuda_utils.cuh"

namespace impasto_native {
namespace cuda {
namespace {

constexpr int kRank1Threads = 128;

template <typename T>
__global__ void __launch_bounds__(kRank1Threads) rank1_kernel(
    const T* __restrict__ base, const T* __restrict__ e, const float* __restrict__ PG, const float* __restrict__ WO,
    const float* __restrict__ beta, const float* __restrict__ tau, T* __restrict__ out, int64_t tokens, int64_t D,
    int64_t N, int64_t M) {
  extern __shared__ float ev[];  // [D]
  __shared__ float cv[2 * kMaxRank1Slots];
  const int64_t item = blockIdx.x, r = item / tokens, C = 2 * M;
  for (int64_t d = threadIdx.x; d < D; d += kRank1Threads) ev[d] = to_f(e[item * D + d]);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t c = warp; c < C; c += kRank1Threads / 32) {
    const float* w = PG + (r * C + c) * D;
    float s = 0.f;
    for (int64_t d = lane; d < D; d += 32) s = fmaf(ev[d], w[d], s);
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) {
      if (c < M) {
        cv[c] = -s;
      } else {
        const float z = (s - beta[r * M + c - M]) / tau[r * M + c - M];
        cv[c] = 1.f / (1.f + expf(-z));
      }
    }
  }
  __syncthreads();
  for (int64_t n = threadIdx.x; n < N; n += kRank1Threads) {
    float o = to_f(base[item * N + n]);
    for (int64_t c = 0; c < C; ++c) o = fmaf(cv[c], WO[(r * C + c) * N + n], o);
    out[item * N + n] = from_f<T>(o);
  }
}

}  // namespace

cudaError_t rank1_edit(DType dtype, const void* base, const void* e, const float* PG, const float* WO,
                       const float* beta, const float* tau, void* out, int64_t rows, int64_t T, int64_t D,
                       int64_t N, int64_t M, cudaStream_t stream) {
  if (M > kMaxRank1Slots || D > kMaxRank1Width) return cudaErrorInvalidValue;
  if (rows * T == 0 || N == 0) return cudaSuccess;
  const size_t shared = static_cast<size_t>(D) * sizeof(float);
  IMPASTO_CUDA_DISPATCH(dtype, rank1_kernel<scalar_t><<<static_cast<unsigned>(rows * T), kRank1Threads, shared,
                                                        stream>>>(static_cast<const scalar_t*>(base),
                                                                  static_cast<const scalar_t*>(e), PG, WO, beta,
                                                                  tau, static_cast<scalar_t*>(out), T, D, N, M));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace impasto_native
