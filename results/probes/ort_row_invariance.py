"""Probe: does ONNX Runtime (CPU, one thread) give an attention row the same bits at 1 and at T rows?

Attention-shaped products at SmolLM2's shapes (3 KV heads, D = 64, S = 512 keys), fp32, three forms:
  matmul      q @ K^T, softmax, @ V                        (MatMul with M = T rows)
  matmul_kq   K @ q^T, softmax over S, V^T @ p^T           (the rows become columns: N = T)
  elementwise ReduceSum(q * K), softmax, ReduceSum(p * V)  (no GEMM)
For T in 2..16, the max abs difference of each row against the same row run alone; 0 = invariant.
And what the invariant (elementwise) form costs per layer at 1 and 5 query rows (G = 3 query heads
per KV head, as SmolLM2), median of 5 x 100 calls. Also (matmul_vs_two_rows) each row of the matmul form against the same row computed as the first of
a 2-row call, for T in 2..16.

    python results/probes/ort_row_invariance.py   # -> results/probe_ort_row_invariance.json
"""
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

H, S, D = 3, 512, 64
ROWS = (2, 3, 5, 8, 16)
rng = np.random.default_rng(0)
K = rng.standard_normal((H, S, D), dtype=np.float32)
V = rng.standard_normal((H, S, D), dtype=np.float32)
Q = rng.standard_normal((H, 16, D), dtype=np.float32)


def session(nodes, inputs, initializers=()):
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", inputs, [y], initializer=list(initializers))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def row_differences(sess, feeds, rows_of):
    """feeds(q [H, T, D]) -> inputs; rows_of(output) -> [H, T, D]."""
    alone = [rows_of(sess.run(None, feeds(Q[:, i:i + 1]))[0])[:, 0] for i in range(16)]
    out = {}
    for t in ROWS:
        together = rows_of(sess.run(None, feeds(Q[:, :t]))[0])
        out[t] = float(max(np.abs(together[:, i] - alone[i]).max() for i in range(t)))
    return out


def value(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


results = {}
sess = session([helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), helper.make_node("MatMul", ["q", "kt"], ["s"]),
                helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])],
               [value("q", [H, None, D]), value("k", [H, S, D]), value("v", [H, S, D])])
results["matmul"] = row_differences(sess, lambda q: {"q": q, "k": K, "v": V}, lambda y: y)
in_pairs = [sess.run(None, {"q": Q[:, i:i + 2], "k": K, "v": V})[0][:, 0] for i in range(15)]
results["matmul_vs_two_rows"] = {
    t: float(max(np.abs(sess.run(None, {"q": Q[:, :t], "k": K, "v": V})[0][:, i] - in_pairs[i]).max()
                 for i in range(min(t, 15)))) for t in ROWS}

sess = session([helper.make_node("MatMul", ["k", "qt"], ["st"]), helper.make_node("Softmax", ["st"], ["pt"], axis=1),
                helper.make_node("MatMul", ["vt", "pt"], ["y"])],
               [value("qt", [H, D, None]), value("k", [H, S, D]), value("vt", [H, D, S])])
results["matmul_kq"] = row_differences(
    sess, lambda q: {"qt": np.ascontiguousarray(q.transpose(0, 2, 1)), "k": K, "vt": np.ascontiguousarray(V.transpose(0, 2, 1))},
    lambda y: y.transpose(0, 2, 1))

last, keys = helper.make_tensor("last", TensorProto.INT64, [1], [-1]), helper.make_tensor("keys", TensorProto.INT64, [1], [2])
sess = session([helper.make_node("Mul", ["q4", "k4"], ["m"]), helper.make_node("ReduceSum", ["m", "last"], ["s"], keepdims=0),
                helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("Unsqueeze", ["p", "last"], ["p4"]),
                helper.make_node("Mul", ["p4", "v4"], ["pv"]), helper.make_node("ReduceSum", ["pv", "keys"], ["y"], keepdims=0)],
               [value("q4", [H, None, 1, D]), value("k4", [H, 1, S, D]), value("v4", [H, 1, S, D])], (last, keys))
results["elementwise"] = row_differences(sess, lambda q: {"q4": q[:, :, None, :], "k4": K[:, None], "v4": V[:, None]}, lambda y: y)


def elementwise_us(rows: int) -> float:
    feeds = {"q4": rng.standard_normal((H, 3 * rows, 1, D), dtype=np.float32), "k4": K[:, None], "v4": V[:, None]}
    for _ in range(20):
        sess.run(None, feeds)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(100):
            sess.run(None, feeds)
        times.append((time.perf_counter() - start) / 100 * 1e6)
    return statistics.median(times)


elementwise_cost = {rows: round(elementwise_us(rows), 1) for rows in (1, 5)}

record = {"onnxruntime": ort.__version__, "shape": {"kv_heads": H, "keys": S, "head_dim": D},
          "max_abs_difference_by_rows": results, "elementwise_us_per_layer_by_rows": elementwise_cost}
print(json.dumps(record, indent=1))
with open("results/probe_ort_row_invariance.json", "w") as f:
    json.dump(record, f, indent=1)
