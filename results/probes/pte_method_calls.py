"""Probe: us per call of a .pte's methods by rows (forward, draft_verify, draft), position 250, one thread, best of 5 x
600 calls after 300 warm-up calls; tokens are zeros and the caches hold whatever earlier calls wrote, so only the cost
is meaningful. Build nothing: the kernel library is built or taken from $LAYERSKIP_KERNEL_DIR as the runtime does.

    taskset -c 0 python results/probes/pte_method_calls.py ART/pte [ART2/pte ...]
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtime.executorch_backend import load_program  # noqa: E402


def us_per_call(method, args, calls: int = 3000) -> float:
    for _ in range(300):
        method.execute(args)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls // 5):
            method.execute(args)
        best = min(best, (time.perf_counter() - start) / (calls // 5) * 1e6)
    return best


def main() -> None:
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(1)
    position = torch.tensor([250])
    for artifact in sys.argv[1:]:
        program = load_program(str(Path(artifact) / "model.pte"), own_kernels=True)
        methods = {name: program.load_method(name) for name in ("forward", "draft_verify", "draft")}
        for rows in (1, 2, 4, 5):
            tokens = torch.zeros(1, rows, dtype=torch.long)
            costs = "  ".join(f"{name} {us_per_call(m, (tokens, position)):.1f}" for name, m in methods.items())
            print(f"{artifact}: {rows} rows: {costs}", flush=True)


if __name__ == "__main__":
    main()
