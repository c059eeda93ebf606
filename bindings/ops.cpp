// impasto_native:: — the compiled ops, registered with the dispatcher (no pybind: the library is
// loaded with torch.ops.load_library or imported as impasto._native).
//
// Schemas are the Python ops' (impasto::lora_apply_, ...; kernels/*.py) minus `backend`. The
// CPU kernels are registered here; the CUDA ones in bindings/ops_cuda.cpp (built only with a CUDA
// toolkit and a CUDA torch). The backward ops and lora_delta are device-generic ATen code,
// registered for both keys. Fake (meta) kernels are registered from Python
// (impasto.kernels.native), which torch.compile and opcheck use.

#include <Python.h>

#include <torch/library.h>

#include <atomic>
#include <limits>

#include <ATen/ATen.h>

#include "../csrc/native.h"

namespace impasto_native {
namespace {
std::atomic<bool> g_poison{false};
}
bool poison() { return g_poison.load(std::memory_order_relaxed); }
void set_poison(bool on) { g_poison.store(on); }
Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return poison() ? at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options) : at::empty(sizes, options);
}
}  // namespace impasto_native

TORCH_LIBRARY(impasto_native, m) {
  m.def(
      "lora_apply_(Tensor(a!) y, Tensor x, Tensor A_pool, Tensor B_pool, Tensor slots, Tensor scales, "
      "Tensor pair_order, Tensor group_slot, Tensor group_start, Tensor stats) -> ()");
  m.def(
      "lora_delta(Tensor x, Tensor A_pool, Tensor B_pool, Tensor slots, Tensor scales, Tensor pair_order, "
      "Tensor group_slot, Tensor group_start, Tensor stats) -> Tensor");
  m.def(
      "lora_delta_backward(Tensor dy, Tensor x, Tensor A_pool, Tensor B_pool, Tensor slots, Tensor scales, "
      "Tensor pair_order, Tensor group_slot, Tensor group_start, Tensor stats) -> (Tensor, Tensor, Tensor)");
  m.def(
      "guidance_blend_(Tensor(a!) out, Tensor noise, Tensor uncond_row, Tensor cond_row, Tensor style_rows, "
      "Tensor style_weights, Tensor cfg, Tensor rescale, Tensor stats) -> ()");
  m.def("rank1_edit(Tensor base, Tensor e, Tensor P, Tensor WU, Tensor G, Tensor O, Tensor beta, Tensor tau) -> Tensor");
  m.def(
      "rank1_edit_backward(Tensor dy, Tensor e, Tensor P, Tensor WU, Tensor G, Tensor O, Tensor beta, Tensor tau) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("_set_poison(bool on) -> ()", [](bool on) { impasto_native::set_poison(on); });
}

TORCH_LIBRARY_IMPL(impasto_native, CPU, m) {
  m.impl("lora_apply_", &impasto_native::lora_apply_cpu);
  m.impl("lora_delta", &impasto_native::lora_delta);
  m.impl("lora_delta_backward", &impasto_native::lora_delta_backward);
  m.impl("guidance_blend_", &impasto_native::guidance_blend_cpu);
  m.impl("rank1_edit", &impasto_native::rank1_edit_cpu);
  m.impl("rank1_edit_backward", &impasto_native::rank1_edit_backward);
}

// `import impasto._native` (the setup.py build) needs a module init; the ops register at load.
extern "C" PyObject* PyInit__native(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_native", "impasto_native ops (torch.ops.impasto_native)", -1,
                                   nullptr};
  return PyModule_Create(&def);
}
