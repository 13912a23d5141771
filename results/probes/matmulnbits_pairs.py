"""Probe: does a MatMulNBits row (int4, accuracy level 4) keep its bits across the calls exact lookup pads to pairs?

For the shipped model's and deep16's linear shapes at blocks of 64 and 128 (random weights and rows):
  pair calls: each row of an M = 2, 4, 6, 8 call against the same row in its aligned 2-row call;
  pair slots: each row as the second of a pair (the row before it first) against it as the first.
0 everywhere means a row's bits depend only on it, from 2 rows on (results/probe_matmulnbits_pairs.txt).

    taskset -c 0 python results/probes/matmulnbits_pairs.py
"""
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmulnbits_rows import session  # noqa: E402

SHAPES = [(256, 768), (768, 256), (256, 4096), (192, 192), (192, 512), (192, 576), (512, 192), (192, 4096)]  # (K, N)


def main() -> None:
    logging.disable(logging.INFO)
    rng = np.random.default_rng(0)
    for k, n in SHAPES:
        w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
        x = rng.standard_normal((16, k)).astype(np.float32)
        for block in (64, 128):
            if k % block:
                continue
            s = session(w, block)
            pairs = {j: s.run(None, {"x": x[j:j + 2]})[0] for j in range(0, 8, 2)}
            in_calls = sum(not np.array_equal(s.run(None, {"x": x[:m]})[0][r], pairs[r - r % 2][r % 2])
                           for m in (2, 4, 6, 8) for r in range(m))
            slots = sum(not np.array_equal(s.run(None, {"x": x[[r - 1, r]]})[0][1], s.run(None, {"x": x[[r, r + 1]]})[0][0])
                        for r in range(1, 15))
            print(f"K {k} N {n} block {block}: rows off their pair-call bits {in_calls} of 20; "
                  f"rows whose bits differ by slot {slots} of 14", flush=True)


if __name__ == "__main__":
    main()
