"""KV caches for the ONNX graphs: the cache tensors are graph inputs, not module buffers.

gqa (default): ONNX Runtime's com.microsoft GroupQueryAttention. The runtime binds each layer's
    past_key input and present_key output to the same [1, H_kv, S, D] buffer, so the op writes the
    new rows in place and attends over positions < total_sequence_length only: no cache copies, no
    work on unused positions, and rollback is passing a smaller position.
sdpa: standard ONNX ops only (any ONNX runtime). The graph reads the whole [1, H_kv, S, D] buffer,
    masks positions >= pos, attends to the new keys as a second block, and outputs the new rows
    [1, H_kv, T, D]; the runtime writes them into its buffer. Attention runs over all S positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.model import grouped_sdpa

ATTENTION_KINDS = ("gqa", "sdpa")


@torch.library.custom_op("layerskip::group_query_attention", mutates_args=())
def group_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                          past_v: torch.Tensor, seqlens_k: torch.Tensor, total_len: torch.Tensor,
                          num_heads: int, kv_num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference semantics of com.microsoft::GroupQueryAttention (no rotary, no padding), for tracing.

    q: [1, T, H*D]; k, v: [1, T, H_kv*D]; past_k, past_v: [1, H_kv, S, D]; total_len: [] int32 = pos + T.
    Returns (attention output [1, T, H*D], present_k, present_v) with rows pos .. pos+T-1 written.
    """
    t, d = q.shape[1], past_k.shape[-1]
    end = int(total_len)
    pos = end - t
    present_k, present_v = past_k.clone(), past_v.clone()
    present_k[:, :, pos:end] = k.view(1, t, kv_num_heads, d).transpose(1, 2)
    present_v[:, :, pos:end] = v.view(1, t, kv_num_heads, d).transpose(1, 2)
    mask = torch.ones(t, end, dtype=torch.bool).tril(pos)  # [T, pos+T]
    y = grouped_sdpa(q.view(1, t, num_heads, d).transpose(1, 2), present_k[:, :, :end], present_v[:, :, :end], mask)
    return y.transpose(1, 2).reshape(1, t, num_heads * d), present_k, present_v


@group_query_attention.register_fake
def _(q, k, v, past_k, past_v, seqlens_k, total_len, num_heads, kv_num_heads):
    return torch.empty_like(q), torch.empty_like(past_k), torch.empty_like(past_v)


class GQACache:
    """One layer's cache as graph input `past` and output `present` (bound to the same buffer at run time)."""

    def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor):
        self.past_k, self.past_v = past_k, past_v
        self.outputs: tuple[torch.Tensor, torch.Tensor] = (past_k, past_v)

    def attend(self, q, k, v, positions):
        _, n_heads, t, d = q.shape
        n_kv = k.shape[1]
        last = positions[-1:].to(torch.int32)  # [1]: pos + T - 1, GQA's seqlens_k
        y, present_k, present_v = torch.ops.layerskip.group_query_attention(
            q.transpose(1, 2).reshape(1, t, n_heads * d), k.transpose(1, 2).reshape(1, t, n_kv * d),
            v.transpose(1, 2).reshape(1, t, n_kv * d), self.past_k, self.past_v, last, (last + 1).reshape(()),
            n_heads, n_kv)
        self.outputs = (present_k, present_v)
        return y.view(1, t, n_heads, d).transpose(1, 2)


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


CACHE_KINDS = {"gqa": GQACache, "sdpa": SDPACache}
