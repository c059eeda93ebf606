// Declarations of the native ops (impasto_native::), shared by bindings/ and csrc/.
// Semantics of every op: the Python op of the same name in impasto.kernels (kernels/*.py),
// minus its `backend` argument. CPU kernels live in csrc/<family>.cpp, CUDA kernels in
// csrc/<family>_cuda.cu (raw pointers, no torch headers, so nvcc compiles them in seconds),
// their tensor-level wrappers in bindings/ops_cuda.cpp.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace impasto_native {

using at::Tensor;

// Tests set this (impasto_native::_set_poison): outputs the kernels allocate start as NaN, so an
// element a kernel forgets to write cannot pass.
bool poison();
void set_poison(bool on);
Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// ---- lora (csrc/lora.cpp) ----
void lora_apply_cpu(Tensor& y, const Tensor& x, const Tensor& A_pool, const Tensor& B_pool, const Tensor& slots,
                    const Tensor& scales, const Tensor& pair_order, const Tensor& group_slot,
                    const Tensor& group_start, const Tensor& stats);
// Device-generic (ATen ops): zeros, then the device's lora_apply_ through the dispatcher.
Tensor lora_delta(const Tensor& x, const Tensor& A_pool, const Tensor& B_pool, const Tensor& slots,
                  const Tensor& scales, const Tensor& pair_order, const Tensor& group_slot,
                  const Tensor& group_start, const Tensor& stats);
// Device-generic (ATen matmuls, one per slot group over its concatenated tokens).
std::tuple<Tensor, Tensor, Tensor> lora_delta_backward(const Tensor& dy, const Tensor& x, const Tensor& A_pool,
                                                       const Tensor& B_pool, const Tensor& slots,
                                                       const Tensor& scales, const Tensor& pair_order,
                                                       const Tensor& group_slot, const Tensor& group_start,
                                                       const Tensor& stats);
// Shape, dtype and device checks shared by the CPU and CUDA lora_apply_.
void check_lora(const Tensor& y, const Tensor& x, const Tensor& A_pool, const Tensor& B_pool, const Tensor& slots,
                const Tensor& scales, const Tensor& stats);

// ---- guidance (csrc/guidance.cpp) ----
void guidance_blend_cpu(Tensor& out, const Tensor& noise, const Tensor& uncond_row, const Tensor& cond_row,
                        const Tensor& style_rows, const Tensor& style_weights, const Tensor& cfg,
                        const Tensor& rescale, const Tensor& stats);
void check_guidance(const Tensor& out, const Tensor& noise, const Tensor& uncond_row, const Tensor& cond_row,
                    const Tensor& style_rows, const Tensor& style_weights, const Tensor& cfg,
                    const Tensor& rescale, const Tensor& stats);

// ---- rank1 (csrc/rank1.cpp) ----
Tensor rank1_edit_cpu(const Tensor& base, const Tensor& e, const Tensor& P, const Tensor& WU, const Tensor& G,
                      const Tensor& O, const Tensor& beta, const Tensor& tau);
// Device-generic (ATen batched matmuls).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rank1_edit_backward(const Tensor& dy, const Tensor& e,
                                                                       const Tensor& P, const Tensor& WU,
                                                                       const Tensor& G, const Tensor& O,
                                                                       const Tensor& beta, const Tensor& tau);
void check_rank1(const Tensor& base, const Tensor& e, const Tensor& P, const Tensor& WU, const Tensor& G,
                 const Tensor& O, const Tensor& beta, const Tensor& tau);

}  // namespace impasto_native
