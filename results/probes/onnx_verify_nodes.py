"""Probe: which row counts give a verify row the same bits in ONNX Runtime (CPU, one thread), and which
node parts them first.

Every node output of ARTIFACT/verify.onnx becomes a graph output. Over one cache (the presents of a
first call), a row at position p is computed (a) as row i of a T-row call (T = 2..9) and (b) as the second
row of a 2-row call starting at p - 1, and also (c) alone in a 1-row call against row 0 of a 5-row call.
For each case: the max abs logit difference and the first node (in graph order) whose row differs.

    python results/probes/onnx_verify_nodes.py ARTIFACT [ARTIFACT ...] --out F.json
"""
import argparse
import json
import os

import numpy as np
import onnx
import onnxruntime as ort

p = argparse.ArgumentParser()
p.add_argument("artifacts", nargs="+")
p.add_argument("--position", type=int, default=200)
p.add_argument("--out", required=True)
args = p.parse_args()


def probe(artifact: str, pos: int) -> dict:
    model = onnx.load(os.path.join(artifact, "verify.onnx"))
    names = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for o in node.output:
            if o and o not in names:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(o))
                names.add(o)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    order = [o for n in model.graph.node for o in n.output if o]
    op_of = {o: n.op_type for n in model.graph.node for o in n.output}
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((pos + 12, inputs["hidden"].shape[2])).astype(np.float32)
    feeds = {n: 0.5 * rng.standard_normal(i.shape).astype(np.float32) for n, i in inputs.items() if n.startswith("past")}

    def run(start, t, caches):
        f = dict(caches, hidden=hidden[None, start:start + t], input_pos=np.array([start], np.int64))
        return dict(zip(outputs, sess.run(None, f)))

    def with_presents(out):
        return {n: out[n.replace("past", "present")] for n in feeds}

    def row(x, t, r):  # row r of a tensor with a token axis of size t (None if it has none)
        if x.ndim == 3 and x.shape[:2] == (1, t):
            return x[0, r]
        axes = [a for a, d in enumerate(x.shape) if d == t]
        return np.take(x, r, axis=axes[0]) if axes else None

    def compare(a, ta, ra, b, tb, rb):
        first = None
        for o in order:
            if a[o].dtype != np.float32 or o.startswith("present"):
                continue
            x, y = row(a[o], ta, ra), row(b[o], tb, rb)
            if x is not None and y is not None and x.shape == y.shape and not np.array_equal(x, y):
                first = {"node": op_of[o], "output": o, "max_abs_difference": float(np.abs(x - y).max())}
                break
        diff = float(np.abs(row(a["logits"], ta, ra) - row(b["logits"], tb, rb)).max())
        return {"logits_max_abs_difference": diff, "first_differing_node": first}

    base = with_presents(run(pos - 1, 2, feeds))
    result = {"one_row_vs_row_0_of_five": compare(run(pos, 1, base), 1, 0, run(pos, 5, base), 5, 0), "rows": {}}
    for t in range(2, 10):
        call = run(pos, t, base)
        caches = with_presents(call)
        for i in range(1, t):
            result["rows"][f"T={t} row {i}"] = compare(call, t, i, run(pos + i - 1, 2, caches), 2, 1)
    manifest = json.load(open(os.path.join(artifact, "manifest.json")))
    result["quant"], result["block_size"] = manifest["quant"], manifest["group_size"]
    result["rows_differing"] = sorted(k for k, v in result["rows"].items() if v["logits_max_abs_difference"] > 0)
    return result


report = {"onnxruntime": ort.__version__, "position": args.position,
          "artifacts": {a: probe(a, args.position) for a in args.artifacts}}
with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
for a, r in report["artifacts"].items():
    alone = r["one_row_vs_row_0_of_five"]
    print(f"{a} ({r['quant']}, block {r['block_size']}): 1 row vs 5 rows {alone['logits_max_abs_difference']:.3g} "
          f"(first {alone['first_differing_node'] and alone['first_differing_node']['node']}); "
          f"rows of 2..9-row calls differing from a 2-row call: {r['rows_differing'] or 'none'}")
