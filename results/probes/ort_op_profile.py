"""Probe: where an ONNX artifact's call time goes, by op type (ONNX Runtime's profiler; its timings are inflated
by profiling, the shares are not). One method, ROWS rows at position POS, 300 calls after loading.

    ROWS=2 POS=250 taskset -c 0 python results/probes/ort_op_profile.py ART/onnx [draft_verify]
"""
import collections
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import runtime.onnx_backend as onnx_backend  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402

CALLS = 300
PROFILES = Path(tempfile.mkdtemp())  # ONNX Runtime writes one profile per session; kept out of the working tree
plain_options = onnx_backend.session_options


def profiled_options(threads):
    so = plain_options(threads)
    so.enable_profiling = True
    so.profile_file_prefix = str(PROFILES / "ort")
    return so


def main() -> None:
    artifact, method = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "draft_verify"
    rows, pos = int(os.environ.get("ROWS", 2)), int(os.environ.get("POS", 250))
    onnx_backend.session_options = profiled_options
    backend = open_artifact(artifact, threads=1, preload=None).backend
    call = {"draft_verify": lambda: backend.draft_verify([5] * rows, pos), "draft": lambda: backend.draft([5] * rows, pos),
            "verify": lambda: backend.verify(pos, rows), "forward": lambda: backend.forward([5] * rows, pos)}[method]
    for _ in range(CALLS):
        call()
    profile = Path(backend._get(method).session.end_profiling())
    events = json.loads(profile.read_text())
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    print(f"{method}, {rows} rows at position {pos}: {sum(by_op.values()) / CALLS:.1f} us per call (profiled)")
    for op, us in by_op.most_common(8):
        print(f"  {op:34s} {us / CALLS:7.1f} us")
    shutil.rmtree(PROFILES, ignore_errors=True)


if __name__ == "__main__":
    main()
