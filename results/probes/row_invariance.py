"""Probe: which `.pte` kernels give a row of a T-row call the same bits as a 1-row call?

Greedy self-speculation emits the verify call's argmax for rows that plain decoding computes one
row per call; where a kernel's result for a row depends on how many rows share the call, near-ties
can break differently (SmolLM2 int4: greedy self-spec == plain decoding on 1-3 of 10 prompts).
Three kernels, SmolLM2-135M's shapes (hidden 576, 9 query / 3 KV heads of 64), row 0 compared:
- an 8da4w linear 576 -> 1536 (groups of 32 and one scale per output channel) and an fp32 one,
  each lowered alone to XNNPACK, at 1, 2 and 5 rows;
- ExecuTorch's `llama::custom_sdpa` (called through torch; the kernel the .pte runs), 1..8 query rows
  at cache position 20, causal (keys start + T) and with an explicit mask over a fixed 512-key cache;
- ONNX Runtime's MatMulNBits int4 576 -> 1536 (accuracy levels 0 and 4, blocks of 32, 64, 128) and
  an fp32 MatMul, at 1, 2, 3, 4, 5 and 8 rows (one thread).

    python results/probes/row_invariance.py results/probe_row_invariance.json
"""
import json
import sys

import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import to_edge_transform_and_lower
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
from torchao.quantization.granularity import PerAxis, PerGroup

torch.manual_seed(0)
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, CACHE, START = 576, 1536, 9, 3, 64, 512, 20


def lowered_rows(module, x):
    program = to_edge_transform_and_lower(torch.export.export(module, (x,)), partitioner=[XnnpackPartitioner()])
    buffer = program.to_executorch().buffer  # kept alive while the loaded program runs from it
    return _load_for_executorch_from_buffer(buffer).forward([x])[0].clone()


def linear_row0_diffs() -> dict:
    x = torch.randn(1, 5, HIDDEN)
    out = {}
    for name, granularity in (("8da4w group 32", PerGroup(32)), ("8da4w per channel", PerAxis(0)), ("fp32", None)):
        linear = torch.nn.Sequential(torch.nn.Linear(HIDDEN, INTER, bias=False)).eval()
        if granularity is not None:
            quantize_(linear, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                    weight_granularity=granularity))
        rows = {t: lowered_rows(linear, x[:, :t].contiguous()) for t in (1, 2, 5)}
        out[name] = {f"{t} rows": float((rows[t][0, 0] - rows[1][0, 0]).abs().max()) for t in (2, 5)}
    return out


def sdpa_row0_diffs() -> dict:
    k, v = torch.randn(1, CACHE, KV_HEADS, HEAD_DIM), torch.randn(1, CACHE, KV_HEADS, HEAD_DIM)
    q = torch.randn(1, 8, HEADS, HEAD_DIM)

    def mask(t):  # [T, CACHE]: 0 where the key is at or before the query's position, -inf after
        return torch.where(torch.arange(CACHE)[None] <= START + torch.arange(t)[:, None], 0.0, float("-inf"))

    causal = {t: torch.ops.llama.custom_sdpa(q[:, :t].contiguous(), k, v, START, None, 0, True) for t in range(1, 9)}
    masked = {t: torch.ops.llama.custom_sdpa(q[:, :t].contiguous(), k, v, START, mask(t), 0, False)
              for t in range(1, 9)}
    return {kind: {f"{t} rows": float((rows[t][0, 0] - rows[1][0, 0]).abs().max()) for t in range(2, 9)}
            for kind, rows in (("causal", causal), ("masked, fixed key count", masked))}


def matmul_nbits_row0_diffs() -> dict:
    import copy

    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((HIDDEN, INTER)) * 0.05).astype(np.float32)
    x = rng.standard_normal((8, HIDDEN)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, INTER])],
                              [numpy_helper.from_array(weight, "w")])
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1

    def row0_diffs(model) -> dict:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        one = session.run(None, {"x": x[:1]})[0][0]
        return {f"{t} rows": float(np.abs(session.run(None, {"x": x[:t]})[0][0] - one).max()) for t in (2, 3, 4, 5, 8)}

    out = {"fp32 MatMul": row0_diffs(fp32)}
    for level in (0, 4):
        for block in (32, 64, 128):
            quantizer = MatMulNBitsQuantizer(copy.deepcopy(fp32), block_size=block, is_symmetric=True,
                                             accuracy_level=level)
            quantizer.process()
            out[f"MatMulNBits int4, accuracy level {level}, block {block}"] = row0_diffs(quantizer.model.model)
    return out


if __name__ == "__main__":
    result = {"row 0 of a T-row call minus the 1-row call, max abs": {
        "xnnpack linear": linear_row0_diffs(), "llama::custom_sdpa": sdpa_row0_diffs(),
        "onnxruntime": matmul_nbits_row0_diffs()}}
    print(json.dumps(result, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)
