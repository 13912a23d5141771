"""Probe: an ONNX artifact's call, unprofiled wall time per backend call (median of 7 x 300 after 100), then the same
under ONNX Runtime's profiler: a run's duration, the sum of its kernels' and the node count by op type. TREE: the
checkout whose runtime (and kernel sources) to use, for an A/B of two versions of our ops.

    [TREE=DIR] ROWS=1 POS=250 taskset -c 0 python results/probes/ort_call_overhead.py ART/onnx forward
"""
import collections, json, os, statistics, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, os.environ.get("TREE", str(Path(__file__).resolve().parents[2])))
import runtime.onnx_backend as onnx_backend
from runtime.loader import open_artifact
art, method = sys.argv[1], sys.argv[2]
rows, pos = int(os.environ.get("ROWS", 1)), int(os.environ.get("POS", 250))
def wall(backend):
    call = {"forward": lambda: backend.forward([5] * rows, pos), "draft": lambda: backend.draft([5] * rows, pos),
            "verify": lambda: backend.verify(pos, rows)}[method]
    for _ in range(100): call()
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(300): call()
        ts.append((time.perf_counter() - t) / 300 * 1e6)
    return statistics.median(ts), call
b = open_artifact(art, threads=1, preload=None).backend
w, _ = wall(b)
print(f"{method} {rows} rows pos {pos}: wall {w:.1f} us per backend call (unprofiled)")
prof = Path(tempfile.mkdtemp())
plain = onnx_backend.session_options
def opts(threads):
    so = plain(threads); so.enable_profiling = True; so.profile_file_prefix = str(prof / "ort"); return so
onnx_backend.session_options = opts
b = open_artifact(art, threads=1, preload=None).backend
w2, call = wall(b)
ev = json.loads(Path(b._get(method).session.end_profiling()).read_text())
runs = [e["dur"] for e in ev if e.get("cat") == "Session" and e["name"] == "model_run"]
by_op = collections.Counter(); nodes = collections.Counter()
for e in ev:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
        by_op[e["args"]["op_name"]] += e["dur"]; nodes[e["args"]["op_name"]] += 1
n = len(runs)
print(f"profiled: wall {w2:.1f}, model_run median {statistics.median(runs):.1f} us, kernels {sum(by_op.values())/n:.1f} us, nodes per run {sum(nodes.values())/n:.0f}")
for op, us in by_op.most_common(10): print(f"  {op:34s} {us / n:7.1f} us  ({nodes[op]/n:.0f} nodes)")
