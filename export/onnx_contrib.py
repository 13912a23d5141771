"""torch.onnx's translation of layerskip::group_query_attention to ONNX Runtime's contrib op.

(No `from __future__ import annotations` here: onnxscript reads these annotations as types.)
"""

import onnxscript
import torch
from onnxscript import FLOAT, INT32

import export.onnx_attention  # noqa: F401  (registers torch.ops.layerskip.group_query_attention)

msft = onnxscript.values.Opset("com.microsoft", 1)


@onnxscript.script(msft)
def group_query_attention(q: FLOAT, k: FLOAT, v: FLOAT, past_k: FLOAT, past_v: FLOAT, seqlens_k: INT32,
                          total_len: INT32, num_heads: int, kv_num_heads: int) -> tuple[FLOAT, FLOAT, FLOAT]:
    out, present_k, present_v = msft.GroupQueryAttention(
        q, k, v, past_k, past_v, seqlens_k, total_len, num_heads=num_heads, kv_num_heads=kv_num_heads)
    return out, present_k, present_v


def translation_table() -> dict:
    return {torch.ops.layerskip.group_query_attention.default: group_query_attention}
