// Launchers for FP8 quantisation (per tensor, per row, per 1x128 block), its inverse, and the
// fused SwiGLU + FP8 quantisation of the experts' hidden activations.
// Legend: M rows, K columns (for SwiGLU the input is [M, 2K]: gate = first half, up = second).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"
#include "fp8_math.h"

namespace llama4::kernels {

struct Fp8QuantParams {
  const void* x;         // [M, K] (or [M, 2K] with swiglu), unit column stride
  DType x_dtype;         // float32, float16 or bfloat16
  int64_t rows;          // M
  int64_t cols;          // K (quantised columns)
  int64_t x_row_stride;  // elements
  bool swiglu;           // quantise silu(x[:, :K]) * x[:, K:]
  QuantGranularity granularity;
  Fp8Kind kind;
  uint8_t* out;      // [M, K] fp8 bits, contiguous
  float* scale;      // [] (tensor), [M] (row) or [M, ceil(K / 128)] (block128)
  float* workspace;  // tensor granularity only: one float (the running amax)
};

// One read and one write of the data for row and block128 (the second look at a row comes from
// L2); tensor granularity needs a reduction pass first (two kernels).
Status quantize_fp8(const Fp8QuantParams& params, cudaStream_t stream);

struct Fp8DequantParams {
  const uint8_t* q;  // [M, K] fp8 bits, contiguous
  Fp8Kind kind;
  int64_t rows;
  int64_t cols;
  QuantGranularity granularity;
  const float* scale;
  void* out;  // [M, K] contiguous
  DType out_dtype;
};
Status dequantize_fp8(const Fp8DequantParams& params, cudaStream_t stream);

struct SwigluParams {
  const void* h;  // [M, 2K], unit column stride
  DType dtype;    // of h and out
  int64_t rows;
  int64_t cols;  // K
  int64_t h_row_stride;
  void* out;  // [M, K] contiguous, h's dtype
};
Status swiglu(const SwigluParams& params, cudaStream_t stream);

}  // namespace llama4::kernels
