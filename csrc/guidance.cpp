// Guidance blend on the CPU: every latent's branch rows become its noise prediction.
//
// Semantics: impasto.kernels.guidance_blend_ref (kernels/guidance.py):
//   e = e_u + cfg * (e_c - e_u)  (or e_c without an uncond row), then e += w_i * (e_s_i - e_c)
//   per style in order, then diffusers' rescale_noise_cfg against e_c where rescale > 0.
// Arithmetic is fp32 (fp64 for fp64 noise) in diffusers' op order; the extension is built with
// -ffp-contract=off, so no mul+add becomes an FMA and fp32 without rescale equals PyTorch's three
// ops bit for bit. The rescale's standard deviations are exact two-pass ones in double (mean, then
// centered sum of squares; unbiased, N - 1, as torch.std), e recomputed per pass rather than
// staged through an activation-sized buffer. One latent per work item (at::parallel_for).

#include "native.h"

#include <cmath>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

namespace impasto_native {

namespace {

template <typename scalar_t>
void guidance_kernel(Tensor& out, const Tensor& x, const Tensor& uncond_row, const Tensor& cond_row,
                     const Tensor& style_rows, const Tensor& style_weights, const Tensor& cfg,
                     const Tensor& rescale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t J = out.size(0), L = x.size(1), S = style_rows.size(1);
  const int64_t xs = x.stride(0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int32_t* ur = uncond_row.data_ptr<int32_t>();
  const int32_t* cr = cond_row.data_ptr<int32_t>();
  const int32_t* sr = style_rows.data_ptr<int32_t>();
  const float* sw = style_weights.data_ptr<float>();
  const float* cf = cfg.data_ptr<float>();
  const float* rs = rescale.data_ptr<float>();

  at::parallel_for(0, J, 1, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> srow(S);
    std::vector<acc_t> sweight(S);
    for (int64_t j = begin; j < end; ++j) {
      const scalar_t* ec = xp + cr[j] * xs;
      const scalar_t* eu = ur[j] >= 0 ? xp + ur[j] * xs : nullptr;
      const acc_t g = static_cast<acc_t>(cf[j]);
      int64_t k = 0;
      for (const auto s : c10::irange(S)) {
        if (sr[j * S + s] >= 0) {
          srow[k] = xp + sr[j * S + s] * xs;
          sweight[k++] = static_cast<acc_t>(sw[j * S + s]);
        }
      }
      auto guided = [&](int64_t l, acc_t& c) {
        c = static_cast<acc_t>(ec[l]);
        acc_t e = c;
        if (eu) {
          const acc_t u = static_cast<acc_t>(eu[l]);
          const acc_t d = c - u;
          const acc_t gd = g * d;
          e = u + gd;
        }
        for (const auto i : c10::irange(k)) {
          const acc_t d = static_cast<acc_t>(srow[i][l]) - c;
          const acc_t wd = sweight[i] * d;
          e = e + wd;
        }
        return e;
      };
      scalar_t* o = op + j * L;
      const acc_t phi = static_cast<acc_t>(rs[j]);
      if (!(phi > 0)) {
        acc_t c;
        for (const auto l : c10::irange(L)) o[l] = static_cast<scalar_t>(guided(l, c));
        continue;
      }
      double sum_e = 0, sum_c = 0;
      acc_t c;
      for (const auto l : c10::irange(L)) {
        sum_e += static_cast<double>(guided(l, c));
        sum_c += static_cast<double>(c);
      }
      const double mean_e = sum_e / L, mean_c = sum_c / L;
      double m2_e = 0, m2_c = 0;
      for (const auto l : c10::irange(L)) {
        const double de = static_cast<double>(guided(l, c)) - mean_e;
        const double dc = static_cast<double>(c) - mean_c;
        m2_e += de * de;
        m2_c += dc * dc;
      }
      const acc_t std_e = static_cast<acc_t>(std::sqrt(m2_e / (L - 1)));
      const acc_t std_c = static_cast<acc_t>(std::sqrt(m2_c / (L - 1)));
      const acc_t ratio = std_c / std_e;
      const acc_t keep = acc_t(1) - phi;
      for (const auto l : c10::irange(L)) {
        const acc_t e = guided(l, c);
        const acc_t a = phi * (e * ratio);
        const acc_t b = keep * e;
        o[l] = static_cast<scalar_t>(a + b);
      }
    }
  });
}

}  // namespace

void check_guidance(const Tensor& out, const Tensor& noise, const Tensor& uncond_row, const Tensor& cond_row,
                    const Tensor& style_rows, const Tensor& style_weights, const Tensor& cfg,
                    const Tensor& rescale, const Tensor& stats) {
  TORCH_CHECK(noise.dim() >= 2, "impasto_native guidance_blend_: noise must be [rows, ...], got ", noise.sizes());
  const int64_t J = cond_row.numel();
  TORCH_CHECK(cond_row.dim() == 1 && uncond_row.sizes() == cond_row.sizes() && cfg.sizes() == cond_row.sizes() &&
                  rescale.sizes() == cond_row.sizes(),
              "impasto_native guidance_blend_: uncond_row, cond_row, cfg, rescale must be [J=", J, "]");
  TORCH_CHECK(style_rows.dim() == 2 && style_rows.size(0) == J && style_weights.sizes() == style_rows.sizes(),
              "impasto_native guidance_blend_: style_rows and style_weights must be [J=", J, ", S], got ",
              style_rows.sizes(), " and ", style_weights.sizes());
  for (const Tensor* t : {&uncond_row, &cond_row, &style_rows}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->device() == noise.device(),
                "impasto_native guidance_blend_: row tables must be contiguous int32 on ", noise.device());
  }
  for (const Tensor* t : {&style_weights, &cfg, &rescale}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device() == noise.device(),
                "impasto_native guidance_blend_: weights, cfg, rescale must be contiguous float32 on ",
                noise.device());
  }
  TORCH_CHECK(stats.device().is_cpu() && stats.numel() == 2 && stats.scalar_type() == at::kLong,
              "impasto_native guidance_blend_: stats must be the CPU int64 [2] of build_branch_table");
  TORCH_CHECK(stats[0].item<int64_t>() <= noise.size(0), "impasto_native guidance_blend_: the table reads ",
              stats[0].item<int64_t>(), " rows, noise has ", noise.size(0));
  std::vector<int64_t> shape(noise.sizes().begin(), noise.sizes().end());
  shape[0] = J;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(shape) && out.scalar_type() == noise.scalar_type() &&
                  out.is_contiguous() && out.device() == noise.device(),
              "impasto_native guidance_blend_: out must be contiguous ", noise.scalar_type(), " ",
              at::IntArrayRef(shape), ", got ", out.scalar_type(), " ", out.sizes());
}

void guidance_blend_cpu(Tensor& out, const Tensor& noise, const Tensor& uncond_row, const Tensor& cond_row,
                        const Tensor& style_rows, const Tensor& style_weights, const Tensor& cfg,
                        const Tensor& rescale, const Tensor& stats) {
  check_guidance(out, noise, uncond_row, cond_row, style_rows, style_weights, cfg, rescale, stats);
  if (out.numel() == 0) return;
  Tensor x = noise.reshape({noise.size(0), -1});
  if (x.stride(1) != 1) x = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "impasto_native::guidance_blend_",
                                  [&] {
                                    Tensor o = out.view({out.size(0), -1});
                                    guidance_kernel<scalar_t>(o, x, uncond_row, cond_row, style_rows,
                                                              style_weights, cfg, rescale);
                                  });
}

}  // namespace impasto_native
