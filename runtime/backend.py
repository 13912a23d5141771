"""What a backend must provide to the decoding loops: the draft prefix, the verify suffix, a reset.

A backend owns the KV cache of every layer and the *exit cache*: the hidden states at layer E that
`draft` computed for each position. `verify` reads its input from the exit cache, so the suffix
consumes the prefix activations computed while drafting and never recomputes layers < E.
Positions are contiguous; overwriting a position (after a rollback) replaces what was there.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch


class Backend(Protocol):
    exit_layer: int  # E: draft = layers [0, E), verify = layers [E, L)
    num_layers: int
    max_seq_len: int  # positions 0 .. max_seq_len-1 fit in the caches
    max_tokens_per_call: int  # the most tokens one draft/verify call takes (longer prompts are chunked)
    name: str  # e.g. "eager", "executorch", "onnxruntime-cpu"

    def draft(self, tokens: Sequence[int], pos: int) -> torch.Tensor:
        """Layers [0, E) on `tokens` at positions pos.. (writing their KV and exit-cache rows).

        Returns the exited logits (final norm + LM head at layer E) of the last position: [vocab].
        """
        ...

    def verify(self, pos: int, count: int) -> torch.Tensor:
        """Layers [E, L) on the exit-cache rows pos .. pos+count-1 (writing their KV): logits [count, vocab]."""
        ...

    def reset(self) -> None:
        """Forget every cached position (a new sequence starts at position 0)."""
        ...


class FullModel(Protocol):
    """Optional: the whole model as one call, the baseline of plain autoregressive decoding."""

    def forward(self, tokens: Sequence[int], pos: int) -> torch.Tensor:
        """All layers on `tokens` at positions pos..: logits of the last position [vocab]."""
        ...


def has_full_model(backend) -> bool:
    return callable(getattr(backend, "forward", None))


def last_row(logits: torch.Tensor) -> torch.Tensor:
    """[1, T, V] or [T, V] -> [V]."""
    return logits.reshape(-1, logits.shape[-1])[-1]


def exit_cache(max_seq_len: int, dim: int, dtype=torch.float32) -> torch.Tensor:
    """[max_seq_len, dim] layer-E hidden states by position."""
    return torch.zeros(max_seq_len, dim, dtype=dtype)


def positions_fit(backend: Backend, pos: int, count: int) -> Optional[str]:
    if pos + count > backend.max_seq_len:
        return f"positions {pos}..{pos + count - 1} exceed the cache of {backend.max_seq_len}"
    return None
