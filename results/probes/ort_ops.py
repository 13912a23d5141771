"""Probe: our ONNX Runtime ops against ONNX Runtime's own, one node per session, us per call (median of 7 x 300
calls, one thread; a session call's own overhead, ~3 us here, included in both):
  - attention: layerskip.RowAttention vs com.microsoft GroupQueryAttention, the shipped model's layer (4 heads, 4 KV
    heads x 64, cache of 768), at positions 20 / 250 / 600 and 1 / 2 / 6 query rows;
  - linears: layerskip.LinearQ4 vs MatMulNBits (4 bits, accuracy level 4) on the same weights, the shipped model's
    shapes (K x N: q|k|v 256 x 768, o 256 x 256, gate / up 256 x 768, down 768 x 256, head 256 x 4096) at blocks of
    128, 1 / 2 / 6 rows.

    taskset -c 0 python results/probes/ort_ops.py
"""
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from quant.onnx_schemes import to_linear_q4  # noqa: E402
from runtime.kernels import ort_ops_library  # noqa: E402
from test_onnx import matmulnbits_graph, row_attention_session  # noqa: E402


def us_per_call(run, n: int = 300) -> float:
    for _ in range(30):
        run()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(n):
            run()
        times.append(1e6 * (time.perf_counter() - t) / n)
    return statistics.median(times)


def attention() -> None:
    heads, head_dim, cache_rows = 4, 64, 768
    rng = np.random.default_rng(0)
    sessions = {kind: row_attention_session(heads, heads, head_dim, cache_rows, kind) for kind in ("gqa", "row")}
    for pos in (20, 250, 600):
        for rows in (1, 2, 6):
            cost = {}
            for kind, session in sessions.items():
                binding = session.io_binding()
                binding.bind_cpu_input("qkv", rng.standard_normal((1, rows, 3 * heads * head_dim)).astype(np.float32))
                binding.bind_cpu_input("seqlens_k", np.array([pos + rows - 1], np.int32))
                binding.bind_cpu_input("total", np.array(pos + rows, np.int32))
                for name in ("k", "v"):
                    cache = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, heads, cache_rows, head_dim))
                                                             .astype(np.float32))
                    binding.bind_ortvalue_input(f"past_{name}", cache)
                    binding.bind_ortvalue_output(name, cache)
                binding.bind_output("y")
                cost[kind] = us_per_call(lambda: session.run_with_iobinding(binding))
            print(f"attention, position {pos}, {rows} rows: GroupQueryAttention {cost['gqa']:.1f} us, "
                  f"RowAttention {cost['row']:.1f} us", flush=True)


def linears() -> None:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.register_custom_ops_library(str(ort_ops_library()))
    rng = np.random.default_rng(0)
    for k, n in ((256, 768), (256, 256), (768, 256), (256, 4096)):
        proto, _ = matmulnbits_graph(k, n, 128)
        ours = to_linear_q4(onnx.ModelProto.FromString(proto.SerializeToString()))
        sessions = {name: ort.InferenceSession(p.SerializeToString(), so, providers=["CPUExecutionProvider"])
                    for name, p in (("MatMulNBits", proto), ("LinearQ4", ours))}
        for rows in (1, 2, 6):
            x = rng.standard_normal((rows, k)).astype(np.float32)
            cost = {name: us_per_call(lambda s=s: s.run(None, {"x": x})) for name, s in sessions.items()}
            print(f"linear {k} x {n}, {rows} rows: MatMulNBits {cost['MatMulNBits']:.1f} us, "
                  f"LinearQ4 {cost['LinearQ4']:.1f} us", flush=True)


if __name__ == "__main__":
    attention()
    linears()
