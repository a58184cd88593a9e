// The op schema, declared once. Backends register kernels with TORCH_LIBRARY_IMPL in
// cpu/blend_cpu.cpp and cuda/blend_cuda.cu; the fake (meta) implementation lives in Python
// (bypass_kernels/ops.py).
#include <Python.h>
#include <torch/library.h>

#include "blend.h"

namespace bypass_kernels {

void check_blend_args(const at::Tensor& mid_out, const at::Tensor& mid_in, const at::Tensor& table,
                      const at::Tensor& timestep) {
  TORCH_CHECK(mid_out.sizes() == mid_in.sizes(), "blend_: mid_out and mid_in must have the same shape, got ",
              mid_out.sizes(), " and ", mid_in.sizes());
  TORCH_CHECK(mid_out.scalar_type() == mid_in.scalar_type(), "blend_: mid_out and mid_in must have the same dtype");
  TORCH_CHECK(at::isFloatingType(mid_out.scalar_type()), "blend_: expected floating-point tensors, got ",
              mid_out.scalar_type());
  TORCH_CHECK(mid_out.dim() >= 1, "blend_: expected tensors with a batch dimension");
  TORCH_CHECK(table.dim() == 1 && table.scalar_type() == at::kFloat && table.numel() >= 1,
              "blend_: table must be a 1-D float32 tensor");
  const auto device = mid_out.device();
  TORCH_CHECK(mid_in.device() == device && table.device() == device && timestep.device() == device,
              "blend_: mid_out, mid_in, table and timestep must be on one device");
  const int64_t n = timestep.numel();
  TORCH_CHECK(n == 1 || n == mid_out.size(0), "blend_: timestep must hold 1 value or one per sample (",
              mid_out.size(0), "), got ", n);
}

bool flat_layout_ok(const at::Tensor& mid_out, const at::Tensor& mid_in, const at::Tensor& timestep) {
  if (mid_out.strides() != mid_in.strides() || !mid_out.is_non_overlapping_and_dense()) return false;
  if (timestep.numel() == 1 || mid_out.size(0) == 1 || mid_out.numel() == 0) return true;
  // The batch dimension must be outermost in memory.
  return mid_out.stride(0) == mid_out.numel() / mid_out.size(0);
}

void blend_fallback_(at::Tensor& mid_out, const at::Tensor& mid_in, const at::Tensor& table,
                     const at::Tensor& timestep) {
  const int64_t T = table.numel();
  auto idx = timestep.reshape({-1}).to(at::kFloat).round().clamp(0, T - 1).to(at::kLong);
  std::vector<int64_t> shape(mid_out.dim(), 1);
  shape[0] = -1;
  auto lam = table.index_select(0, idx).reshape(shape);
  auto blended = (1 - lam) * mid_out.to(at::kFloat) + lam * mid_in.to(at::kFloat);
  mid_out.copy_(blended);
}

TORCH_LIBRARY(bypass_kernels, m) {
  m.def("blend_(Tensor(a!) mid_out, Tensor mid_in, Tensor table, Tensor timestep) -> ()");
}

}  // namespace bypass_kernels

// A plain module so `import bypass_kernels._C` loads the library and runs the registrations.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
