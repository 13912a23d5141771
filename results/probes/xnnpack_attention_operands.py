"""Probe: the row-invariant attention's batch-matmuls with the caches as right operands (today's form,
packed by XNNPACK every call) or as left operands (read in place; the query and the weights packed).

One layer's attention, 3 KV heads x 64, 256 keys, lowered alone to XNNPACK with a dynamic row count;
median of 7 x 300 calls at 5, 1 and 5 rows, one thread.

    python results/probes/xnnpack_attention_operands.py
"""
import statistics
import tempfile
import time

import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import to_edge_transform_and_lower
from executorch.extension.pybindings import portable_lib
from executorch.runtime import Runtime
from torch.export import Dim, export

portable_lib._unsafe_reset_threadpool(1)
H, D, L = 3, 64, 256


class CachesRight(torch.nn.Module):  # today's form: q [H, T, D] @ K^T [H, D, L]; weights @ [V | 1] [H, L, D + 1]
    def forward(self, q, k_t, v1, mask):
        s = torch.bmm(q, k_t) * D ** -0.5 + mask
        w = torch.exp(s - s.amax(-1, keepdim=True))
        y = torch.bmm(w, v1)
        return y[..., :D] / y[..., D:]


class CachesLeft(torch.nn.Module):  # K [H, L, D] @ q^T [H, D, T]; [V | 1]^T [H, D + 1, L] @ weights [H, L, T]
    def forward(self, q_t, k, v1_t, mask_t):
        s = torch.bmm(k, q_t) * D ** -0.5 + mask_t
        w = torch.exp(s - s.amax(1, keepdim=True))
        y = torch.bmm(v1_t, w)
        return (y[:, :D] / y[:, D:]).permute(0, 2, 1)


def inputs(name, t):
    if name == "CachesRight":
        return torch.randn(H, t, D), torch.randn(H, D, L), torch.randn(H, L, D + 1), torch.zeros(t, L)
    return torch.randn(H, D, t), torch.randn(H, L, D), torch.randn(H, D + 1, L), torch.zeros(L, t)


def lower(module, example, tmp):
    t = Dim("t", min=1, max=8)
    dims = ({1: t}, None, None, {0: t}) if isinstance(module, CachesRight) else ({2: t}, None, None, {1: t})
    program = to_edge_transform_and_lower(export(module, example, dynamic_shapes=dims, strict=False),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    path = f"{tmp}/{type(module).__name__}.pte"
    open(path, "wb").write(program.buffer)
    return Runtime.get().load_program(path).load_method("forward")


def main():
    tmp = tempfile.mkdtemp()
    methods = {type(m).__name__: lower(m, inputs(type(m).__name__, 5), tmp) for m in (CachesRight(), CachesLeft())}
    for t in (5, 1, 5):
        for name, method in methods.items():
            args = inputs(name, t)
            for _ in range(50):
                method.execute(args)
            times = []
            for _ in range(7):
                start = time.perf_counter()
                for _ in range(300):
                    method.execute(args)
                times.append((time.perf_counter() - start) / 300 * 1e6)
            print(f"{t} rows, {name}: {statistics.median(times):.1f} us")


if __name__ == "__main__":
    main()
