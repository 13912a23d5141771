// layerskip::linear_q4.out -- y = x W^T with W in 4 bits (a scale per output channel and group of G inputs, or per
// output channel) and x quantized to 8 bits per row, as torchao's 8da4w (int8 dynamic activations, int4 weights)
// defines it, with each group's dot product in integers: a row's result is exact up to its float steps (one per
// group, in a fixed order), so it has the same bits whatever the number of rows in the call. And every row of a call
// is computed from one pass over the weights: at a size that does not fit the caches (the 1B shape) a d+1-row verify
// reads the weights once, as a 1-row call does, where XNNPACK's 4-bit GEMM reads them again from the second row on.
//
// Quantization (the torch reference is quant/linear_q4.py): a weight w = s[g][n] * q, q = u - 8 in -8..7 (u a
// nibble), g its group of G inputs (G = K: per channel); an activation row x ~ s_x * (a - z), a in 0..255, z the
// row's zero point (torchao's per-token asymmetric int8, shifted by 128). Then, with c[n] = sum_k w[n][k],
//   y[r][n] = s_x * (sum_g s[g][n] * t_g - z * c[n]),  t_g = sum_{k in g} a q = sum_{k in g} a u - 8 sum_{k in g} a,
// t_g exact in int32 (255 * 15 * K < 2^31); the sum over g by fused multiply-adds in order, then one fused
// multiply-add for the zero point (with q centred on 0, t_g and z c[n] stay within a few times the result).
//
// Weight layout (N/16 x K/8 x 64 bytes; quant/linear_q4.py: pack): a block of 16 output channels by a chunk of 8
// inputs in 64 bytes, byte 4i + j holding channel i's input j in its low nibble and input 4 + j in its high one, so
// that one 64-byte load gives the 16 channels x 4 inputs that one dot-product instruction multiplies with 4 bytes of
// a row (vpdpbusd on AVX-512 VNNI; vpmaddubsw + vpmaddwd on AVX2), twice. Blocks go in groups of 4 (the last group
// may hold fewer), a group's chunks interleaved: [chunk 0 of its blocks 0..3][chunk 1 ...]..., so that a pass over
// 4 blocks reads one stream (1B shape, one thread: 1 row 12% and 5 rows 7% faster than one stream per block).
//
// Paths: AVX-512 VNNI, AVX2, a portable loop; all three give the same bits (integer sums, the same float steps).
//
// x: [..., K] fp32; weight: [N/16, K/8, 64] uint8 (in the order above); scales: [K/G, N] fp32 (in the weights' order:
// Scales); weight_sums: [N] fp32 (c); out: [..., N].
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include "et_kernels.h"
#include "linear_q4.h"

namespace layerskip {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

bool linear_q4_fits(const Tensor& weight, const Tensor& scales, const Tensor& weight_sums, int64_t k) {
  if (weight.scalar_type() != ScalarType::Byte || scales.scalar_type() != ScalarType::Float ||
      weight_sums.scalar_type() != ScalarType::Float || weight.dim() != 3 || weight.size(2) != 64 ||
      scales.dim() != 2 || weight_sums.dim() != 1)
    return false;
  const int64_t groups = scales.size(0), n = scales.size(1);
  return weight.size(1) * q4::kChunk == k && weight.size(0) * q4::kBlock == n && weight_sums.size(0) == n &&
         groups > 0 && k % (groups * q4::kChunk) == 0 && k < (int64_t{1} << 19);
}

void linear_q4_rows(const float* x, int64_t rows, int64_t k, const Tensor& weight, const Tensor& scales,
                    const Tensor& weight_sums, float* y) {
  const int64_t groups = scales.size(0), n = scales.size(1);
  const q4::Rows quantized = q4::quantize_rows(x, rows, k, groups);
  const q4::Weights w{weight.const_data_ptr<uint8_t>(), k / q4::kChunk, n / q4::kBlock};
  const q4::Scales sc{scales.const_data_ptr<float>(), weight_sums.const_data_ptr<float>(), n, groups};
  // groups of output blocks in parallel (ExecuTorch's thread pool) where q4::rows_in_parallel; else in this thread,
  // sparing the pool's wake-ups. A channel's arithmetic is the same whichever thread runs it.
  const int64_t blocks = n / q4::kBlock, tasks = (blocks + q4::kGroup - 1) / q4::kGroup;
  executorch::extension::parallel_for(0, tasks, q4::rows_in_parallel(rows, k, n) ? 1 : tasks,
                                      [&](int64_t begin, int64_t end) {
    q4::blocks(quantized, rows, w, sc, begin * q4::kGroup, std::min(blocks, end * q4::kGroup), y);
  });
}

Tensor& linear_q4_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight, const Tensor& scales,
                      const Tensor& weight_sums, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && x.dim() >= 1 && x.dim() <= 8, InvalidArgument, out,
                      "linear_q4: x must be fp32, 1-D to 8-D");
  const int64_t k = x.size(x.dim() - 1);
  ET_KERNEL_CHECK_MSG(ctx, linear_q4_fits(weight, scales, weight_sums, k), InvalidArgument, out,
                      "linear_q4: weight must be [N/16, K/8, 64] uint8, scales [K/G, N] and weight_sums [N] fp32");
  executorch::aten::SizesType sizes[8];
  for (int64_t d = 0; d + 1 < x.dim(); ++d) sizes[d] = x.size(d);
  sizes[x.dim() - 1] = scales.size(1);
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(x.dim())}) ==
                  executorch::runtime::Error::Ok, InvalidArgument, out);
  linear_q4_rows(x.const_data_ptr<float>(), x.numel() / std::max<int64_t>(k, 1), k, weight, scales, weight_sums,
                 out.mutable_data_ptr<float>());
  return out;
}

}  // namespace layerskip

EXECUTORCH_LIBRARY(layerskip, "linear_q4.out", layerskip::linear_q4_out);
