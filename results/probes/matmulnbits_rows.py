"""Probe: which rows of a MatMulNBits call (int4, accuracy level 4) have the bits they have alone?

One linear per shape (the shipped model's and SmolLM2's), quantized at each block size; 8 random rows.
For calls of M = 2..8 rows: is row 0 equal to row 0 alone (M = 1), and the last row equal to it alone?
Blocks of 32 give every row its 1-row bits at every M; from 64 on a 1-row call and the last row of an
odd count take another kernel than the pairs (so exact lookup pads 1-row calls at blocks >= 64).
Also the cost of each call at M = 1, 2, 6 (median of 5 x 30 calls), one thread.

    taskset -c 0 python results/probes/matmulnbits_rows.py [--json F.json]
"""
import argparse
import json
import logging
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

SHAPES = [(256, 768), (768, 256), (256, 4096), (576, 3072), (1536, 576), (576, 49152)]  # (K, N)


def session(w: np.ndarray, block: int) -> ort.InferenceSession:
    k, n = w.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [x], [y],
                              [numpy_helper.from_array(w, "W")])
    q = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                             block_size=block, is_symmetric=True, accuracy_level=4)
    q.process()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(q.model.model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ms_per_call(s, x) -> float:
    for _ in range(10):
        s.run(None, {"x": x})
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(30):
            s.run(None, {"x": x})
        runs.append(1e3 * (time.perf_counter() - t) / 30)
    return round(statistics.median(runs), 4)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    a = p.parse_args()
    logging.disable(logging.INFO)
    rng = np.random.default_rng(0)
    out = []
    for k, n in SHAPES:
        w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
        x = rng.standard_normal((8, k)).astype(np.float32)
        for block in (32, 64, 128):
            s = session(w, block)
            alone = [s.run(None, {"x": x[i:i + 1]})[0][0] for i in range(8)]
            calls = {m: s.run(None, {"x": x[:m]})[0] for m in range(1, 9)}
            row = {"K": k, "N": n, "block": block,
                   "row0_as_alone_at_M": [m for m in range(2, 9) if np.array_equal(calls[m][0], alone[0])],
                   "last_row_as_alone_at_M": [m for m in range(2, 9) if np.array_equal(calls[m][m - 1], alone[m - 1])],
                   "ms_per_call": {m: ms_per_call(s, x[:m]) for m in (1, 2, 6)}}
            print(row, flush=True)
            out.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
