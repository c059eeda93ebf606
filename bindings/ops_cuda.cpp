// impasto_native:: CUDA kernels: checks, allocation and streams around csrc/*_cuda.cu's
// launchers. Built only where a CUDA toolkit and a CUDA torch exist (setup.py,
// impasto.kernels.native.build); schemas and CPU kernels are in bindings/ops.cpp.

#include <limits>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../csrc/cuda_launchers.h"
#include "../csrc/native.h"

namespace impasto_native {
namespace {

namespace cu = impasto_native::cuda;

cu::DType device_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat:
      return cu::DType::kFloat32;
    case at::kHalf:
      return cu::DType::kFloat16;
    case at::kBFloat16:
      return cu::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "impasto_native ", op, ": No suitable kernel: dtype ", t,
                  " on CUDA (float32, float16, bfloat16 only)");
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "impasto_native ", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

void lora_apply_cuda(Tensor& y, const Tensor& x_in, const Tensor& A_in, const Tensor& B_in, const Tensor& slots_in,
                     const Tensor& scales_in, const Tensor& pair_order, const Tensor& group_slot,
                     const Tensor& group_start, const Tensor& stats) {
  check_lora(y, x_in, A_in, B_in, slots_in, scales_in, stats);
  const int64_t groups = stats[0].item<int64_t>(), max_pairs = stats[1].item<int64_t>();
  if (groups == 0 || y.numel() == 0) return;
  const int64_t R = A_in.size(2);
  TORCH_CHECK(R <= cu::kMaxRank, "impasto_native lora_apply_: No suitable kernel: rank bucket R=", R, " > ",
              cu::kMaxRank);
  TORCH_CHECK(pair_order.device() == x_in.device() && group_slot.device() == x_in.device() &&
                  group_start.device() == x_in.device(),
              "impasto_native lora_apply_: the meta tensors must be on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto dt = device_dtype(x_in.scalar_type(), "lora_apply_");
  const Tensor x = x_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous();
  const Tensor slots = slots_in.contiguous(), scales = scales_in.contiguous();
  const Tensor po = pair_order.contiguous(), gs = group_slot.contiguous(), gst = group_start.contiguous();
  const int64_t rows = x.size(0), T = x.size(1), K = x.size(2), N = B.size(2), M = slots.size(1);
  Tensor tmp = new_output({rows * M, T, R}, x.options().dtype(at::kFloat));
  check_launch(cu::lora_shrink(dt, x.data_ptr(), A.data_ptr(), tmp.data_ptr<float>(), scales.data_ptr<float>(),
                               po.data_ptr<int32_t>(), gs.data_ptr<int32_t>(), gst.data_ptr<int32_t>(), groups,
                               max_pairs, T, K, R, M, stream),
               "lora_apply_ (shrink)");
  Tensor yc = y.is_contiguous() ? y : y.contiguous();
  check_launch(cu::lora_expand(dt, tmp.data_ptr<float>(), B.data_ptr(), yc.data_ptr(), slots.data_ptr<int32_t>(),
                               rows, T, N, R, M, stream),
               "lora_apply_ (expand)");
  if (!yc.is_same(y)) y.copy_(yc);
}

void guidance_blend_cuda(Tensor& out, const Tensor& noise, const Tensor& uncond_row, const Tensor& cond_row,
                         const Tensor& style_rows, const Tensor& style_weights, const Tensor& cfg,
                         const Tensor& rescale, const Tensor& stats) {
  check_guidance(out, noise, uncond_row, cond_row, style_rows, style_weights, cfg, rescale, stats);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(noise.device());
  Tensor x = noise.reshape({noise.size(0), -1});
  if (x.stride(1) != 1) x = x.contiguous();
  const int64_t J = out.size(0), L = x.size(1), S = style_rows.size(1);
  const bool any_rescale = stats[1].item<int64_t>() > 0;
  Tensor ws = new_output({any_rescale ? J : 1, any_rescale ? cu::guidance_blocks(L) : 1, 4},
                         noise.options().dtype(at::kDouble));
  check_launch(cu::guidance_blend(device_dtype(x.scalar_type(), "guidance_blend_"), x.data_ptr(), x.stride(0),
                                  out.data_ptr(), uncond_row.data_ptr<int32_t>(), cond_row.data_ptr<int32_t>(),
                                  style_rows.data_ptr<int32_t>(), style_weights.data_ptr<float>(),
                                  cfg.data_ptr<float>(), rescale.data_ptr<float>(), J, L, S, any_rescale,
                                  ws.data_ptr<double>(), c10::cuda::getCurrentCUDAStream()),
               "guidance_blend_");
}

Tensor rank1_edit_cuda(const Tensor& base_in, const Tensor& e_in, const Tensor& P, const Tensor& WU, const Tensor& G,
                       const Tensor& O, const Tensor& beta_in, const Tensor& tau_in) {
  check_rank1(base_in, e_in, P, WU, G, O, beta_in, tau_in);
  const int64_t M = P.size(1), D = e_in.size(2);
  TORCH_CHECK(M <= cu::kMaxRank1Slots && D <= cu::kMaxRank1Width, "impasto_native rank1_edit: No suitable kernel: M=",
              M, " (max ", cu::kMaxRank1Slots, "), D=", D, " (max ", cu::kMaxRank1Width, ")");
  const c10::cuda::CUDAGuard guard(e_in.device());
  const Tensor base = base_in.contiguous(), e = e_in.contiguous();
  const Tensor beta = beta_in.contiguous(), tau = tau_in.contiguous();
  const Tensor PG = at::cat({P, G}, 1).to(at::kFloat).contiguous();
  const Tensor WO = at::cat({WU, O}, 1).to(at::kFloat).contiguous();
  Tensor out = new_output(base.sizes(), base.options());
  check_launch(cu::rank1_edit(device_dtype(e.scalar_type(), "rank1_edit"), base.data_ptr(), e.data_ptr(),
                              PG.data_ptr<float>(), WO.data_ptr<float>(), beta.data_ptr<float>(),
                              tau.data_ptr<float>(), out.data_ptr(), base.size(0), base.size(1), D, base.size(2), M,
                              c10::cuda::getCurrentCUDAStream()),
               "rank1_edit");
  return out;
}

}  // namespace
}  // namespace impasto_native

TORCH_LIBRARY_IMPL(impasto_native, CUDA, m) {
  m.impl("lora_apply_", &impasto_native::lora_apply_cuda);
  m.impl("lora_delta", &impasto_native::lora_delta);
  m.impl("lora_delta_backward", &impasto_native::lora_delta_backward);
  m.impl("guidance_blend_", &impasto_native::guidance_blend_cuda);
  m.impl("rank1_edit", &impasto_native::rank1_edit_cuda);
  m.impl("rank1_edit_backward", &impasto_native::rank1_edit_backward);
}
