"""Probe: us per draft_verify call of an ONNX artifact by rows (1, 2, 4, 6) and per 1-row draft call, at position 250,
medians of 25 interleaved rounds of 100 calls. Run from each checkout to compare kernel versions (the runtime builds
the op library from the checkout's sources), in turns:

    (cd CHECKOUT && taskset -c 0 python /path/to/onnx_draft_verify_rows.py ART/onnx)
"""
import sys, time, statistics
sys.path.insert(0, '.')  # the checkout it is run from
from runtime.loader import open_artifact
b = open_artifact(sys.argv[1], threads=1).backend
P = 250
b.draft([5] * 7, P)
calls = {f"dv{r}": (lambda r=r: b.draft_verify([5] * r, P)) for r in (1, 2, 4, 6)}
calls["draft1"] = lambda: b.draft([5], P)
times = {k: [] for k in calls}
for _ in range(25):
    for k, c in calls.items():
        t = time.perf_counter()
        for _ in range(100): c()
        times[k].append((time.perf_counter() - t) * 1e4)
print(" ".join(f"{k} {statistics.median(v):.1f}" for k, v in times.items()))
