"""torch.onnx's translation of layerskip::group_query_attention to ONNX Runtime's contrib op.

(No `from __future__ import annotations` here: onnxscript reads these annotations as types.)
"""

import onnxscript
import torch
from onnxscript import FLOAT, INT32

import export.onnx_attention  # noqa: F401  (registers torch.ops.layerskip.group_query_attention)

msft = onnxscript.values.Opset("com.microsoft", 1)


@onnxscript.script(msft)
def group_query_attention(qkv: FLOAT, past_k: FLOAT, past_v: FLOAT, seqlens_k: INT32, total_len: INT32,
                          cos_cache: FLOAT, sin_cache: FLOAT, num_heads: int,
                          kv_num_heads: int) -> tuple[FLOAT, FLOAT, FLOAT]:
    # key and value omitted: `qkv` is packed [1, T, (H + 2 H_kv) D]; do_rotary rotates q and k at
    # positions seqlens_k + 1 - T .. seqlens_k from the caches (HF's half-split layout: not interleaved)
    out, present_k, present_v = msft.GroupQueryAttention(
        qkv, None, None, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache,
        num_heads=num_heads, kv_num_heads=kv_num_heads, do_rotary=1, rotary_interleaved=0)
    return out, present_k, present_v


def translation_table() -> dict:
    return {torch.ops.layerskip.group_query_attention.default: group_query_attention}
