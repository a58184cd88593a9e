// CPU kernel: lambda per sample is read on the host (the timestep is a CPU tensor), then one
// parallel, vectorized pass blends in place with float32 arithmetic.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../blend.h"

namespace bypass_kernels {
namespace {

// The timestep as float32, read in place (no converted copy per call) for the common dtypes.
float timestep_value(const at::Tensor& t, int64_t i) {
  const int64_t offset = i * t.stride(0);
  switch (t.scalar_type()) {
    case at::kFloat: return t.const_data_ptr<float>()[offset];
    case at::kDouble: return static_cast<float>(t.const_data_ptr<double>()[offset]);
    case at::kHalf: return static_cast<float>(t.const_data_ptr<at::Half>()[offset]);
    case at::kBFloat16: return static_cast<float>(t.const_data_ptr<at::BFloat16>()[offset]);
    case at::kInt: return static_cast<float>(t.const_data_ptr<int32_t>()[offset]);
    case at::kLong: return static_cast<float>(t.const_data_ptr<int64_t>()[offset]);
    default: return t.reshape({-1})[i].to(at::kFloat).item<float>();
  }
}

std::vector<float> sample_weights(const at::Tensor& table, const at::Tensor& timestep) {
  const auto t = timestep.reshape({-1});  // a view for 0-d and 1-d timesteps
  const auto tab = table.contiguous();
  const float* wp = tab.const_data_ptr<float>();
  const float last = static_cast<float>(tab.numel() - 1);
  std::vector<float> out(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) {
    // nearbyint rounds half to even in the default rounding mode; fmax/fmin map NaN to 0.
    const float r = std::fmin(std::fmax(std::nearbyint(timestep_value(t, i)), 0.0f), last);
    out[i] = wp[static_cast<int64_t>(r)];
  }
  return out;
}

template <typename scalar_t>
void blend_span(scalar_t* out, const scalar_t* in, int64_t n, float w) {
  using fVec = at::vec::Vectorized<float>;
  const float keep = 1.0f - w;
  const fVec vkeep(keep), vw(w);
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + fVec::size() <= n; i += fVec::size()) {
      const fVec m = fVec::loadu(out + i), h = fVec::loadu(in + i);
      (vkeep * m + vw * h).store(out + i);
    }
  } else {
    using Vec = at::vec::Vectorized<scalar_t>;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      auto [m0, m1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(out + i));
      auto [h0, h1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(in + i));
      at::vec::convert_from_float<scalar_t>(vkeep * m0 + vw * h0, vkeep * m1 + vw * h1).store(out + i);
    }
  }
  for (; i < n; ++i) {
    out[i] = static_cast<scalar_t>(keep * static_cast<float>(out[i]) + w * static_cast<float>(in[i]));
  }
}

template <typename scalar_t>
void blend_flat(at::Tensor& mid_out, const at::Tensor& mid_in, const std::vector<float>& weights, int64_t per_sample) {
  scalar_t* out = mid_out.data_ptr<scalar_t>();
  const scalar_t* in = mid_in.data_ptr<scalar_t>();
  at::parallel_for(0, mid_out.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    // Walk the chunk one sample-segment at a time so each segment has a single weight.
    for (int64_t i = begin; i < end;) {
      const int64_t sample = i / per_sample;
      const int64_t stop = std::min(end, (sample + 1) * per_sample);
      blend_span<scalar_t>(out + i, in + i, stop - i, weights[sample]);
      i = stop;
    }
  });
}

void blend_cpu_(at::Tensor mid_out, const at::Tensor& mid_in, const at::Tensor& table, const at::Tensor& timestep) {
  if (!check_blend_args(mid_out, mid_in, table, timestep)) return;
  if (!kernel_dtype_ok(mid_out.scalar_type()) || !flat_layout_ok(mid_out, mid_in, timestep)) {
    blend_fallback_(mid_out, mid_in, table, timestep);
    return;
  }
  const int64_t numel = mid_out.numel();
  if (numel == 0) return;
  const std::vector<float> weights = sample_weights(table, timestep);
  const int64_t per_sample = weights.size() == 1 ? numel : numel / mid_out.size(0);
  switch (mid_out.scalar_type()) {
    case at::kHalf: blend_flat<at::Half>(mid_out, mid_in, weights, per_sample); break;
    case at::kBFloat16: blend_flat<at::BFloat16>(mid_out, mid_in, weights, per_sample); break;
    default: blend_flat<float>(mid_out, mid_in, weights, per_sample); break;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(bypass_kernels, CPU, m) { m.impl("blend_", &blend_cpu_); }

}  // namespace bypass_kernels
