"""Probe: where an ONNX verify call's time goes as its rows grow (ONNX Runtime's own profiler).

After a 200-token prompt, verify.onnx runs --calls times on rows 200 .. 200+T-1 (unpadded, `verify_rows`)
for each T, in a profiled session of its own; node times are summed by operator type and divided by the
calls. The profiler adds its own cost to every node, so compare rows with rows, not with wall times.

    python results/probes/onnx_verify_ops_by_rows.py ARTIFACT/onnx [--rows 1 2 5 6] [--json F.json]
"""
import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np  # noqa: E402

from runtime import onnx_backend  # noqa: E402
from runtime.bench import machine  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--json")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ortprof-")
    plain_options = onnx_backend.session_options

    def profiled(threads):
        so = plain_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = f"{tmp}/verify"
        return so

    onnx_backend.session_options = profiled
    backend = open_artifact(a.artifact, threads=1).backend
    prompt = np.random.default_rng(0).integers(2, 200, size=200).tolist()
    for start in range(0, 200, 64):
        backend.draft(prompt[start:start + 64], start)
        backend.verify(start, len(prompt[start:start + 64]))
    backend.draft([5] * 8, 200)
    by_rows = {}
    for rows in a.rows:
        backend._sessions.pop("verify", None)
        session = backend._get("verify")  # a new profiled session: its file holds these calls only
        for _ in range(a.calls):
            backend.verify_rows(200, rows)
        events = json.load(open(session.session.end_profiling()))
        us = collections.defaultdict(float)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                us[e["args"]["op_name"]] += e["dur"] / a.calls
        by_rows[str(rows)] = {"total_us": sum(us.values()), **dict(sorted(us.items(), key=lambda kv: -kv[1]))}
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(by_rows[str(rows)].items())[:4])
        print(f"{rows} rows: {top} (us per call)")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "artifact": a.artifact, "position": 200,
                                            "calls": a.calls, "us_per_call_by_rows": by_rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
