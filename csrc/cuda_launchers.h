// Host launchers of the CUDA kernels (csrc/*_cuda.cu). Plain pointers and sizes, no torch
// headers: nvcc compiles the device code in seconds, and CI compile-checks it on machines with
// no GPU. The tensor-level wrappers (checks, allocation, streams) are in bindings/ops_cuda.cpp.
// Every tensor argument is contiguous unless a stride is passed; every launcher returns the
// launch's cudaError_t.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace impasto_native {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaxRank = 256;         // lora: one shared-memory tile covers the rank bucket
constexpr int kMaxRank1Slots = 64;    // rank1: 2M stacked columns in shared memory
constexpr int64_t kMaxRank1Width = 12288;  // rank1: the encoding row (D floats) in shared memory

// lora shrink: tmp[p, t, :] = scales[p] * x[p / M, t] @ A[slot(p)] for the pairs of every group.
// x [rows, T, K], A [S, K, R], tmp fp32 [rows * M, T, R], scales fp32 [rows * M].
cudaError_t lora_shrink(DType dtype, const void* x, const void* A, float* tmp, const float* scales,
                        const int32_t* pair_order, const int32_t* group_slot, const int32_t* group_start,
                        int64_t groups, int64_t max_pairs, int64_t T, int64_t K, int64_t R, int64_t M,
                        cudaStream_t stream);

// lora expand: y[r, t] = round(y[r, t] + sum_m tmp[r * M + m, t] @ B[slots[r, m]]), rows with no
// slot untouched. tmp fp32 [rows * M, T, R], B [S, R, N], y [rows, T, N], slots int32 [rows, M].
cudaError_t lora_expand(DType dtype, const float* tmp, const void* B, void* y, const int32_t* slots, int64_t rows,
                        int64_t T, int64_t N, int64_t R, int64_t M, cudaStream_t stream);

// guidance blend over x [rows, L] (row stride x_stride, elements contiguous) into out [J, L].
// workspace: double [J, blocks(L), 4], used only when any_rescale.
int64_t guidance_blocks(int64_t L);
cudaError_t guidance_blend(DType dtype, const void* x, int64_t x_stride, void* out, const int32_t* uncond_row,
                           const int32_t* cond_row, const int32_t* style_rows, const float* style_weights,
                           const float* cfg, const float* rescale, int64_t J, int64_t L, int64_t S,
                           bool any_rescale, double* workspace, cudaStream_t stream);

// rank1 edit: out = base - sum_m (P_m . e) WU_m + sum_m sigmoid((G_m . e - beta_m) / tau_m) O_m.
// base, out [rows, T, N]; e [rows, T, D]; PG fp32 [rows, 2M, D] = [P; G]; WO fp32 [rows, 2M, N]
// = [WU; O]; beta, tau fp32 [rows, M].
cudaError_t rank1_edit(DType dtype, const void* base, const void* e, const float* PG, const float* WO,
                       const float* beta, const float* tau, void* out, int64_t rows, int64_t T, int64_t D,
                       int64_t N, int64_t M, cudaStream_t stream);

}  // namespace cuda
}  // namespace impasto_native
