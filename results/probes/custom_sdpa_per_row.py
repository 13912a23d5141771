"""Probe: llama::custom_sdpa (called through torch) at 1 query row, at 6 rows in one call, and as 6 one-row calls
(what a verify attending each row as the full-model call does would cost), shipped shape (4 heads x 64, 768
positions), one thread, medians of 7 repeats.

    taskset -c 0 python results/probes/custom_sdpa_per_row.py
"""
import statistics
import time

import torch
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401

torch.set_num_threads(1)
S, H, D = 768, 4, 64
k, v = torch.randn(1, S, H, D), torch.randn(1, S, H, D)


def us_per_call(fn, n=2000):
    times = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(times)


for pos in (20, 250, 600):
    one, six = torch.randn(1, 1, H, D), torch.randn(1, 6, H, D)
    alone = us_per_call(lambda: torch.ops.llama.custom_sdpa(one, k, v, pos, None, 0, True))
    together = us_per_call(lambda: torch.ops.llama.custom_sdpa(six, k, v, pos, None, 0, True))
    apart = us_per_call(lambda: [torch.ops.llama.custom_sdpa(six[:, i:i + 1], k, v, pos + i, None, 0, True)
                                 for i in range(6)], 500)
    print(f"position {pos}: 1 row {alone:.1f} us, 6 rows {together:.1f} us, 6 one-row calls {apart:.1f} us")
