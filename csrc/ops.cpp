// The op schema, declared once. Backends register kernels with TORCH_LIBRARY_IMPL in
// cpu/blend_cpu.cpp and cuda/blend_cuda.cu; the fake (meta) implementation lives in Python
// (bypass_kernels/_native.py). `eager_blend_` is the same op called straight through the
// dispatcher's unboxed path, for eager calls from Python: a Python -> torch.ops call boxes its
// arguments and costs several times a plain ATen call, which dominates at mid-block sizes.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "blend.h"

namespace bypass_kernels {

bool check_blend_args(const at::Tensor& mid_out, const at::Tensor& mid_in, const at::Tensor& table,
                      const at::Tensor& timestep) {
  TORCH_CHECK_VALUE(mid_out.sizes() == mid_in.sizes(),
                    "mid_out and mid_in must have the same shape (the mid-block must keep its input's shape), got ",
                    mid_out.sizes(), " and ", mid_in.sizes());
  TORCH_CHECK_TYPE(mid_out.scalar_type() == mid_in.scalar_type() && at::isFloatingType(mid_out.scalar_type()),
                   "mid_out and mid_in: expected one floating dtype, got ", mid_out.scalar_type(), " and ",
                   mid_in.scalar_type());
  TORCH_CHECK_VALUE(mid_out.dim() >= 1, "mid_out: expected a tensor with a batch dimension");
  TORCH_CHECK_TYPE((table.dim() == 1 || table.dim() == 2) && table.scalar_type() == at::kFloat,
                   "table: expected a float32 tensor, 1-D [T] (BypassSchedule.table()) or 2-D [rows, T] with a row ",
                   "per sample (BypassSchedule.stack)");
  TORCH_CHECK_VALUE(table.size(-1) >= 1 && (table.dim() == 1 || table.size(0) == 1 || table.size(0) == mid_out.size(0)),
                    "table: expected [T] or [rows, T] with rows 1 or the batch (", mid_out.size(0), ") and T >= 1, ",
                    "got shape ", table.sizes());
  const auto device = mid_out.device();
  TORCH_CHECK_VALUE(mid_in.device() == device && table.device() == device && timestep.device() == device,
                    "mid_out, mid_in, table and timestep must be on one device, got ", device, ", ", mid_in.device(),
                    ", ", table.device(), ", ", timestep.device());
  const int64_t n = timestep.numel();
  TORCH_CHECK_VALUE(timestep.dim() <= 1 && (n == 1 || n == mid_out.size(0)),
                    "timestep: expected 1 value or one per sample (", mid_out.size(0), ") in a 0-d or 1-D tensor, got ",
                    "shape ", timestep.sizes());
  TORCH_CHECK_TYPE(!timestep.is_complex() && timestep.scalar_type() != at::kBool,
                   "timestep: expected a real number type, got ", timestep.scalar_type());
  if (mid_out.numel() == 0) return false;
  switch (at::get_overlap_status(mid_out, mid_in)) {
    case at::MemOverlapStatus::Full: return false;
    case at::MemOverlapStatus::Partial:
      TORCH_CHECK_VALUE(false, "mid_out and mid_in overlap in memory (partially); pass separate tensors, or ",
                        "mid_in.clone()");
    default: return true;
  }
}

bool per_sample_weights(const at::Tensor& table, const at::Tensor& timestep) {
  return timestep.numel() > 1 || (table.dim() == 2 && table.size(0) > 1);
}

int64_t table_row_stride(const at::Tensor& table) {
  return table.dim() == 2 && table.size(0) > 1 ? table.stride(0) : 0;
}

bool flat_layout_ok(const at::Tensor& mid_out, const at::Tensor& mid_in, bool per_sample) {
  if (!mid_out.is_non_overlapping_and_dense() || !mid_in.is_non_overlapping_and_dense()) return false;
  // Strides of size-1 dimensions never address memory: only the others must agree.
  for (int64_t d = 0; d < mid_out.dim(); ++d) {
    if (mid_out.size(d) != 1 && mid_out.stride(d) != mid_in.stride(d)) return false;
  }
  if (!per_sample || mid_out.size(0) == 1 || mid_out.numel() == 0) return true;
  // The batch dimension must be outermost in memory.
  return mid_out.stride(0) == mid_out.numel() / mid_out.size(0);
}

void blend_fallback_(at::Tensor& mid_out, const at::Tensor& mid_in, const at::Tensor& table,
                     const at::Tensor& timestep) {
  const int64_t T = table.size(-1);
  auto idx = timestep.reshape({-1}).to(at::kFloat).nan_to_num(0.0).round().clamp(0, T - 1).to(at::kLong);
  std::vector<int64_t> shape(mid_out.dim(), 1);
  shape[0] = -1;
  // A row per sample: row b at its index (one index for all rows, or one per row)
  auto lam = table_row_stride(table) == 0 ? table.reshape({-1}).index_select(0, idx)
                                          : table.gather(1, idx.reshape({-1, 1}).expand({table.size(0), 1}));
  lam = lam.reshape(shape);
  auto blended = (1 - lam) * mid_out.to(at::kFloat) + lam * mid_in.to(at::kFloat);
  mid_out.copy_(blended);
}

TORCH_LIBRARY(bypass_kernels, m) {
  m.def("blend_(Tensor(a!) mid_out, Tensor mid_in, Tensor table, Tensor timestep) -> ()");
}

namespace {

void eager_blend_(at::Tensor mid_out, const at::Tensor& mid_in, const at::Tensor& table, const at::Tensor& timestep) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bypass_kernels::blend_", "")
                             .typed<void(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  op.call(mid_out, mid_in, table, timestep);
}

}  // namespace
}  // namespace bypass_kernels

PYBIND11_MODULE(_C, m) {
  m.def(
      "eager_blend_",
      [](at::Tensor mid_out, const at::Tensor& mid_in, const at::Tensor& table, const at::Tensor& timestep) {
        HANDLE_TH_ERRORS
        pybind11::gil_scoped_release no_gil;
        bypass_kernels::eager_blend_(mid_out, mid_in, table, timestep);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      "blend_ through the dispatcher's unboxed path (eager calls; the checks raise ValueError/TypeError)");
  m.def("cpu_isa", &bypass_kernels::cpu_isa, "the CPU kernel's code path in use: 'avx2' or 'generic'");
  m.def("cpu_supports_avx2", &bypass_kernels::cpu_supports_avx2, "whether this CPU has AVX2 and F16C");
  m.def(
      "set_cpu_isa",
      [](const std::string& isa) {
        HANDLE_TH_ERRORS
        return bypass_kernels::set_cpu_isa(isa);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      "choose the CPU kernel's path: 'auto', 'generic' or 'avx2' (for tests; BYPASS_KERNELS_CPU_ISA at load)");
}
