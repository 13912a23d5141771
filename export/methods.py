"""The exported methods: thin modules around the model's own prefix/suffix functions.

    draft   (tokens [1, T] long, input_pos [1] long) -> hidden [1, T, dim], logits [1, vocab] (last position)
    verify  (hidden [1, T, dim], input_pos [1] long) -> logits [1, T, vocab]
    forward (tokens [1, T] long, input_pos [1] long) -> logits [1, vocab] (last position; the full model)
    forward_all (tokens, input_pos) -> logits [1, T, vocab]  (only for the two-model baseline's target)

T is dynamic, 1 .. max_tokens_per_call. The KV caches are the model's buffers (ExecuTorch) or
explicit inputs/outputs (ONNX); either way these modules call the same model code.
"""

from __future__ import annotations

import torch
from torch import nn

from models.model import Transformer

METHODS = ("draft", "verify", "forward")


class DraftMethod(nn.Module):
    def __init__(self, model: Transformer, exit_layer: int):
        super().__init__()
        self.model, self.exit_layer = model, exit_layer

    def forward(self, tokens, input_pos, caches=None):
        out = self.model.prefix(tokens, input_pos, self.exit_layer, logits="last", caches=caches)
        return out.hidden, out.logits[:, -1]


class VerifyMethod(nn.Module):
    def __init__(self, model: Transformer, exit_layer: int):
        super().__init__()
        self.model, self.exit_layer = model, exit_layer

    def forward(self, hidden, input_pos, caches=None):
        return (self.model.suffix(hidden, input_pos, self.exit_layer, caches=caches),)


class FullMethod(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, input_pos, caches=None):
        n = self.model.config.num_hidden_layers
        hidden = self.model.run_layers(self.model.embed_tokens(tokens), input_pos, 0, n, caches)
        return (self.model.exit_logits(hidden[:, -1:])[:, -1],)


class FullLogitsMethod(nn.Module):
    """The full model with logits for every position: the target of a two-model speculation baseline."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, input_pos, caches=None):
        return (self.model(tokens, input_pos, caches),)


def method_layers(name: str, exit_layer: int, n_layers: int) -> range:
    """The layers whose KV cache a method reads and writes."""
    return {"draft": range(0, exit_layer), "verify": range(exit_layer, n_layers)}.get(name, range(0, n_layers))


def output_names(name: str) -> list[str]:
    return ["hidden", "logits"] if name == "draft" else ["logits"]


def method_module(name: str, model: Transformer, exit_layer: int) -> nn.Module:
    return {"draft": lambda: DraftMethod(model, exit_layer), "verify": lambda: VerifyMethod(model, exit_layer),
            "forward": lambda: FullMethod(model), "forward_all": lambda: FullLogitsMethod(model)}[name]()


def example_inputs(name: str, model: Transformer, tokens: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.tensor([0], dtype=torch.long)
    if name == "verify":
        return torch.zeros(1, tokens, model.config.hidden_size), pos
    return torch.zeros(1, tokens, dtype=torch.long), pos
