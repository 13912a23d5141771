// The row-wise steps of a decoder layer that both of our whole-layer kernels run (decoder_layer.cpp for ExecuTorch,
// ort_ops.cpp's DecoderLayer for ONNX Runtime) between their linears and attention: RMSNorm and SiLU x up. Each works on
// one row at a time in a fixed order, so a row has the same bits whatever the number of rows in the call.
#pragma once

#include <cmath>
#include <cstdint>

#include "row_attention.h"

namespace layerskip {
namespace {

// y = w * (x * (1 / sqrt(mean(x^2) + eps))), row by row; the squares summed in 8 strided sums, then in order.
inline void rms_norm(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* y) {
  for (int64_t r = 0; r < rows; ++r, x += dim, y += dim) {
    float part[8] = {};
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8)
      for (int j = 0; j < 8; ++j) part[j] += x[i + j] * x[i + j];
    float sum = 0.f;
    for (int j = 0; j < 8; ++j) sum += part[j];
    for (; i < dim; ++i) sum += x[i] * x[i];
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
    for (i = 0; i < dim; ++i) y[i] = w[i] * (x[i] * inv);
  }
}

// act = silu(g) * u for one row of `width`. silu(g) = g * sigmoid(g), sigmoid from e = exp(-|g|) <= 1: 1 / (1 + e)
// for g >= 0, e / (1 + e) below; the numerator is max(e, min(max(g * 2^100, 0), 1)), which is 1 for g >= 2^-100 and
// e below (e rounds to 1 for |g| < 2^-25, where both numerators agree).
inline void silu_mul(const float* g, const float* u, int64_t width, float* act) {
  int64_t i = 0;
#ifdef ROW_SDPA_AVX2
#ifdef ROW_SDPA_AVX512
  using L = Lanes16;
#else
  using L = Lanes8;
#endif
  using V = typename L::V;
  const V zero = L::zero(), one = L::set1(1.0f), big = L::set1(0x1p100f);
  for (; i + L::N <= width; i += L::N) {
    const V gi = L::loadu(g + i);
    const V e = exp_nonpositive<L>(L::sub(zero, L::max(gi, L::sub(zero, gi))));
    const V numerator = L::max(e, L::min(L::max(L::mul(gi, big), zero), one));
    L::storeu(act + i, L::mul(L::mul(gi, L::div(numerator, L::add(one, e))), L::loadu(u + i)));
  }
#endif
  for (; i < width; ++i) act[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace
}  // namespace layerskip
