"""What a backend must provide to the decoding loops: the draft prefix, the verify suffix, a reset.

A backend owns the KV cache of every layer and the *exit cache*: the hidden states at layer E that
`draft` computed for each position. `verify` reads its input from the exit cache, so the suffix
consumes the prefix activations computed while drafting and never recomputes layers < E.
Positions are contiguous; overwriting a position (after a rollback) replaces what was there.
Logits cross this boundary as float32 numpy arrays (torch backends convert without copying), so the
decoding loops and an app running an ONNX artifact need no PyTorch.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class Backend(Protocol):
    exit_layer: int  # E: draft = layers [0, E), verify = layers [E, L)
    num_layers: int
    max_seq_len: int  # positions 0 .. max_seq_len-1 fit in the caches
    max_tokens_per_call: int  # the most tokens one draft/verify call takes (longer prompts are chunked)
    name: str  # e.g. "eager", "executorch", "onnxruntime-cpu"

    def draft(self, tokens: Sequence[int], pos: int) -> np.ndarray:
        """Layers [0, E) on `tokens` at positions pos.. (writing their KV and exit-cache rows).

        Returns the exited logits (final norm + LM head at layer E) of the last position: [vocab].
        """
        ...

    def verify(self, pos: int, count: int) -> np.ndarray:
        """Layers [E, L) on the exit-cache rows pos .. pos+count-1 (writing their KV): logits [count, vocab]."""
        ...

    def reset(self) -> None:
        """Forget every cached position (a new sequence starts at position 0)."""
        ...


class DraftVerify(Protocol):
    """Optional (has_draft_verify True): draft and verify of the same rows in one call, for a step whose
    drafts were looked up in the context; each row with the bits of 1-token draft + verify calls."""

    has_draft_verify: bool

    def draft_verify(self, tokens: Sequence[int], pos: int) -> np.ndarray:
        """Layers [0, L) on `tokens` at positions pos.. (writing their KV and exit-cache rows).

        Returns the logits of every position: [count, vocab]."""
        ...


class DraftGuess(Protocol):
    """Optional (has_draft_guess True): a draft call cheaper than `draft`, whose rows may have other bits, for
    drafts whose rows a draft_verify call computes again from the same position before anything reads them."""

    has_draft_guess: bool

    def draft_guess(self, tokens: Sequence[int], pos: int) -> np.ndarray:
        """As draft: the exited logits of the last position [vocab]."""
        ...


class FullModel(Protocol):
    """Optional: the whole model as one call, the baseline of plain autoregressive decoding."""

    def forward(self, tokens: Sequence[int], pos: int) -> np.ndarray:
        """All layers on `tokens` at positions pos..: logits of the last position [vocab]."""
        ...


def has_full_model(backend) -> bool:
    return callable(getattr(backend, "forward", None))
