// Multi-adapter LoRA on the CPU: y[r] += sum_m scales[r, m] * (x[r] @ A[s]) @ B[s], s = slots[r, m].
//
// Semantics: impasto.kernels.lora_apply (kernels/lora.py). Punica's shrink + expand, fused per
// (row, token block): the block's x is read once, its rank-R intermediates (fp32, every adapter
// of the row side by side) stay in a small thread-local buffer, and its y is read, summed over
// the row's adapters and rounded once. Rows without an adapter are not touched (their bits
// stay). The used slots' weights are upcast once per call, never per row, so distinct adapters
// per row cost what one shared adapter costs. Work is split over (row, token block) with
// at::parallel_for; the inner loops run over R and N, contiguous, and are vectorized by the
// compiler (explicit fma: the extension is built with -ffp-contract=off for the guidance blend).
//
// The backward is device-generic ATen code: one group of pairs per slot (meta's grouping),
// each group's tokens concatenated into one matmul, so a slot's weight gradient is one
// reduction, without atomics.

#include "native.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/irange.h>

namespace impasto_native {

namespace {

constexpr int64_t kTokenBlock = 32;  // tokens per work item: the intermediates fit in L1
constexpr int64_t kNChunk = 256;     // outputs per expand pass: [kTokenBlock, kNChunk] fp32 = 32 KB

template <typename scalar_t>
void lora_apply_kernel(Tensor& y, const Tensor& x_in, const Tensor& A_pool, const Tensor& B_pool,
                       const Tensor& slots_in, const Tensor& scales_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tensor x = x_in.contiguous();
  const Tensor slots = slots_in.to(at::kCPU).contiguous();
  const Tensor scales = scales_in.to(at::kCPU).contiguous();
  const int64_t rows = x.size(0), T = x.size(1), K = x.size(2);
  const int64_t N = B_pool.size(2), R = A_pool.size(2), M = slots.size(1);
  const int32_t* sl = slots.data_ptr<int32_t>();
  const float* sc = scales.data_ptr<float>();

  // Compact the used slots: pair p -> index into the upcast weights (-1: unused pair).
  std::vector<int64_t> used, compact(rows * M, -1);
  for (const auto p : c10::irange(rows * M)) {
    if (sl[p] < 0) continue;
    auto it = std::find(used.begin(), used.end(), static_cast<int64_t>(sl[p]));
    compact[p] = it - used.begin();
    if (it == used.end()) used.push_back(sl[p]);
  }
  if (used.empty()) return;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const Tensor idx = at::tensor(used, at::TensorOptions().dtype(at::kLong));
  const Tensor A = A_pool.index_select(0, idx).to(acc_dtype).contiguous();  // [U, K, R]
  const Tensor B = B_pool.index_select(0, idx).to(acc_dtype).contiguous();  // [U, R, N]
  const acc_t* Ap = A.data_ptr<acc_t>();
  const acc_t* Bp = B.data_ptr<acc_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();

  Tensor yc = y.is_contiguous() ? y : y.contiguous();
  scalar_t* yp = yc.data_ptr<scalar_t>();
  const int64_t blocks = (T + kTokenBlock - 1) / kTokenBlock;

  at::parallel_for(0, rows * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> h(kTokenBlock * M * R);  // [token, adapter, R]
    std::vector<acc_t> out(kTokenBlock * kNChunk);  // [token, N chunk]
    std::vector<int64_t> act_w;  // the row's used pairs: compact weight index
    std::vector<acc_t> act_s;    // and scale
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / blocks, t0 = (item % blocks) * kTokenBlock;
      const int64_t t1 = std::min(T, t0 + kTokenBlock);
      act_w.clear();
      act_s.clear();
      for (const auto m : c10::irange(M)) {
        if (compact[r * M + m] >= 0) {
          act_w.push_back(compact[r * M + m]);
          act_s.push_back(static_cast<acc_t>(sc[r * M + m]));
        }
      }
      const int64_t J = act_w.size();
      if (J == 0) continue;
      const int64_t nt = t1 - t0;
      // shrink: h[t, j, :] = scale_j * x[r, t] @ A[w_j]. k outermost: each row of A is read
      // once per token block (A can be far larger than L1: K * R * 4 bytes).
      std::fill(h.begin(), h.begin() + nt * M * R, acc_t(0));
      for (const auto j : c10::irange(J)) {
        const acc_t* __restrict__ a = Ap + act_w[j] * K * R;
        for (const auto k : c10::irange(K)) {
          const acc_t* __restrict__ ak = a + k * R;
          const scalar_t* __restrict__ xk = xp + (r * T + t0) * K + k;
          for (const auto t : c10::irange(nt)) {
            const acc_t xv = static_cast<acc_t>(xk[t * K]);
            acc_t* __restrict__ hj = h.data() + (t * M + j) * R;
            for (const auto q : c10::irange(R)) hj[q] = std::fma(xv, ak[q], hj[q]);
          }
        }
        for (const auto t : c10::irange(nt)) {
          acc_t* __restrict__ hj = h.data() + (t * M + j) * R;
          for (const auto q : c10::irange(R)) hj[q] *= act_s[j];
        }
      }
      // expand: y[r, t] = round(y[r, t] + sum_j h[t, j, :] @ B[w_j]), in chunks of N so the
      // block's accumulators stay in L1 and each row of B is read once per token block.
      for (int64_t n0 = 0; n0 < N; n0 += kNChunk) {
        const int64_t nn = std::min(kNChunk, N - n0);
        for (const auto t : c10::irange(nt)) {
          const scalar_t* __restrict__ yr = yp + (r * T + t0 + t) * N + n0;
          acc_t* __restrict__ o = out.data() + t * kNChunk;
          for (const auto n : c10::irange(nn)) o[n] = static_cast<acc_t>(yr[n]);
        }
        for (const auto j : c10::irange(J)) {
          for (const auto q : c10::irange(R)) {
            const acc_t* __restrict__ b = Bp + (act_w[j] * R + q) * N + n0;
            for (const auto t : c10::irange(nt)) {
              const acc_t c = h[(t * M + j) * R + q];
              acc_t* __restrict__ o = out.data() + t * kNChunk;
              for (const auto n : c10::irange(nn)) o[n] = std::fma(c, b[n], o[n]);
            }
          }
        }
        for (const auto t : c10::irange(nt)) {
          scalar_t* __restrict__ yr = yp + (r * T + t0 + t) * N + n0;
          const acc_t* __restrict__ o = out.data() + t * kNChunk;
          for (const auto n : c10::irange(nn)) yr[n] = static_cast<scalar_t>(o[n]);
        }
      }
    }
  });
  if (!yc.is_same(y)) y.copy_(yc);
}

}  // namespace

void check_lora(const Tensor& y, const Tensor& x, const Tensor& A_pool, const Tensor& B_pool, const Tensor& slots,
                const Tensor& scales, const Tensor& stats) {
  TORCH_CHECK(x.dim() == 3, "impasto_native lora: x must be [rows, T, K], got ", x.sizes());
  const int64_t rows = x.size(0), T = x.size(1), K = x.size(2);
  TORCH_CHECK(A_pool.dim() == 3 && B_pool.dim() == 3 && A_pool.size(1) == K && B_pool.size(0) == A_pool.size(0) &&
                  B_pool.size(1) == A_pool.size(2),
              "impasto_native lora: pools must be A [S, K=", K, ", R] and B [S, R, N], got ", A_pool.sizes(),
              " and ", B_pool.sizes());
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == rows && slots.scalar_type() == at::kInt,
              "impasto_native lora: slots must be int32 [rows=", rows, ", M], got ", slots.scalar_type(), " ",
              slots.sizes());
  TORCH_CHECK(scales.sizes() == slots.sizes() && scales.scalar_type() == at::kFloat,
              "impasto_native lora: scales must be float32 ", slots.sizes(), ", got ", scales.scalar_type(), " ",
              scales.sizes());
  TORCH_CHECK(x.scalar_type() == A_pool.scalar_type() && x.scalar_type() == B_pool.scalar_type(),
              "impasto_native lora: x, A_pool, B_pool must share a dtype, got ", x.scalar_type(), ", ",
              A_pool.scalar_type(), ", ", B_pool.scalar_type());
  TORCH_CHECK(y.dim() == 3 && y.size(0) == rows && y.size(1) == T && y.size(2) == B_pool.size(2) &&
                  y.scalar_type() == x.scalar_type(),
              "impasto_native lora: y must be ", x.scalar_type(), " [", rows, ", ", T, ", ", B_pool.size(2),
              "], got ", y.scalar_type(), " ", y.sizes());
  TORCH_CHECK(stats.device().is_cpu() && stats.numel() == 5 && stats.scalar_type() == at::kLong,
              "impasto_native lora: stats must be the CPU int64 [5] of lora_meta");
  const auto dev = x.device();
  for (const Tensor* t : {&y, &A_pool, &B_pool, &slots, &scales}) {
    TORCH_CHECK(t->device() == dev, "impasto_native lora: every tensor must be on ", dev, ", got one on ",
                t->device());
  }
}

void lora_apply_cpu(Tensor& y, const Tensor& x, const Tensor& A_pool, const Tensor& B_pool, const Tensor& slots,
                    const Tensor& scales, const Tensor& pair_order, const Tensor& group_slot,
                    const Tensor& group_start, const Tensor& stats) {
  check_lora(y, x, A_pool, B_pool, slots, scales, stats);
  if (stats[0].item<int64_t>() == 0 || y.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "impasto_native::lora_apply_", [&] {
    lora_apply_kernel<scalar_t>(y, x, A_pool, B_pool, slots, scales);
  });
}

Tensor lora_delta(const Tensor& x, const Tensor& A_pool, const Tensor& B_pool, const Tensor& slots,
                  const Tensor& scales, const Tensor& pair_order, const Tensor& group_slot,
                  const Tensor& group_start, const Tensor& stats) {
  Tensor y = at::zeros({x.size(0), x.size(1), B_pool.size(2)}, x.options());
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("impasto_native::lora_apply_", "").typed<void(
      Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
      const Tensor&, const Tensor&, const Tensor&)>();
  op.call(y, x, A_pool, B_pool, slots, scales, pair_order, group_slot, group_start, stats);
  return y;
}

std::tuple<Tensor, Tensor, Tensor> lora_delta_backward(const Tensor& dy, const Tensor& x, const Tensor& A_pool,
                                                       const Tensor& B_pool, const Tensor& slots,
                                                       const Tensor& scales, const Tensor& pair_order,
                                                       const Tensor& group_slot, const Tensor& group_start,
                                                       const Tensor& stats) {
  check_lora(dy, x, A_pool, B_pool, slots, scales, stats);
  const auto cdt = at::promote_types(x.scalar_type(), at::kFloat);
  const int64_t K = x.size(2), N = dy.size(2), R = A_pool.size(2), M = slots.size(1);
  Tensor dx = at::zeros(x.sizes(), x.options().dtype(cdt));
  Tensor dA = at::zeros(A_pool.sizes(), A_pool.options().dtype(cdt));
  Tensor dB = at::zeros(B_pool.sizes(), B_pool.options().dtype(cdt));
  const int64_t groups = stats[0].item<int64_t>();
  if (groups > 0) {
    // The grouping to the host once per backward (one sync on CUDA; training only).
    const Tensor order = pair_order.to(at::kCPU).to(at::kLong);
    const Tensor gslot = group_slot.to(at::kCPU).to(at::kLong);
    const Tensor gstart = group_start.to(at::kCPU).to(at::kLong);
    const int64_t* po = order.data_ptr<int64_t>();
    const int64_t* gs = gslot.data_ptr<int64_t>();
    const int64_t* st = gstart.data_ptr<int64_t>();
    const Tensor flat_scales = scales.reshape({-1});
    for (const auto g : c10::irange(groups)) {
      const int64_t s = gs[g], n = st[g + 1] - st[g];
      std::vector<int64_t> pairs(po + st[g], po + st[g + 1]), prow(n);
      for (const auto i : c10::irange(n)) prow[i] = pairs[i] / M;
      const auto opts = at::TensorOptions().dtype(at::kLong);
      const Tensor pidx = at::tensor(pairs, opts).to(x.device());
      const Tensor ridx = at::tensor(prow, opts).to(x.device());
      const Tensor sp = flat_scales.index_select(0, pidx).to(cdt).view({n, 1, 1});
      const Tensor xg = x.index_select(0, ridx).to(cdt);     // [n, T, K]
      const Tensor dyg = dy.index_select(0, ridx).to(cdt);   // [n, T, N]
      const Tensor As = A_pool.select(0, s).to(cdt);          // [K, R]
      const Tensor Bs = B_pool.select(0, s).to(cdt);          // [R, N]
      const Tensor gq = at::matmul(dyg, Bs.t()) * sp;         // [n, T, R]: scale * dy @ B^T
      const Tensor hq = at::matmul(xg, As) * sp;              // [n, T, R]: scale * x @ A
      dx.index_add_(0, ridx, at::matmul(gq, As.t()));
      dA.select(0, s).copy_(at::mm(xg.reshape({-1, K}).t(), gq.reshape({-1, R})));
      dB.select(0, s).copy_(at::mm(hq.reshape({-1, R}).t(), dyg.reshape({-1, N})));
    }
  }
  return {dx.to(x.scalar_type()), dA.to(A_pool.scalar_type()), dB.to(B_pool.scalar_type())};
}

}  // namespace impasto_native
