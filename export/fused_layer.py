"""A linear_q4 .pte's decoder layers as one call each: layerskip::decoder_layer (runtime/kernels/decoder_layer.cpp).

After quant.linear_q4.join_projections, a layer of the .pte was 5 XNNPACK delegate calls (norms, rotary, SiLU,
residual adds) around 4 linear_q4 calls, a row_sdpa call, 2 cache writes and 2 splits: ~17 calls a layer, each a few
microseconds whatever its size, for ~15 us of arithmetic a row on the shipped model at position 250. fuse_layers makes
each layer one call of our kernel, which runs the same linears and attention on the same caches (rows keep their
bits), with the rotary's cos / sin read from tables of every position and the final norm one kernel call too: a
method of the shipped model is 17 instructions, no delegate call (was 139, 42 of them delegate calls); its 1-row full
call 263 -> 178 us (README, "Previous session").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from export.to_pte import row_sdpa
from models.model import apply_rope
from quant.linear_q4 import JoinedMLP, LinearQ4, linear_q4


def rms_norm(x, weight, eps: float):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def decoder_layer(x, positions, rope_cos, rope_sin, k_cache, v_cache, attn_norm, qkv_weight, qkv_scales, qkv_sums,
                  o_weight, o_scales, o_sums, mlp_norm, gate_up_weight, gate_up_scales, gate_up_sums, down_weight,
                  down_scales, down_sums, n_heads, eps):
    """layerskip::decoder_layer in torch (its reference; ExecuTorch runs our kernel): x [1, T, dim] at positions [T]
    (consecutive) -> the layer's output [1, T, dim]; rope_cos, rope_sin: the cos and sin of the rotary's D/2 angles
    at every position [S, D/2] (both halves of a head turn by them); writes k and v rows into the caches
    [1, S, H_kv, D]."""
    t, (h_kv, d), start = x.shape[1], k_cache.shape[2:], int(positions[0])
    cos, sin = (table[start:start + t].repeat(1, 2)[:, None] for table in (rope_cos, rope_sin))  # [T, 1, D]
    q, k, v = linear_q4(rms_norm(x, attn_norm, eps), qkv_weight, qkv_scales, qkv_sums).split(
        [n_heads * d, h_kv * d, h_kv * d], -1)
    q, k = apply_rope(q.view(1, t, n_heads, d), cos, sin), apply_rope(k.view(1, t, h_kv, d), cos, sin)
    k_cache[:, start:start + t] = k
    v_cache[:, start:start + t] = v.view(1, t, h_kv, d)
    attended = row_sdpa(q, k_cache, v_cache, start).view(1, t, n_heads * d)
    h = x + linear_q4(attended, o_weight, o_scales, o_sums)
    gate, up = linear_q4(rms_norm(h, mlp_norm, eps), gate_up_weight, gate_up_scales, gate_up_sums).chunk(2, -1)
    return h + linear_q4(F.silu(gate) * up, down_weight, down_scales, down_sums)


def define_ops() -> None:
    from runtime.kernels import define_torch_op

    define_torch_op(
        "decoder_layer",
        "Tensor x, Tensor positions, Tensor rope_cos, Tensor rope_sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor attn_norm, Tensor qkv_weight, Tensor qkv_scales, Tensor qkv_sums, Tensor o_weight, Tensor o_scales, "
        "Tensor o_sums, Tensor mlp_norm, Tensor gate_up_weight, Tensor gate_up_scales, Tensor gate_up_sums, "
        "Tensor down_weight, Tensor down_scales, Tensor down_sums, int n_heads, float eps",
        decoder_layer, lambda x, *rest: torch.empty_like(x), out_alias="c")
    define_torch_op("rms_norm", "Tensor x, Tensor weight, float eps", rms_norm,
                    lambda x, weight, eps: torch.empty_like(x))


def linear_args(linear: LinearQ4) -> tuple:
    return linear.weight_q4, linear.scales, linear.weight_sums


class FusedDecoderLayer(nn.Module):
    """A prepared decoder layer (export/to_pte.prepare_for_executorch, then join_projections) as one
    layerskip::decoder_layer call on the layer's RowSdpaKVCache; the same weights (its modules are the layer's). The
    rotary comes from tables of every position, made once for all layers (fuse_layers), so that a call computes no
    cos / sin and reads its position inside the kernel."""

    def __init__(self, layer: nn.Module, rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        super().__init__()
        attn = layer.self_attn
        self.qkv, self.o, self.gate_up, self.down = attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj
        self.attn_norm, self.mlp_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.n_heads = attn.n_heads
        self.register_buffer("rope_cos", rope_cos, persistent=False)  # [S, D/2], one tensor for all layers
        self.register_buffer("rope_sin", rope_sin, persistent=False)

    @staticmethod
    def fits(layer: nn.Module) -> bool:
        attn = layer.self_attn
        return (isinstance(getattr(attn, "qkv_proj", None), LinearQ4) and isinstance(attn.o_proj, LinearQ4)
                and isinstance(layer.mlp, JoinedMLP) and isinstance(layer.mlp.down_proj, LinearQ4)
                and attn.qkv_sizes[1] == attn.qkv_sizes[2])

    def forward(self, x, cos, sin, positions, cache):  # cos, sin: unused (the tables), so not traced
        return torch.ops.layerskip.decoder_layer(
            x, positions, self.rope_cos, self.rope_sin, cache.k, cache.v, self.attn_norm.weight,
            *linear_args(self.qkv), *linear_args(self.o), self.mlp_norm.weight, *linear_args(self.gate_up),
            *linear_args(self.down), self.n_heads, float(self.attn_norm.eps))


class KernelRMSNorm(nn.Module):
    """The final norm through layerskip::rms_norm (one kernel call where XNNPACK's was a delegate call of its own)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x):
        return torch.ops.layerskip.rms_norm(x, self.weight, float(self.eps))


def fuse_layers(model: nn.Module) -> int:
    """Every layer of a linear_q4 .pte with --pte-attention row_sdpa whose linears were joined (FusedDecoderLayer.fits)
    becomes a FusedDecoderLayer, in place, and the final norm a KernelRMSNorm where any did; returns how many."""
    define_ops()
    with torch.no_grad():
        cos, sin = model.rope(torch.arange(model.max_seq_len))  # [S, D], its halves alike
        rope_cos, rope_sin = (table[:, :table.shape[1] // 2].contiguous() for table in (cos, sin))  # [S, D/2]
    fused = 0
    for i, layer in enumerate(model.layers):
        if FusedDecoderLayer.fits(layer):
            model.layers[i] = FusedDecoderLayer(layer, rope_cos, rope_sin)
            fused += 1
    if fused:
        model.norm = KernelRMSNorm(model.norm)
    return fused
