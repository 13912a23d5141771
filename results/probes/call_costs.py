"""Probe: per-call costs of artifacts at one position, interleaved in one process (medians of rounds).

For each artifact: a 1-token and a 6-token draft call, a 1-token and a 6-token verify call, and a 1-token
full-model call at position 200, each as the runtime makes it (ONNX calls padded as the artifact says).
Used to compare attention and layout variants of one model.

    taskset -c 0 python results/probes/call_costs.py DIR/pte OTHER/pte ... [--json F.json]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtime.bench import machine  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402

POSITION = 200


def interleaved(calls: dict, n: int = 100, rounds: int = 40) -> dict:
    """us per call: the median over rounds of n calls each, the calls taking turns round by round."""
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t = time.perf_counter()
            for _ in range(n):
                call()
            times[name].append(1e6 * (time.perf_counter() - t) / n)
    return {k: round(statistics.median(v), 1) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--json")
    a = p.parse_args()
    calls = {}
    for path in a.artifacts:
        b = open_artifact(path, threads=1, preload=("forward", "draft", "verify")).backend
        b.draft([5] * 6, POSITION)  # fills the exit-cache rows the verify calls read
        calls.update({f"{path} draft 1": lambda b=b: b.draft([5], POSITION),
                      f"{path} draft 6": lambda b=b: b.draft([5] * 6, POSITION),
                      f"{path} verify 1": lambda b=b: b.verify(POSITION, 1),
                      f"{path} verify 6": lambda b=b: b.verify(POSITION, 6),
                      f"{path} forward 1": lambda b=b: b.forward([5], POSITION)})
    us = interleaved(calls)
    for k, v in us.items():
        print(f"{k:60s} {v:7.1f} us")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "position": POSITION, "us_per_call": us}, indent=1))


if __name__ == "__main__":
    main()
