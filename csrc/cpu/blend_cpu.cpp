// CPU kernel: lambda per sample is read on the host (the timestep and table are CPU tensors), then one
// parallel, vectorized pass blends in place with float32 arithmetic.
//
// Two code paths, chosen at run time (a wheel built on one x86-64 machine runs on any other):
//   generic  ATen's Vectorized<> as compiled for the baseline ISA (the build adds no -m flags);
//   avx2     AVX2 + F16C intrinsics in functions with __attribute__((target)), used when the CPU
//            reports both (__builtin_cpu_supports). Only those functions hold AVX2 code (header
//            functions are at most inlined into them, never emitted out of line for AVX2), so
//            nothing AVX2 leaks into the generic path (tests/test_cpu_isa.py disassembles to check).
// Both round each product and the sum in float32 (no FMA: the build passes -ffp-contract=off and
// the avx2 target leaves FMA out), and convert to half/bfloat16 rounding to nearest even, as c10
// does: the two paths are bit-identical. BYPASS_KERNELS_CPU_ISA=generic (read when the extension
// loads) forces the generic path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "../blend.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define BYPASS_KERNELS_HAVE_AVX2_PATH 1
#include <immintrin.h>
#else
#define BYPASS_KERNELS_HAVE_AVX2_PATH 0
#endif

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

// One weight for the batch, or one per sample (a timestep per sample, or a table row per sample).
std::vector<float> sample_weights(const at::Tensor& table, const at::Tensor& timestep, int64_t batch) {
  const auto t = timestep.reshape({-1});  // a view for 0-d and 1-d timesteps
  const auto tab = table.contiguous();
  const float* wp = tab.const_data_ptr<float>();
  const int64_t T = tab.size(-1), row_stride = table_row_stride(tab);
  const float last = static_cast<float>(T - 1);
  std::vector<float> out(per_sample_weights(table, timestep) ? batch : 1);
  for (int64_t i = 0; i < static_cast<int64_t>(out.size()); ++i) {
    // nearbyint rounds half to even in the default rounding mode; fmax/fmin map NaN to 0.
    const float r = std::fmin(std::fmax(std::nearbyint(timestep_value(t, t.numel() == 1 ? 0 : i)), 0.0f), last);
    out[i] = wp[i * row_stride + static_cast<int64_t>(r)];
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

#if BYPASS_KERNELS_HAVE_AVX2_PATH
#define BK_AVX2 __attribute__((target("avx2,f16c")))

// float32 <-> float32 "conversions", so one loop serves the three dtypes.
BK_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
BK_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

BK_AVX2 inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
BK_AVX2 inline void store8(at::Half* p, __m256 v) {  // round to nearest even, as c10::Half(float)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

BK_AVX2 inline __m256 load8(const at::BFloat16* p) {  // exact: the bfloat16 bits are the float's top half
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
BK_AVX2 inline void store8(at::BFloat16* p, __m256 v) {
  // c10::BFloat16(float): NaN -> 0x7FC0, else round to nearest even on the top 16 bits.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  top = _mm256_blendv_epi8(top, _mm256_set1_epi32(0x7FC0), nan);
  // 8 x 32-bit (each < 2^16) -> 8 x 16-bit: pack within 128-bit lanes, then gather the two halves.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(top, top), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

template <typename scalar_t>
BK_AVX2 void blend_span_avx2(scalar_t* out, const scalar_t* in, int64_t n, float w) {
  const float keep = 1.0f - w;
  const __m256 vkeep = _mm256_set1_ps(keep), vw = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 m = load8(out + i), h = load8(in + i);
    store8(out + i, _mm256_add_ps(_mm256_mul_ps(vkeep, m), _mm256_mul_ps(vw, h)));
  }
  for (; i < n; ++i) {
    out[i] = static_cast<scalar_t>(keep * static_cast<float>(out[i]) + w * static_cast<float>(in[i]));
  }
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}
#else
bool cpu_has_avx2() { return false; }
#endif

// The path in use: true = avx2. Set when the extension loads; tests switch it with set_cpu_isa.
std::atomic<bool> use_avx2{false};

std::string env_isa() {
  const char* value = std::getenv("BYPASS_KERNELS_CPU_ISA");
  return value == nullptr ? std::string("auto") : std::string(value);
}

// Chooses the path: "auto" (avx2 where the CPU has AVX2 and F16C), "generic", or "avx2" (an error
// where the CPU lacks it). Returns the path now in use.
std::string select_isa(const std::string& isa) {
  TORCH_CHECK_VALUE(isa == "auto" || isa == "generic" || isa == "avx2",
                    "BYPASS_KERNELS_CPU_ISA: expected auto, generic or avx2, got '", isa, "'");
  TORCH_CHECK_VALUE(isa != "avx2" || cpu_has_avx2(),
                    "BYPASS_KERNELS_CPU_ISA=avx2: this CPU (or this build) has no AVX2 and F16C; use auto or generic");
  use_avx2.store(isa != "generic" && cpu_has_avx2());
  return use_avx2.load() ? "avx2" : "generic";
}

// At load: an unknown value of the variable falls back to auto instead of failing the import.
const bool isa_selected = [] {
  try {
    select_isa(env_isa());
  } catch (const std::exception&) {
    select_isa("auto");
  }
  return true;
}();

template <typename scalar_t>
void blend_flat(at::Tensor& mid_out, const at::Tensor& mid_in, const std::vector<float>& weights, int64_t per_sample) {
  scalar_t* out = mid_out.data_ptr<scalar_t>();
  const scalar_t* in = mid_in.data_ptr<scalar_t>();
  auto span = &blend_span<scalar_t>;
#if BYPASS_KERNELS_HAVE_AVX2_PATH
  if (use_avx2.load(std::memory_order_relaxed)) span = &blend_span_avx2<scalar_t>;
#endif
  at::parallel_for(0, mid_out.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    // Walk the chunk one sample-segment at a time so each segment has a single weight.
    for (int64_t i = begin; i < end;) {
      const int64_t sample = i / per_sample;
      const int64_t stop = std::min(end, (sample + 1) * per_sample);
      span(out + i, in + i, stop - i, weights[sample]);
      i = stop;
    }
  });
}

void blend_cpu_(at::Tensor mid_out, const at::Tensor& mid_in, const at::Tensor& table, const at::Tensor& timestep) {
  if (!check_blend_args(mid_out, mid_in, table, timestep)) return;
  if (!kernel_dtype_ok(mid_out.scalar_type()) ||
      !flat_layout_ok(mid_out, mid_in, per_sample_weights(table, timestep))) {
    blend_fallback_(mid_out, mid_in, table, timestep);
    return;
  }
  const int64_t numel = mid_out.numel();
  if (numel == 0) return;
  const std::vector<float> weights = sample_weights(table, timestep, mid_out.size(0));
  const int64_t per_sample = weights.size() == 1 ? numel : numel / mid_out.size(0);
  switch (mid_out.scalar_type()) {
    case at::kHalf: blend_flat<at::Half>(mid_out, mid_in, weights, per_sample); break;
    case at::kBFloat16: blend_flat<at::BFloat16>(mid_out, mid_in, weights, per_sample); break;
    default: blend_flat<float>(mid_out, mid_in, weights, per_sample); break;
  }
}

}  // namespace

std::string cpu_isa() { return use_avx2.load() ? "avx2" : "generic"; }
bool cpu_supports_avx2() { return cpu_has_avx2(); }
std::string set_cpu_isa(const std::string& isa) { return select_isa(isa); }

TORCH_LIBRARY_IMPL(bypass_kernels, CPU, m) { m.impl("blend_", &blend_cpu_); }

}  // namespace bypass_kernels
