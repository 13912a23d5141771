// What our ExecuTorch kernels share: the 4-bit linear over rows (linear_q4.cpp) and the row-invariant attention over a
// KV cache (row_sdpa.cpp), on raw rows, for layerskip::linear_q4.out, layerskip::row_sdpa.out and the whole layer
// (decoder_layer.cpp). Both run on ExecuTorch's thread pool as their ops do.
#pragma once

#include <executorch/runtime/kernel/kernel_includes.h>

namespace layerskip {

// Whether weight [N/16, K/8, 64] uint8, scales [K/G, N] and weight_sums [N] fp32 make a linear_q4 of K = k inputs.
bool linear_q4_fits(const executorch::aten::Tensor& weight, const executorch::aten::Tensor& scales,
                    const executorch::aten::Tensor& weight_sums, int64_t k);

// y [rows, N] = x [rows, K] through the linear (linear_q4_fits).
void linear_q4_rows(const float* x, int64_t rows, int64_t k, const executorch::aten::Tensor& weight,
                    const executorch::aten::Tensor& scales, const executorch::aten::Tensor& weight_sums, float* y);

// Causal attention of t rows at positions start_pos .. start_pos + t - 1 over caches [S, h_kv, d] (rows below
// start_pos + t written): query row r's head i at q + r * q_stride + i * d, its result at out + (r * h + i) * d.
void attend_rows(const float* q, int64_t q_stride, int64_t t, int64_t h, int64_t d, const float* k_cache,
                 const float* v_cache, int64_t s, int64_t h_kv, int64_t start_pos, float* out);

}  // namespace layerskip
