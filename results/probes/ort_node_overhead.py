"""Probe: ONNX Runtime's own cost per node: a chain of 1 and of 88 Mul nodes on [1, 768] fp32 (graph optimizations off,
one thread), us per session run (median of 5 x 2000 after 200).

    taskset -c 0 python results/probes/ort_node_overhead.py
"""
import statistics, time, numpy as np, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
def timed(sess, feeds, n=2000):
    for _ in range(200): sess.run(None, feeds)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n): sess.run(None, feeds)
        ts.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(ts)
for count in (1, 88):
    nodes = [helper.make_node("Mul", [f"x{i}", "c"], [f"x{i+1}"]) for i in range(count)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 768])],
                          [helper.make_tensor_value_info(f"x{count}", TensorProto.FLOAT, [1, 768])],
                          [numpy_helper.from_array(np.ones((1, 768), np.float32), "c")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions(); so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    print(count, "Mul nodes:", round(timed(s, {"x0": np.ones((1, 768), np.float32)}), 2), "us per run")
