// Perfusion's gated rank-one edit on the CPU, M concept slots per row.
//
// Semantics: impasto.kernels.rank1_edit (kernels/rank1.py), token-wise
//   a[m] = P[r, m] . e[r, t],  s[m] = G[r, m] . e[r, t]
//   out[r, t] = base[r, t] - sum_m a[m] WU[r, m] + sum_m sigmoid((s[m] - beta[r, m]) / tau[r, m]) O[r, m]
// with [P; G] and [WU; O] stacked into 2M columns as the Triton kernel does. Both products and the
// sum are fp32 (fp64 for fp64 inputs), out is rounded once: s(e) is a ratio that fp16 ruins.
// One (row, token) per work item; the weights are upcast once per call.
//
// The backward is device-generic ATen code (batched matmuls over the stacked columns).

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
void rank1_kernel(Tensor& out, const Tensor& base, const Tensor& e, const Tensor& PG, const Tensor& WO,
                  const Tensor& beta, const Tensor& tau) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = e.size(0), T = e.size(1), D = e.size(2), N = base.size(2), C = PG.size(1), M = C / 2;
  const scalar_t* ep = e.data_ptr<scalar_t>();
  const scalar_t* bp = base.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const acc_t* pg = PG.data_ptr<acc_t>();
  const acc_t* wo = WO.data_ptr<acc_t>();
  const float* bt = beta.data_ptr<float>();
  const float* ta = tau.data_ptr<float>();
  at::parallel_for(0, rows * T, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ev(D), c(C), o(N);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / T;
      const scalar_t* er = ep + item * D;
      for (const auto d : c10::irange(D)) ev[d] = static_cast<acc_t>(er[d]);
      for (const auto j : c10::irange(C)) {
        const acc_t* w = pg + (r * C + j) * D;
        acc_t dot = 0;
        // a vectorized reduction (partial sums per lane): -fopenmp-simd, no OpenMP runtime
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += ev[d] * w[d];
        if (j < M) {
          c[j] = -dot;
        } else {
          const acc_t z = (dot - static_cast<acc_t>(bt[r * M + j - M])) / static_cast<acc_t>(ta[r * M + j - M]);
          c[j] = acc_t(1) / (acc_t(1) + std::exp(-z));
        }
      }
      const scalar_t* br = bp + item * N;
      for (const auto n : c10::irange(N)) o[n] = static_cast<acc_t>(br[n]);
      for (const auto j : c10::irange(C)) {
        const acc_t cj = c[j];
        const acc_t* w = wo + (r * C + j) * N;
        for (const auto n : c10::irange(N)) o[n] = std::fma(cj, w[n], o[n]);
      }
      scalar_t* orow = op + item * N;
      for (const auto n : c10::irange(N)) orow[n] = static_cast<scalar_t>(o[n]);
    }
  });
}

}  // namespace

void check_rank1(const Tensor& base, const Tensor& e, const Tensor& P, const Tensor& WU, const Tensor& G,
                 const Tensor& O, const Tensor& beta, const Tensor& tau) {
  TORCH_CHECK(base.dim() == 3 && e.dim() == 3 && base.size(0) == e.size(0) && base.size(1) == e.size(1),
              "impasto_native rank1_edit: base must be [rows, T, N] and e [rows, T, D], got ", base.sizes(),
              " and ", e.sizes());
  const int64_t rows = base.size(0), N = base.size(2), D = e.size(2);
  TORCH_CHECK(P.dim() == 3 && P.size(0) == rows && P.size(2) == D,
              "impasto_native rank1_edit: P must be [rows=", rows, ", M, D=", D, "], got ", P.sizes());
  const int64_t M = P.size(1);
  TORCH_CHECK(G.sizes() == P.sizes(), "impasto_native rank1_edit: G must be ", P.sizes(), ", got ", G.sizes());
  TORCH_CHECK(WU.dim() == 3 && WU.size(0) == rows && WU.size(1) == M && WU.size(2) == N && O.sizes() == WU.sizes(),
              "impasto_native rank1_edit: WU and O must be [", rows, ", ", M, ", ", N, "], got ", WU.sizes(),
              " and ", O.sizes());
  for (const Tensor* t : {&beta, &tau}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == rows && t->size(1) == M && t->scalar_type() == at::kFloat,
                "impasto_native rank1_edit: beta and tau must be float32 [", rows, ", ", M, "], got ",
                t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK(base.scalar_type() == e.scalar_type(), "impasto_native rank1_edit: base and e must share a dtype, got ",
              base.scalar_type(), " and ", e.scalar_type());
  const auto w = P.scalar_type();
  TORCH_CHECK(WU.scalar_type() == w && G.scalar_type() == w && O.scalar_type() == w &&
                  (w == e.scalar_type() || w == at::kFloat),
              "impasto_native rank1_edit: P, WU, G, O must share one dtype, e's or float32");
  for (const Tensor* t : {&e, &P, &WU, &G, &O, &beta, &tau}) {
    TORCH_CHECK(t->device() == base.device(), "impasto_native rank1_edit: every tensor must be on ", base.device());
  }
}

Tensor rank1_edit_cpu(const Tensor& base_in, const Tensor& e_in, const Tensor& P, const Tensor& WU, const Tensor& G,
                      const Tensor& O, const Tensor& beta_in, const Tensor& tau_in) {
  check_rank1(base_in, e_in, P, WU, G, O, beta_in, tau_in);
  const Tensor base = base_in.contiguous(), e = e_in.contiguous();
  const Tensor beta = beta_in.contiguous(), tau = tau_in.contiguous();
  Tensor out = new_output(base.sizes(), base.options());
  if (out.numel() == 0) return out;
  const auto acc = at::toOpMathType(e.scalar_type());
  const Tensor PG = at::cat({P, G}, 1).to(acc).contiguous();   // [rows, 2M, D]
  const Tensor WO = at::cat({WU, O}, 1).to(acc).contiguous();  // [rows, 2M, N]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "impasto_native::rank1_edit", [&] {
    rank1_kernel<scalar_t>(out, base, e, PG, WO, beta, tau);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rank1_edit_backward(const Tensor& dy, const Tensor& e,
                                                                       const Tensor& P, const Tensor& WU,
                                                                       const Tensor& G, const Tensor& O,
                                                                       const Tensor& beta, const Tensor& tau) {
  check_rank1(dy, e, P, WU, G, O, beta, tau);
  const int64_t M = P.size(1);
  const auto cdt = at::promote_types(e.scalar_type(), at::kFloat);
  const Tensor ec = e.to(cdt), dyc = dy.to(cdt);
  const Tensor PG = at::cat({P, G}, 1).to(cdt);   // [rows, 2M, D]
  const Tensor WO = at::cat({WU, O}, 1).to(cdt);  // [rows, 2M, N]
  const Tensor coef = at::bmm(ec, PG.transpose(1, 2));  // [rows, T, 2M]
  const Tensor b = beta.to(cdt).unsqueeze(1), t = tau.to(cdt).unsqueeze(1);  // [rows, 1, M]
  const Tensor gate = at::sigmoid((coef.narrow(2, M, M) - b) / t);
  const Tensor c = at::cat({-coef.narrow(2, 0, M), gate}, 2);
  const Tensor dc = at::cat({at::full_like(gate, -1.0), gate * (1 - gate) / t}, 2);
  const Tensor dcoef = at::bmm(dyc, WO.transpose(1, 2)) * dc;  // [rows, T, 2M]
  const Tensor de = at::bmm(dcoef, PG);                        // [rows, T, D]
  const Tensor dPG = at::bmm(dcoef.transpose(1, 2), ec);       // [rows, 2M, D]
  const Tensor dWO = at::bmm(c.transpose(1, 2), dyc);          // [rows, 2M, N]
  // copy = true: the four weight gradients are slices of two tensors and must not alias.
  auto part = [](const Tensor& t, int64_t start, int64_t len, at::ScalarType dt) {
    return t.narrow(1, start, len).to(dt, /*non_blocking=*/false, /*copy=*/true).contiguous();
  };
  return {de.to(e.scalar_type()), part(dPG, 0, M, P.scalar_type()), part(dWO, 0, M, WU.scalar_type()),
          part(dPG, M, M, G.scalar_type()), part(dWO, M, M, O.scalar_type())};
}

}  // namespace impasto_native
