"""The eager PyTorch backend: the reference every exported backend is compared against.

Logits leave it as numpy views of the output tensors (no copy), as the Backend protocol says.
"""

from __future__ import annotations

from typing import Sequence

import torch

from models.model import Transformer


class EagerBackend:
    name = "eager"

    def __init__(self, model: Transformer, exit_layer: int, max_seq_len: int):
        model.config.check_exit_layer(exit_layer)
        self.model = model.eval()
        self.exit_layer = exit_layer
        self.num_layers = model.config.num_hidden_layers
        self.max_seq_len = max_seq_len
        self.max_tokens_per_call = max_seq_len
        model.setup_caches(max_seq_len, dtype=torch.float32)
        self.exit_cache = torch.zeros(max_seq_len, model.config.hidden_size)  # layer-E hidden states by position

    @staticmethod
    def _inputs(tokens: Sequence[int], pos: int):
        return torch.tensor([list(tokens)], dtype=torch.long), torch.tensor([pos], dtype=torch.long)

    @torch.inference_mode()
    def draft(self, tokens, pos):
        tokens_t, pos_t = self._inputs(tokens, pos)
        out = self.model.prefix(tokens_t, pos_t, self.exit_layer, logits="last")
        self.exit_cache[pos:pos + len(tokens)] = out.hidden[0]
        return out.logits[0, -1].numpy()  # [1, 1, V] -> [V]

    @torch.inference_mode()
    def verify(self, pos, count):
        hidden = self.exit_cache[pos:pos + count][None]  # [1, count, dim]
        return self.model.suffix(hidden, torch.tensor([pos]), self.exit_layer)[0].numpy()

    has_draft_verify = True

    def draft_verify(self, tokens, pos):
        """draft and verify in one call, as artifacts exported for exact lookup have it: logits [count, V]."""
        self.draft(tokens, pos)
        return self.verify(pos, len(tokens))

    @torch.inference_mode()
    def forward(self, tokens, pos):
        tokens_t, pos_t = self._inputs(tokens, pos)
        return self.model(tokens_t, pos_t)[0, -1].numpy()  # [1, T, V] -> [V]

    def reset(self):
        # Stale positions are masked out and overwritten, so zeroing is for hygiene, not correctness.
        for cache in self.model.caches:
            cache.k.zero_()
            cache.v.zero_()
        self.exit_cache.zero_()
