"""Probe: would an int8 KV cache (ExecuTorch's quantized cache + llama::custom_quantized_sdpa) make
the .pte's attention cheaper than the fp32 cache + llama::custom_sdpa we use?

The shipped model's attention shape (4 heads of 64, cache of 1024 positions), one thread, the two
kernels called through torch (ExecuTorch's custom-op library registers them), medians of 300 calls,
1 and 5 query rows at several positions. The int8 path quantizes per token and head (asymmetric),
as ExecuTorch's QuantizedKVCache does; the query is quantized the same way, as the op requires.

    taskset -c 0 python results/probes/int8_kv_sdpa.py results/probe_int8_kv_sdpa.json
"""
import json
import statistics
import sys
import time

import torch
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401

torch.set_num_threads(1)
CACHE, HEADS, HEAD_DIM = 1024, 4, 64


def per_token_int8(x):
    scales, zeros = torch.ops.quantized_decomposed.choose_qparams_per_token_asymmetric.default(x, torch.int8)
    q = torch.ops.quantized_decomposed.quantize_per_token(x, scales, zeros, -128, 127, torch.int8)
    return q, scales.float(), zeros.to(torch.int8)


def median_us(fn, n=300):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main(out: str) -> None:
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, CACHE, HEADS, HEAD_DIM, generator=g) for _ in range(2))
    (kq, ks, kz), (vq, vs, vz) = per_token_int8(k), per_token_int8(v)
    rows = []
    for repeat in range(3):
        for tokens in (1, 5):
            q = torch.randn(1, tokens, HEADS, HEAD_DIM, generator=g)
            qq, qs, qz = per_token_int8(q)
            for pos in (50, 200, 300, 700):
                fp32 = median_us(lambda: torch.ops.llama.custom_sdpa(q, k, v, pos, None, 0, True))
                int8 = median_us(lambda: torch.ops.llama.custom_quantized_sdpa(
                    qq, kq, vq, pos, None, 0.0, True, None, qz, qs, kz, ks, vz, vs, False))
                rows.append({"repeat": repeat, "query_rows": tokens, "position": pos, "fp32_us": round(fp32, 1),
                             "int8_us": round(int8, 1), "int8_over_fp32": round(int8 / fp32, 2)})
                print(rows[-1], flush=True)
    json.dump({"machine": "AMD EPYC, 2 cores, taskset -c 0, one thread", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "rows": rows}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
