"""Probe: the cost of one draft_verify call (a lookup step) by its row count, at one position, calls taking turns
round by round in one process (call_costs.interleaved: medians of 12 rounds of 40 calls; ONNX rows padded as the
runtime pads them); beside them a one-row draft call, plain decoding's one-row full call, and where the backend has
one its cheap draft call (draft_guess: ONNX Runtime unpadded).

    taskset -c 0 python results/probes/draft_verify_rows.py ART [--position 250] [--rows 1 2 4 6]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from call_costs import interleaved  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("--position", type=int, default=250)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 6])
    a = p.parse_args()
    backend = open_artifact(a.artifact, threads=1, preload=None).backend
    calls = {f"{r} rows": (lambda r=r: backend.draft_verify([5] * r, a.position)) for r in a.rows}
    calls["draft 1 row"] = lambda: backend.draft([5], a.position)
    calls["forward 1 row"] = lambda: backend.forward([5], a.position)  # plain decoding's full call
    if getattr(backend, "has_draft_guess", False):
        calls["draft_guess 1 row"] = lambda: backend.draft_guess([5], a.position)
    costs = interleaved(calls, n=40, rounds=12)
    print(f"{a.artifact}, position {a.position}: " + ", ".join(f"{k} {v:.1f} us" for k, v in costs.items()))


if __name__ == "__main__":
    main()
