// Registers the CUDA kernel (blend_cuda.cu) for the op's CUDA dispatch key. A host-compiled file of its
// own: torch/library.h stays out of the .cu, which nvcc would parse for the device and again for the host.
#include <torch/library.h>

#include "../blend.h"

TORCH_LIBRARY_IMPL(bypass_kernels, CUDA, m) { m.impl("blend_", &bypass_kernels::blend_cuda_); }
