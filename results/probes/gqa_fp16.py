"""Probe: would an fp16 KV cache make ONNX Runtime's CPU GroupQueryAttention cheaper? One GQA node at the shipped
model's shape (4 heads x 64, 768 positions), q/k/v and the shared past/present buffer in fp32 or fp16, one thread,
medians of 7 x 300 calls, 1 / 2 / 6 query rows at positions 20 / 250 / 600. (It is not, at any point measured.)

    taskset -c 0 python results/probes/gqa_fp16.py
"""
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import helper, TensorProto as T
S, H, D = 768, 4, 64
def model(dt):
    inputs = [helper.make_tensor_value_info("q", dt, [1, "n", H * D]), helper.make_tensor_value_info("k", dt, [1, "n", H * D]),
              helper.make_tensor_value_info("v", dt, [1, "n", H * D]),
              helper.make_tensor_value_info("pk", dt, [1, H, S, D]), helper.make_tensor_value_info("pv", dt, [1, H, S, D]),
              helper.make_tensor_value_info("sl", T.INT32, [1, 1]), helper.make_tensor_value_info("tl", T.INT32, [1])]
    outs = [helper.make_tensor_value_info("o", dt, [1, "n", H * D]), helper.make_tensor_value_info("prk", dt, [1, H, S, D]),
            helper.make_tensor_value_info("prv", dt, [1, H, S, D])]
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "tl"], ["o", "prk", "prv"],
                            domain="com.microsoft", num_heads=H, kv_num_heads=H)
    g = helper.make_graph([node], "g", inputs, outs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]).SerializeToString()
so = ort.SessionOptions(); so.intra_op_num_threads = 1
for dt, npdt in ((T.FLOAT, np.float32), (T.FLOAT16, np.float16)):
    try:
        s = ort.InferenceSession(model(dt), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        print(dt, "fails:", str(e)[:200]); continue
    pk = np.random.randn(1, H, S, D).astype(npdt); pv = np.random.randn(1, H, S, D).astype(npdt)
    b = s.io_binding()
    pko = ort.OrtValue.ortvalue_from_numpy(pk); pvo = ort.OrtValue.ortvalue_from_numpy(pv)
    for pos in (20, 250, 600):
        for n in (1, 2, 6):
            q = np.random.randn(1, n, H * D).astype(npdt)
            b.bind_cpu_input("q", q); b.bind_cpu_input("k", q); b.bind_cpu_input("v", q)
            b.bind_ortvalue_input("pk", pko); b.bind_ortvalue_input("pv", pvo)
            b.bind_ortvalue_output("prk", pko); b.bind_ortvalue_output("prv", pvo)
            b.bind_cpu_input("sl", np.array([[pos + n - 1]], np.int32)); b.bind_cpu_input("tl", np.array([S], np.int32))
            b.bind_output("o")
            ts = []
            for r in range(7):
                t = time.perf_counter()
                for i in range(300): s.run_with_iobinding(b)
                ts.append((time.perf_counter() - t) / 300 * 1e6)
            print(f"{'fp32' if dt == T.FLOAT else 'fp16'} pos {pos} rows {n}: {statistics.median(ts):.1f} us")
