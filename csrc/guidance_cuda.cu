// Guidance blend on CUDA: the two passes of kernels/guidance.py's Triton pair.
//
// Semantics: impasto.kernels.guidance_blend_ref. Grid (latent, block of L): pass 1 writes each
// block's mean and centered sum of squares (M2, two-pass within the block, in double) of e and
// e_c, only for latents with rescale > 0; pass 2 merges a latent's blocks with Chan's exact
// formula, recomputes its block of e from the inputs and writes e * the rescale factor, rounded
// once. Built with -fmad=false: diffusers' op order rounds as PyTorch's separate ops do, so fp32
// without rescale equals its CFG bit for bit.

#include "cuda_utils.cuh"

namespace impasto_native {
namespace cuda {
namespace {

constexpr int64_t kBlockL = 4096;  // elements per block of a latent

template <typename T>
__device__ __forceinline__ float guided(const T* __restrict__ x, int64_t xs, int64_t l, int32_t u, int32_t c,
                                        const int32_t* __restrict__ srows, const float* __restrict__ sw, int64_t S,
                                        float cfg, float& e_c) {
  e_c = to_f(x[c * xs + l]);
  float e = e_c;
  if (u >= 0) {
    const float e_u = to_f(x[u * xs + l]);
    e = e_u + cfg * (e_c - e_u);
  }
  for (int64_t s = 0; s < S; ++s) {
    const int32_t r = srows[s];
    if (r >= 0) e = e + sw[s] * (to_f(x[r * xs + l]) - e_c);
  }
  return e;
}

__device__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) shared[threadIdx.x] += shared[threadIdx.x + w];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) guidance_stats_kernel(
    const T* __restrict__ x, int64_t xs, double* __restrict__ ws, const int32_t* __restrict__ uncond_row,
    const int32_t* __restrict__ cond_row, const int32_t* __restrict__ style_rows,
    const float* __restrict__ style_weights, const float* __restrict__ cfg, const float* __restrict__ rescale,
    int64_t L, int64_t S, int64_t nb) {
  const int64_t j = blockIdx.x, b = blockIdx.y;
  if (!(rescale[j] > 0.f)) return;
  __shared__ double red[kThreads];
  const int64_t l0 = b * kBlockL, l1 = min(L, l0 + kBlockL);
  const double n = static_cast<double>(l1 - l0);
  const int32_t u = uncond_row[j], c = cond_row[j];
  const int32_t* sr = style_rows + j * S;
  const float* sw = style_weights + j * S;
  double se = 0, sc = 0;
  float e_c;
  for (int64_t l = l0 + threadIdx.x; l < l1; l += kThreads) {
    se += guided(x, xs, l, u, c, sr, sw, S, cfg[j], e_c);
    sc += e_c;
  }
  const double mean_e = block_sum(se, red) / n, mean_c = block_sum(sc, red) / n;
  double m2e = 0, m2c = 0;
  for (int64_t l = l0 + threadIdx.x; l < l1; l += kThreads) {
    const double de = guided(x, xs, l, u, c, sr, sw, S, cfg[j], e_c) - mean_e, dc = e_c - mean_c;
    m2e += de * de;
    m2c += dc * dc;
  }
  m2e = block_sum(m2e, red);
  m2c = block_sum(m2c, red);
  if (threadIdx.x == 0) {
    double* w = ws + (j * nb + b) * 4;
    w[0] = mean_e;
    w[1] = m2e;
    w[2] = mean_c;
    w[3] = m2c;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) guidance_apply_kernel(
    const T* __restrict__ x, int64_t xs, T* __restrict__ out, const double* __restrict__ ws,
    const int32_t* __restrict__ uncond_row, const int32_t* __restrict__ cond_row,
    const int32_t* __restrict__ style_rows, const float* __restrict__ style_weights, const float* __restrict__ cfg,
    const float* __restrict__ rescale, int64_t L, int64_t S, int64_t nb) {
  const int64_t j = blockIdx.x, b = blockIdx.y;
  const float phi = rescale[j];
  __shared__ float ratio;
  if (phi > 0.f) {  // uniform over the block
    if (threadIdx.x == 0) {
      // Chan et al.: mean = sum n_b mean_b / L, M2 = sum M2_b + sum n_b (mean_b - mean)^2
      double mean_e = 0, mean_c = 0;
      for (int64_t i = 0; i < nb; ++i) {
        const double n_i = static_cast<double>(min(L - i * kBlockL, kBlockL));
        mean_e += n_i * ws[i * 4 + j * nb * 4 + 0];
        mean_c += n_i * ws[i * 4 + j * nb * 4 + 2];
      }
      mean_e /= L;
      mean_c /= L;
      double m2e = 0, m2c = 0;
      for (int64_t i = 0; i < nb; ++i) {
        const double* w = ws + (j * nb + i) * 4;
        const double n_i = static_cast<double>(min(L - i * kBlockL, kBlockL));
        m2e += w[1] + n_i * (w[0] - mean_e) * (w[0] - mean_e);
        m2c += w[3] + n_i * (w[2] - mean_c) * (w[2] - mean_c);
      }
      const float std_e = static_cast<float>(sqrt(m2e / (L - 1)));
      const float std_c = static_cast<float>(sqrt(m2c / (L - 1)));
      ratio = std_c / std_e;
    }
    __syncthreads();
  }
  const int64_t l0 = b * kBlockL, l1 = min(L, l0 + kBlockL);
  const int32_t u = uncond_row[j], c = cond_row[j];
  const int32_t* sr = style_rows + j * S;
  const float* sw = style_weights + j * S;
  float e_c;
  for (int64_t l = l0 + threadIdx.x; l < l1; l += kThreads) {
    float e = guided(x, xs, l, u, c, sr, sw, S, cfg[j], e_c);
    if (phi > 0.f) e = phi * (e * ratio) + (1.f - phi) * e;  // diffusers' rescale_noise_cfg
    out[j * L + l] = from_f<T>(e);
  }
}

}  // namespace

int64_t guidance_blocks(int64_t L) { return (L + kBlockL - 1) / kBlockL; }

cudaError_t guidance_blend(DType dtype, const void* x, int64_t x_stride, void* out, const int32_t* uncond_row,
                           const int32_t* cond_row, const int32_t* style_rows, const float* style_weights,
                           const float* cfg, const float* rescale, int64_t J, int64_t L, int64_t S,
                           bool any_rescale, double* workspace, cudaStream_t stream) {
  if (J == 0 || L == 0) return cudaSuccess;
  const int64_t nb = guidance_blocks(L);
  const dim3 grid(static_cast<unsigned>(J), static_cast<unsigned>(nb));
  IMPASTO_CUDA_DISPATCH(dtype, {
    const auto* xp = static_cast<const scalar_t*>(x);
    if (any_rescale) {
      guidance_stats_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          xp, x_stride, workspace, uncond_row, cond_row, style_rows, style_weights, cfg, rescale, L, S, nb);
    }
    guidance_apply_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(xp, x_stride, static_cast<scalar_t*>(out),
                                                                  workspace, uncond_row, cond_row, style_rows,
                                                                  style_weights, cfg, rescale, L, S, nb);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace impasto_native
