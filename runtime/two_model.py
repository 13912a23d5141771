"""The two-model baseline for memory: what a user would build without LayerSkip's shared weights.

A separate draft model (the first E layers, with their own copy of the embedding, norm and head,
and their own KV cache) drafts; the full model verifies the drafted tokens from scratch through
its own layers. Both run as .pte programs. It implements the Backend protocol, so the same
decoding loops run it; its "exit cache" holds token ids instead of hidden states.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from export.to_pte import lower, prepare_for_executorch, save, trace
from models.model import Transformer
from quant.torchao_schemes import quantize_model
from runtime.executorch_backend import load_program


def truncated(model: Transformer, layers: int) -> Transformer:
    """A model of the first `layers` layers with copies of the embedding, final norm and head."""
    from models.config import ModelConfig

    cfg = ModelConfig.from_dict({**model.config.to_dict(), "num_hidden_layers": layers})
    draft = Transformer(cfg)
    state = {k: v for k, v in copy.deepcopy(model.state_dict()).items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < layers}
    draft.load_state_dict(state, strict=False)
    return draft.eval()


def export_two_models(checkpoint: Path, exit_layer: int, quant: str, group_size: int, max_seq_len: int,
                      max_tokens: int, directory: Path) -> dict[str, Path]:
    """draft.pte (first E layers, method forward) and target.pte (full model, method forward_all)."""
    from models.checkpoint import load_model

    model, _ = load_model(checkpoint)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, m, method in (("draft", truncated(model, exit_layer), "forward"),
                            ("target", copy.deepcopy(model), "forward_all")):
        quantize_model(m, quant, group_size)
        prepare_for_executorch(m, max_seq_len)
        program = lower(trace(m, [method], exit_layer, max_tokens), "xnnpack", {})
        paths[role] = directory / f"{role}.pte"
        save(program, paths[role])
    return paths


class TwoModelBackend:
    name = "executorch-two-model"

    def __init__(self, paths: dict[str, Path], exit_layer: int, num_layers: int, max_seq_len: int, max_tokens: int):
        self._draft = load_program(paths["draft"]).load_method("forward")
        self._target = load_program(paths["target"]).load_method("forward_all")
        self.exit_layer, self.num_layers = exit_layer, num_layers
        self.max_seq_len, self.max_tokens_per_call = max_seq_len, max_tokens
        self.tokens = torch.zeros(max_seq_len, dtype=torch.long)

    def draft(self, tokens, pos):
        t = torch.tensor([list(tokens)], dtype=torch.long)
        self.tokens[pos:pos + len(tokens)] = t[0]
        return self._draft.execute((t, torch.tensor([pos])))[0][0].numpy()

    def verify(self, pos, count):
        return self._target.execute((self.tokens[pos:pos + count][None], torch.tensor([pos])))[0][0].numpy()

    def reset(self):
        pass


def file_sizes(paths: dict[str, Path]) -> int:
    return sum(p.stat().st_size for p in paths.values())

