"""Probe: does llama::custom_sdpa give a query row the same bits at every row count? (It does not.)

A random [1, 768, 4, 64] cache; ten query rows at positions 200..209. For rows 0, 1, 3 and 4, the row as
computed in every call that holds it (start s, length T >= 2) against the row alone (T = 1) and against
the row as the last of a 2-row call: ONNX Runtime's kernels agree from 2 rows on (padding makes verify
rows exact there); custom_sdpa does not, so the .pte's verify attends in row-invariant XNNPACK ops.

    python results/probes/custom_sdpa_rows.py
"""
import torch
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401

torch.manual_seed(0)
S, H, D, POS = 768, 4, 64, 200
k, v, queries = torch.randn(1, S, H, D), torch.randn(1, S, H, D), torch.randn(1, 10, H, D)


def call(start, count):
    return torch.ops.llama.custom_sdpa(queries[:, start:start + count], k, v, POS + start, None, 0, True)[0]


for row in (0, 1, 3, 4):
    alone = call(row, 1)[0]
    pair = call(row - 1, 2)[1] if row else call(0, 2)[0]
    held = [(s, t) for t in range(2, 11) for s in range(row + 1) if s + t <= 10 and row - s < t]
    same_alone = sum(torch.equal(call(s, t)[row - s], alone) for s, t in held)
    same_pair = sum(torch.equal(call(s, t)[row - s], pair) for s, t in held)
    print(f"row {row}: equal to the row alone in {same_alone} of {len(held)} calls, to a 2-row call in {same_pair}")
