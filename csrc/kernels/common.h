// Shared vocabulary of the plain-C++ kernel launchers: element types, error codes, limits.
// No torch header here: any framework (or the standalone CMake library) can call these.
#pragma once

#include <cstdint>

namespace llama4::kernels {

// Element type of a tensor handed to a launcher (the binding layer maps framework dtypes).
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Why a launcher refused its arguments (the binding layer validates first, so these are a
// second line of defence for callers that skip it, e.g. other frameworks).
enum class Status : int32_t {
  kOk = 0,
  kInvalidArgument = 1,  // a size or pointer the launcher cannot handle
  kUnsupported = 2,      // a valid request this build or device does not support
  kCudaError = 3,        // a CUDA runtime call failed (cudaGetLastError() has the code)
};

inline const char* status_string(Status status) {
  switch (status) {
    case Status::kOk: return "ok";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kUnsupported: return "unsupported";
    case Status::kCudaError: return "CUDA error";
  }
  return "unknown status";
}

// Largest slot count (tokens * top_k) addressable with the int32 index tensors we return.
inline constexpr int64_t kMaxSlots = 2147483647;

}  // namespace llama4::kernels
