"""Probe: does an artifact's verify give a row the same logits in a 1-row call as in a 5-row call?

After the same prompt (through draft + verify), four more tokens are drafted one by one; then the
verify runs over the 5 cached rows, over 1 and over 2 of them (each call rewrites the same cache
rows; causal attention keeps row 0 independent of the rows after it). Also the full-model call on the
first token against the 1-row verify. Max abs logit differences, one line each.

    python results/probes/verify_rows.py ARTIFACT_DIR
"""
import sys

import numpy as np

from runtime.loader import open_artifact

opened = open_artifact(sys.argv[1], threads=1)
backend = opened.backend
prompt = opened.tokenizer.encode('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n')
n = len(prompt)
tokens = [prompt[-1], 100, 200, 300, 400]


def prefilled():
    backend.reset()
    backend.draft(prompt, 0)
    backend.verify(0, n)


prefilled()
for k, token in enumerate(tokens):
    backend.draft([token], n + k)
rows5 = np.array(backend.verify(n, 5))
rows1 = np.array(backend.verify(n, 1))
rows2 = np.array(backend.verify(n, 2))
print(f"{sys.argv[1]}: row 0, 1-row vs 5-row verify {np.abs(rows1[0] - rows5[0]).max():.3g}; "
      f"2-row vs 5-row {np.abs(rows2[0] - rows5[0]).max():.3g}")
prefilled()
full = np.array(backend.forward([tokens[0]], n)).reshape(-1)
print(f"{sys.argv[1]}: full-model call vs 1-row verify {np.abs(full - rows1[0]).max():.3g}")
