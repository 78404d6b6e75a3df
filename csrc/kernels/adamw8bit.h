// Launchers for the fused 8-bit AdamW step (adamw8bit_step) and blockwise dynamic quantisation.
// Legend: n elements of a parameter tensor, BS block size, B = ceil(n / BS) blocks.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "adamw8bit_math.h"
#include "common.h"

namespace llama4::kernels {

// Block sizes the kernels are compiled for (one warp per block: BS / 32 elements per lane).
inline bool adamw_block_size_supported(int64_t block_size) {
  return block_size == 128 || block_size == 256 || block_size == 512;
}

struct AdamW8bitParams {
  void* param;            // [n] float32 or bfloat16 (updated in place)
  const void* grad;       // [n] same dtype as param
  DType param_dtype;      // kFloat32 or kBFloat16
  bool quantized;         // true: uint8 codes + absmax per block; false: float32 state
  void* exp_avg;          // [n] uint8 codes (signed map) or float32
  void* exp_avg_sq;       // [n] uint8 codes (unsigned map) or float32
  float* absmax_exp_avg;  // [B] (quantized only)
  float* absmax_exp_avg_sq;
  const float* qmap_signed;    // [256] sorted (quantized only)
  const float* qmap_unsigned;  // [256] sorted (quantized only)
  int64_t numel;
  int32_t block_size;
  adamw::StepScalars scalars;
  uint64_t seed;  // stochastic rounding of bf16 params
  uint64_t step;
};

// One fused pass: read param, grad and the 8-bit state once; dequantise, update, requantise with
// a fresh absmax per block, write. Never synchronises the host.
Status adamw8bit_step(const AdamW8bitParams& params, cudaStream_t stream);

struct BlockwiseQuantParams {
  const void* x;  // [n] float32 or bfloat16
  DType dtype;
  int64_t numel;
  int32_t block_size;
  const float* qmap;  // [256] sorted
  uint8_t* codes;     // [n]
  float* absmax;      // [B]
};
Status quantize_blockwise(const BlockwiseQuantParams& params, cudaStream_t stream);

struct BlockwiseDequantParams {
  const uint8_t* codes;  // [n]
  const float* absmax;   // [B]
  const float* qmap;     // [256]
  int64_t numel;
  int32_t block_size;
  float* out;  // [n]
};
Status dequantize_blockwise(const BlockwiseDequantParams& params, cudaStream_t stream);

}  // namespace llama4::kernels
