// layerskip::decoder_layer.out -- one Llama decoder layer of a linear_q4 .pte in one call:
//   h = x + o(attend(rope(q), rope(k) and v written to the caches)),  q | k | v = qkv(rms_norm(x))
//   out = h + down(silu(g) * u),  g | u = gate_up(rms_norm(h))
// with the layer's linears through linear_q4 (q/k/v and gate/up joined, quant/linear_q4.py: join_projections) and its
// attention through row_sdpa's. The layer was 5 XNNPACK delegate calls (norms, rotary, SiLU, residual adds) around 4
// linear_q4 calls, a row_sdpa call, 2 cache writes and 2 splits; each call costs a few microseconds whatever its
// size, and the shipped model's layer computes in ~16 us a row (README, "Latest").
//
// Every step works on one row at a time in a fixed order (the linears and the attention keep a row's bits whatever the
// number of rows in the call), so a row has the same bits in a d+1-row verify as decoded alone, as with the ops one by
// one. The torch reference is export/fused_layer.py: decoder_layer.
//
// x: [1, T, dim] at positions [T] (start_pos = positions[0], then consecutive); rope_cos, rope_sin: [S', D/2] (row p: the
// cos / sin of the rotary's D/2 angles at position p, S' >= S); k_cache, v_cache: [1, S, H_kv, D] (rows start_pos .. start_pos + T - 1
// written here); norms [dim]; each linear as linear_q4 takes it (weight, scales, weight_sums): qkv dim -> (H + 2 H_kv) D,
// o H D -> dim, gate_up dim -> 2 I, down I -> dim; out: [1, T, dim]. fp32.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "et_kernels.h"
#include "layer_rows.h"

namespace layerskip {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

// x * cos + rotate_half(x) * sin in place for `heads` heads of d at p (HF's halves layout: rotate_half = [-x2, x1], and
// both halves turn by the same d/2 angles, whose cos and sin are cos[0 .. d/2), sin[0 .. d/2)).
void rope(float* p, int64_t heads, int64_t d, const float* cos, const float* sin) {
  const int64_t half = d / 2;
  for (int64_t head = 0; head < heads; ++head, p += d)
    for (int64_t i = 0; i < half; ++i) {
      const float a = p[i], b = p[i + half];
      p[i] = a * cos[i] + (-b) * sin[i];
      p[i + half] = b * cos[i] + a * sin[i];
    }
}

struct Linear {
  const Tensor& weight;
  const Tensor& scales;
  const Tensor& sums;
  int64_t out() const { return scales.size(1); }
};

}  // namespace

Tensor& decoder_layer_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& positions, const Tensor& rope_cos,
                          const Tensor& rope_sin, Tensor& k_cache, Tensor& v_cache, const Tensor& attn_norm,
                          const Tensor& qkv_weight, const Tensor& qkv_scales, const Tensor& qkv_sums,
                          const Tensor& o_weight, const Tensor& o_scales, const Tensor& o_sums, const Tensor& mlp_norm,
                          const Tensor& gate_up_weight, const Tensor& gate_up_scales, const Tensor& gate_up_sums,
                          const Tensor& down_weight, const Tensor& down_scales, const Tensor& down_sums,
                          int64_t n_heads, double eps, Tensor& out) {
  const Linear qkv{qkv_weight, qkv_scales, qkv_sums}, o{o_weight, o_scales, o_sums};
  const Linear gate_up{gate_up_weight, gate_up_scales, gate_up_sums}, down{down_weight, down_scales, down_sums};
  ET_KERNEL_CHECK_MSG(ctx, x.dim() == 3 && x.size(0) == 1 && k_cache.dim() == 4 && v_cache.dim() == 4 &&
                      rope_cos.dim() == 2 && rope_sin.dim() == 2 && positions.numel() >= 1 &&
                      positions.scalar_type() == ScalarType::Long && x.scalar_type() == ScalarType::Float &&
                      k_cache.scalar_type() == ScalarType::Float && v_cache.scalar_type() == ScalarType::Float &&
                      rope_cos.scalar_type() == ScalarType::Float && rope_sin.scalar_type() == ScalarType::Float &&
                      attn_norm.scalar_type() == ScalarType::Float && mlp_norm.scalar_type() == ScalarType::Float,
                      InvalidArgument, out,
                      "decoder_layer: x [1, T, dim], positions int64, rotary tables [S, D/2], caches [1, S, H_kv, D], fp32");
  const int64_t t = x.size(1), dim = x.size(2), s = k_cache.size(1), h_kv = k_cache.size(2), d = k_cache.size(3);
  const int64_t h = n_heads, width = gate_up.out() / 2, q_width = h * d, kv_width = h_kv * d;
  const int64_t start_pos = positions.const_data_ptr<int64_t>()[0];  // rows are at start_pos .. start_pos + T - 1
  ET_KERNEL_CHECK_MSG(ctx, h > 0 && h_kv > 0 && h % h_kv == 0 && d % 2 == 0 && start_pos >= 0 && start_pos + t <= s &&
                      v_cache.size(1) == s && v_cache.size(2) == h_kv && v_cache.size(3) == d &&
                      rope_cos.size(0) >= s && rope_cos.size(1) == d / 2 && rope_sin.size(0) >= s &&
                      rope_sin.size(1) == d / 2 && attn_norm.numel() == dim && mlp_norm.numel() == dim, InvalidArgument,
                      out, "decoder_layer: caches, rotary tables or norms do not match x, or a position out of range");
  ET_KERNEL_CHECK_MSG(ctx, linear_q4_fits(qkv.weight, qkv.scales, qkv.sums, dim) &&
                      qkv.out() == q_width + 2 * kv_width && linear_q4_fits(o.weight, o.scales, o.sums, q_width) &&
                      o.out() == dim && linear_q4_fits(gate_up.weight, gate_up.scales, gate_up.sums, dim) &&
                      gate_up.out() % 2 == 0 && linear_q4_fits(down.weight, down.scales, down.sums, width) &&
                      down.out() == dim, InvalidArgument, out, "decoder_layer: the linears' shapes do not match");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == executorch::runtime::Error::Ok,
                  InvalidArgument, out);

  thread_local std::vector<float> normed, qkv_rows, attended, gate_up_rows, act, delta;
  normed.resize(t * dim);
  qkv_rows.resize(t * qkv.out());
  attended.resize(t * q_width);
  gate_up_rows.resize(t * gate_up.out());
  act.resize(t * width);
  delta.resize(t * dim);
  const float* xp = x.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  float* kp = k_cache.mutable_data_ptr<float>();
  float* vp = v_cache.mutable_data_ptr<float>();
  const float norm_eps = static_cast<float>(eps);

  // attention: q | k | v rows, rotary on q and k, k and v into the caches at their positions
  rms_norm(xp, attn_norm.const_data_ptr<float>(), t, dim, norm_eps, normed.data());
  linear_q4_rows(normed.data(), t, dim, qkv.weight, qkv.scales, qkv.sums, qkv_rows.data());
  for (int64_t r = 0; r < t; ++r) {
    float* row = qkv_rows.data() + r * qkv.out();
    rope(row, h + h_kv, d, rope_cos.const_data_ptr<float>() + (start_pos + r) * (d / 2),
         rope_sin.const_data_ptr<float>() + (start_pos + r) * (d / 2));
    std::memcpy(kp + (start_pos + r) * kv_width, row + q_width, kv_width * sizeof(float));
    std::memcpy(vp + (start_pos + r) * kv_width, row + q_width + kv_width, kv_width * sizeof(float));
  }
  attend_rows(qkv_rows.data(), qkv.out(), t, h, d, kp, vp, s, h_kv, start_pos, attended.data());
  linear_q4_rows(attended.data(), t, q_width, o.weight, o.scales, o.sums, delta.data());
  for (int64_t i = 0; i < t * dim; ++i) y[i] = xp[i] + delta[i];

  // MLP
  rms_norm(y, mlp_norm.const_data_ptr<float>(), t, dim, norm_eps, normed.data());
  linear_q4_rows(normed.data(), t, dim, gate_up.weight, gate_up.scales, gate_up.sums, gate_up_rows.data());
  for (int64_t r = 0; r < t; ++r) {
    const float* gu = gate_up_rows.data() + r * 2 * width;  // [g | u]
    silu_mul(gu, gu + width, width, act.data() + r * width);
  }
  linear_q4_rows(act.data(), t, width, down.weight, down.scales, down.sums, delta.data());
  for (int64_t i = 0; i < t * dim; ++i) y[i] += delta[i];
  return out;
}

// layerskip::rms_norm.out: the final norm of such a .pte (the exit's and the last layer's), as the layer's norms.
Tensor& rms_norm_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight, double eps, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && weight.scalar_type() == ScalarType::Float &&
                      x.dim() >= 1 && weight.numel() == x.size(x.dim() - 1), InvalidArgument, out,
                      "rms_norm: x [..., dim] and weight [dim], fp32");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == executorch::runtime::Error::Ok,
                  InvalidArgument, out);
  const int64_t dim = weight.numel();
  rms_norm(x.const_data_ptr<float>(), weight.const_data_ptr<float>(), x.numel() / std::max<int64_t>(dim, 1), dim,
           static_cast<float>(eps), out.mutable_data_ptr<float>());
  return out;
}

}  // namespace layerskip

EXECUTORCH_LIBRARY(layerskip, "decoder_layer.out", layerskip::decoder_layer_out);
EXECUTORCH_LIBRARY(layerskip, "rms_norm.out", layerskip::rms_norm_out);
