// Shared declarations of the bypass blend:  mid_out <- (1 - lambda) * mid_out + lambda * mid_in,
// lambda = table[row][clamp(round_half_to_even(float32(timestep[sample])), 0, T - 1)], float32 arithmetic,
// with row = sample for a 2-D table [batch, T] (a schedule per sample), else the one row.
#pragma once

#include <ATen/core/Tensor.h>  // declarations only: a light header for nvcc (the .cu parses it twice)

#include <string>

namespace bypass_kernels {

// Argument checks shared by every backend: ValueError/TypeError naming the argument, including a
// partial overlap of mid_out and mid_in. Returns false when there is nothing to do: mid_in is
// mid_out's own memory (the blend of a tensor with itself is the tensor).
bool check_blend_args(const at::Tensor& mid_out, const at::Tensor& mid_in, const at::Tensor& table,
                      const at::Tensor& timestep);

// Whether samples may take different lambdas: a timestep per sample, or a table row per sample
// (a 2-D table [rows, T], rows = batch; a 1-D table or one row is shared by every sample).
bool per_sample_weights(const at::Tensor& table, const at::Tensor& timestep);

// Elements between two samples' rows of the table: 0 where every sample reads one row.
int64_t table_row_stride(const at::Tensor& table);

// True when one flat pass over memory is correct: same sizes and strides, dense, and (for
// per-sample weights) each sample a contiguous chunk of numel / batch elements.
bool flat_layout_ok(const at::Tensor& mid_out, const at::Tensor& mid_in, bool per_sample);

// Any-strides fallback with ATen ops; writes the result into mid_out. NaN timesteps read index 0,
// like the fused kernels (fmax/fmin), the torch ops and the exported graph.
void blend_fallback_(at::Tensor& mid_out, const at::Tensor& mid_in, const at::Tensor& table,
                     const at::Tensor& timestep);

// Dtypes the fused kernels handle; others take the fallback.
inline bool kernel_dtype_ok(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The CPU kernel's code path ("avx2" or "generic", chosen at run time: cpu/blend_cpu.cpp), whether
// this CPU has AVX2 and F16C, and a switch ("auto", "generic", "avx2") returning the path now used.
std::string cpu_isa();
bool cpu_supports_avx2();
std::string set_cpu_isa(const std::string& isa);

// The CUDA kernel's entry (cuda/blend_cuda.cu), registered for the CUDA dispatch key by
// cuda/register_cuda.cpp: the .cu then needs no torch/library.h, whose parse is most of nvcc's time.
void blend_cuda_(at::Tensor mid_out, const at::Tensor& mid_in, const at::Tensor& table, const at::Tensor& timestep);

}  // namespace bypass_kernels
