"""KV caches for the ONNX graphs: the cache tensors are graph inputs, not module buffers.

row (default): ONNX Runtime's graphs below (gqa) with our custom operator layerskip.RowAttention
    (runtime/kernels/ort_ops.cpp) in place of GroupQueryAttention, swapped in after the norms are fused
    (export/to_onnx.py): same inputs, same in-place caches, the attention of our .pte kernel (a query row has
    the same bits whatever the number of rows in the call), about half ONNX Runtime's CPU cost for it at 1-2
    rows. The session registers our op library (runtime/kernels: ort_ops_library).
gqa: ONNX Runtime's com.microsoft GroupQueryAttention. The runtime binds each layer's
    past_key input and present_key output to the same [1, H_kv, S, D] buffer, so the op writes the
    new rows in place and attends over positions < total_sequence_length only: no cache copies, no
    work on unused positions, and rollback is passing a smaller position. The op also takes the
    packed q|k|v projection and applies the rotary embedding (FusedAttention, swapped in while
    tracing), and the RMSNorms become ONNX Runtime's fused (Skip)SimplifiedLayerNormalization.
sdpa: standard ONNX ops only (any ONNX runtime). The graph reads the whole [1, H_kv, S, D] buffer,
    masks positions >= pos, attends to the new keys as a second block, and outputs the new rows
    [1, H_kv, T, D]; the runtime writes them into its buffer. Attention runs over all S positions.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from models.model import Attention, Transformer, apply_rope, grouped_sdpa

ATTENTION_KINDS = ("gqa", "row", "sdpa")
FUSED_KINDS = ("gqa", "row")  # traced with FusedAttention; the cache buffer shared by past and present


@torch.library.custom_op("layerskip::group_query_attention", mutates_args=())
def group_query_attention(qkv: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, seqlens_k: torch.Tensor,
                          total_len: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                          num_heads: int, kv_num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference semantics of com.microsoft::GroupQueryAttention with packed q|k|v and rotary inside
    (do_rotary=1, HF's half-split layout), no padding; for tracing.

    qkv: [1, T, (H + 2 H_kv) * D], not yet rotated; past_k, past_v: [1, H_kv, S, D]; total_len: [] int32
    = pos + T; cos_cache, sin_cache: [S, D/2]. Returns (attention output [1, T, H*D], present_k,
    present_v) with rows pos .. pos+T-1 written.
    """
    t, d = qkv.shape[1], past_k.shape[-1]
    end = int(total_len)
    pos = end - t
    # [1, T, (H + 2 H_kv) D] -> q [1, H, T, D], k/v [1, H_kv, T, D]
    q, k, v = qkv.view(1, t, num_heads + 2 * kv_num_heads, d).transpose(1, 2).split(
        [num_heads, kv_num_heads, kv_num_heads], dim=1)
    cos = torch.cat((cos_cache[pos:end], cos_cache[pos:end]), -1)  # [T, D]
    sin = torch.cat((sin_cache[pos:end], sin_cache[pos:end]), -1)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    present_k, present_v = past_k.clone(), past_v.clone()
    present_k[:, :, pos:end] = k
    present_v[:, :, pos:end] = v
    mask = torch.ones(t, end, dtype=torch.bool).tril(pos)  # [T, pos+T]
    y = grouped_sdpa(q, present_k[:, :, :end], present_v[:, :, :end], mask)
    return y.transpose(1, 2).reshape(1, t, num_heads * d), present_k, present_v


@group_query_attention.register_fake
def _(qkv, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache, num_heads, kv_num_heads):
    d = past_k.shape[-1]
    return qkv.new_empty(1, qkv.shape[1], num_heads * d), torch.empty_like(past_k), torch.empty_like(past_v)


class GQACache:
    """One layer's cache as graph input `past` and output `present` (bound to the same buffer at run
    time); the layer's attention is FusedAttention, which hands both to GroupQueryAttention."""

    def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor):
        self.past_k, self.past_v = past_k, past_v
        self.outputs: tuple[torch.Tensor, torch.Tensor] = (past_k, past_v)

    def attend(self, q, k, v, positions):
        raise RuntimeError("GQACache needs FusedAttention: trace under fused_attention(model)")


class FusedAttention(nn.Module):
    """A layer's attention as ONNX Runtime runs it fastest: one q|k|v projection (one MatMulNBits
    when quantized) and GroupQueryAttention applying the rotary embedding itself, instead of three
    projections and the rotary spelled out in ~20 small ops per layer."""

    def __init__(self, attn: Attention, cos_cache: torch.Tensor, sin_cache: torch.Tensor):
        super().__init__()
        self.n_heads, self.n_kv_heads = attn.n_heads, attn.n_kv_heads
        w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])  # [(H + 2 H_kv) D, dim]
        self.qkv_proj = nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.qkv_proj.weight = nn.Parameter(w.detach(), requires_grad=False)
        self.o_proj = attn.o_proj
        self.register_buffer("cos_cache", cos_cache, persistent=False)
        self.register_buffer("sin_cache", sin_cache, persistent=False)

    def forward(self, x, cos, sin, positions, cache: GQACache):
        last = positions[-1:].to(torch.int32)  # [1]: pos + T - 1, GQA's seqlens_k
        y, present_k, present_v = torch.ops.layerskip.group_query_attention(
            self.qkv_proj(x), cache.past_k, cache.past_v, last, (last + 1).reshape(()), self.cos_cache,
            self.sin_cache, self.n_heads, self.n_kv_heads)
        cache.outputs = (present_k, present_v)
        return self.o_proj(y)


@contextmanager
def fused_attention(model: Transformer, max_seq_len: int):
    """Swap every layer's attention for FusedAttention while tracing the gqa graphs, then restore it
    (the same model object may be lowered to a .pte next). (A packed gate|up projection measured no
    faster: 0.352 vs 0.351 ms per full call, shipped model, int4.)"""
    positions = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = positions[:, None] * model.inv_freq[None, :]  # [S, D/2], as Transformer.rope computes them
    cos_cache, sin_cache = freqs.cos(), freqs.sin()
    originals = [layer.self_attn for layer in model.layers]
    try:
        for layer, attn in zip(model.layers, originals):
            layer.self_attn = FusedAttention(attn, cos_cache, sin_cache)
        yield model
    finally:
        for layer, attn in zip(model.layers, originals):
            layer.self_attn = attn


class SDPACache:
    """One layer's cache as the full buffer input; outputs only the new rows."""

    def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor):
        self.past_k, self.past_v = past_k, past_v
        self.outputs: tuple[torch.Tensor, torch.Tensor] = (past_k, past_v)

    def attend(self, q, k, v, positions):
        _, n_heads, t, d = q.shape
        n_kv, s = k.shape[1], self.past_k.shape[2]
        groups = n_heads // n_kv
        self.outputs = (k, v)
        # q: [1, H, T, D] -> [1, H_kv, G*T, D]: each KV head attends for its group of query heads
        qg = q.reshape(1, n_kv, groups * t, d) * d ** -0.5
        past_scores = qg @ self.past_k.transpose(2, 3)  # [1, H_kv, G*T, S]
        past_ok = torch.arange(s)[None, :] < positions[:1, None]  # [1, S]: rows before this call
        past_scores = past_scores.masked_fill(~past_ok, float("-inf"))
        new_scores = qg @ k.transpose(2, 3)  # [1, H_kv, G*T, T]
        causal = torch.ones(t, t, dtype=torch.bool).tril().repeat(groups, 1)  # [G*T, T]
        new_scores = new_scores.masked_fill(~causal, float("-inf"))
        probs = F.softmax(torch.cat([past_scores, new_scores], dim=-1), dim=-1)
        y = probs[..., :s] @ self.past_v + probs[..., s:] @ v  # [1, H_kv, G*T, D]
        return y.reshape(1, n_heads, t, d)


CACHE_KINDS = {"gqa": GQACache, "row": GQACache, "sdpa": SDPACache}
