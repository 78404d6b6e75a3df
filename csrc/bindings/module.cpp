// The Python module engine._C: importing it registers torch.ops.llama4.*; build_info() says what
// this build contains. Kept apart from the registry so the op code needs no pybind11.
#include <torch/extension.h>

#ifdef LLAMA4_WITH_CUDA
#include <cuda.h>  // CUDA_VERSION
#endif

#ifndef LLAMA4_TORCH_VERSION
#define LLAMA4_TORCH_VERSION "unknown"
#endif
#ifndef LLAMA4_CUDA_ARCH
#define LLAMA4_CUDA_ARCH ""
#endif
#ifndef LLAMA4_CUTLASS_VERSION
#define LLAMA4_CUTLASS_VERSION "not found"
#endif
#ifndef LLAMA4_GIT_SHA
#define LLAMA4_GIT_SHA "unknown"
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  pybind11::list kernels;
  for (const char* name : {"moe_route_cpu", "moe_permute_cpu", "moe_unpermute_cpu"}) kernels.append(name);
#ifdef LLAMA4_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDA_VERSION / 1000) + "." + std::to_string(CUDA_VERSION % 1000 / 10);
  for (const char* name : {"route_topk_sm90", "moe_permute_sm90", "moe_unpermute_sm90"}) kernels.append(name);
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  info["cuda_arch"] = LLAMA4_CUDA_ARCH;
  info["torch_version"] = LLAMA4_TORCH_VERSION;
  info["cutlass_version"] = LLAMA4_CUTLASS_VERSION;
  info["git_sha"] = LLAMA4_GIT_SHA;
  info["kernels"] = kernels;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "llama4 engine kernels (torch.ops.llama4.*)";
  m.def("build_info", &build_info, "Which kernels this build contains and what it was built with");
}
