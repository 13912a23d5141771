"""Probe: how ONNX Runtime's 4-bit MatMulNBits grows with the rows of a call when its weights do not fit the caches.

A chain of 48 square 2048 x 2048 linears (201M weights, 100 MB at 4 bits), quantized by ONNX Runtime's
MatMulNBitsQuantizer (symmetric, accuracy level 4: int8 activations, as our exports), run on 1..5 rows;
median of 5 x 30 calls. With --split, the same chain at a fixed row count with each linear's rows split into
several MatMulNBits calls on the same weights (Split -> MatMulNBits each -> Concat): whether calls of fewer rows
cost less in all.

    taskset -c 0 python results/probes/matmulnbits_chain.py --threads 1 [--blocks 32 128 256] [--levels 4 1 0]
    python results/probes/matmulnbits_chain.py --threads 2 --blocks 128 256
    taskset -c 0 python results/probes/matmulnbits_chain.py --threads 1 --split
"""
import argparse
import logging

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from matmulnbits_rows import ms_per_call  # this folder's: median of 5 x 30 calls

K, LAYERS = 2048, 48


def chain(block: int, level: int, split=None) -> bytes:
    """split: None, or the row counts each linear's input is cut into."""
    rng = np.random.default_rng(0)
    nodes, weights, prev = [], [], "x"
    for i in range(LAYERS):
        weights.append(numpy_helper.from_array((rng.standard_normal((K, K)) * 0.02).astype(np.float32), f"W{i}"))
        if split is None:
            nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"]))
        else:
            weights.append(numpy_helper.from_array(np.array(split, np.int64), f"split{i}"))
            parts, outs = [f"h{i}_in{j}" for j in range(len(split))], [f"h{i}_out{j}" for j in range(len(split))]
            nodes.append(helper.make_node("Split", [prev, f"split{i}"], parts, axis=0))
            nodes += [helper.make_node("MatMul", [p, f"W{i}"], [o]) for p, o in zip(parts, outs)]
            nodes.append(helper.make_node("Concat", outs, [f"h{i}"], axis=0))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["M", K])], weights)
    q = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                             block_size=block, is_symmetric=True, accuracy_level=level)
    q.process()
    return q.model.model.SerializeToString()


def session(model: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--blocks", type=int, nargs="*", default=[32, 128, 256])
    p.add_argument("--levels", type=int, nargs="*", default=[4])
    p.add_argument("--split", action="store_true")
    a = p.parse_args()
    logging.disable(logging.INFO)
    x = np.random.default_rng(1).standard_normal((8, K)).astype(np.float32)
    for block in a.blocks:
        for level in a.levels:
            s = session(chain(block, level), a.threads)
            ms = {m: ms_per_call(s, x[:m]) for m in range(1, 6)}
            print(f"threads {a.threads}, block {block}, accuracy level {level}: ms per call at 1..5 rows "
                  + " / ".join(f"{v:.2f}" for v in ms.values()) + "; x 1 row: "
                  + " / ".join(f"{v / ms[1]:.2f}" for v in ms.values()), flush=True)
            if a.split:
                for cut in ([2, 2], [1, 1, 1, 1], [3, 2], [2, 2, 1]):
                    v = ms_per_call(session(chain(block, level, cut), a.threads), x[:sum(cut)])
                    print(f"  rows cut {cut}: {v:.2f} ms ({v / ms[1]:.2f}x 1 row; uncut {ms[sum(cut)]:.2f})", flush=True)


if __name__ == "__main__":
    main()
