"""The exported methods: thin modules around the model's own prefix/suffix functions.

    draft        (tokens [1, T], input_pos [1]) -> hidden [1, T, dim], logits [1, vocab] (last position)
    verify       (hidden [1, T, dim], input_pos [1]) -> logits [1, T, vocab]
    draft_verify (tokens [1, T], input_pos [1]) -> hidden [1, T, dim], logits [1, T, vocab]
                 draft (without its exit head) and verify in one call: a step whose drafts were looked up
                 in the context needs no exit logits (artifacts exported for exact lookup)
    forward      (tokens [1, T], input_pos [1]) -> logits [1, vocab] (last position; the full model)
    draft_greedy (token [1, 1], input_pos [1]) -> drafts [d], hidden [1, d+1, dim]
                 d greedy draft steps and the last draft's prefix pass in one call (static d)
    forward_all  (tokens, input_pos) -> logits [1, T, vocab]  (only the two-model baseline's target)
    all          (tokens, input_pos) -> hidden, draft_logits, verify_logits, logits: draft, verify and
                 forward in one graph, for a target that traces once and cuts the methods out (ONNX)

T is dynamic, 1 .. max_tokens_per_call. Token ids and positions are int64. The KV caches are the
model's buffers (ExecuTorch) or explicit inputs/outputs (ONNX); either way these modules call the
same model code. Each returns a tuple of tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from models.model import Transformer

DEFAULT_METHODS = ("draft", "verify", "forward")
# In artifacts exported for exact lookup (export/pipeline.py: ExportConfig.methods_for): one call instead of a
# draft and a verify call per lookup step, which saves one call's fixed cost (shipped model at int4, 6 rows at
# position 200: 551.7 vs 585.5 us on the .pte). It holds every layer, so its weights are in memory once more
# (XNNPACK packs each method's, each ONNX Runtime session holds its own): only for models small enough that
# a call's fixed cost matters and a second copy of the weights is cheap (SmolLM2-135M: -1.2% per 6-row call,
# +64 MB peak RSS; README, "Eleven sessions ago").
LOOKUP_METHOD = "draft_verify"
LOOKUP_METHOD_MAX_PARAMETERS = 50_000_000
# draft_greedy is opt-in (export.py --fused-draft): on XNNPACK here it is no faster than d draft calls
# (fp32, default model: 5.08 ms per fused call vs 5 x 0.97 ms) and packs the prefix weights again
# (fp32 default model self-speculating: 529 MB peak RSS with it, 447 MB without).
FUSED_DRAFT_METHOD = "draft_greedy"


class DraftMethod(nn.Module):
    def __init__(self, model: Transformer, exit_layer: int):
        super().__init__()
        self.model, self.exit_layer = model, exit_layer

    def forward(self, tokens, input_pos, caches=None):
        out = self.model.prefix(tokens, input_pos, self.exit_layer, logits="last", caches=caches)
        return out.hidden, out.logits[:, -1]


class DraftGreedyMethod(nn.Module):
    """Greedy drafting without leaving the graph: one call instead of d + 1."""

    def __init__(self, model: Transformer, exit_layer: int, draft_length: int):
        super().__init__()
        self.model, self.exit_layer, self.draft_length = model, exit_layer, draft_length

    def forward(self, token, input_pos, caches=None):
        x, drafts, hidden = token, [], []
        for k in range(self.draft_length + 1):
            want = "last" if k < self.draft_length else "none"  # the last draft only needs its hidden state
            out = self.model.prefix(x, input_pos + k, self.exit_layer, logits=want, caches=caches)
            hidden.append(out.hidden)
            if k < self.draft_length:
                x = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
                drafts.append(x)
        return torch.cat(drafts, 1)[0], torch.cat(hidden, 1)


class VerifyMethod(nn.Module):
    def __init__(self, model: Transformer, exit_layer: int):
        super().__init__()
        self.model, self.exit_layer = model, exit_layer

    def forward(self, hidden, input_pos, caches=None):
        return (self.model.suffix(hidden, input_pos, self.exit_layer, caches=caches),)


class DraftVerifyMethod(nn.Module):
    def __init__(self, model: Transformer, exit_layer: int):
        super().__init__()
        self.model, self.exit_layer = model, exit_layer

    def forward(self, tokens, input_pos, caches=None):
        hidden = self.model.prefix(tokens, input_pos, self.exit_layer, logits="none", caches=caches).hidden
        return hidden, self.model.suffix(hidden, input_pos, self.exit_layer, caches=caches)


class FullMethod(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, input_pos, caches=None):
        n = self.model.config.num_hidden_layers
        hidden = self.model.run_layers(self.model.embed_tokens(tokens), input_pos, 0, n, caches)
        return (self.model.exit_logits(hidden[:, -1:])[:, -1],)


class FullLogitsMethod(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, input_pos, caches=None):
        return (self.model(tokens, input_pos, caches),)


class AllMethods(nn.Module):
    """draft, verify and forward as one graph. The verify part reads only `hidden` (and input_pos),
    so the graph cut at `hidden` is the verify method; each part computes what its method does."""

    def __init__(self, model: Transformer, exit_layer: int):
        super().__init__()
        self.model, self.exit_layer = model, exit_layer

    def forward(self, tokens, input_pos, caches=None):
        m = self.model
        draft = m.prefix(tokens, input_pos, self.exit_layer, logits="last", caches=caches)
        out = m.run_layers(draft.hidden, input_pos, self.exit_layer, m.config.num_hidden_layers, caches)
        return draft.hidden, draft.logits[:, -1], m.exit_logits(out), m.exit_logits(out[:, -1:])[:, -1]


def method_module(name: str, model: Transformer, exit_layer: int, draft_length: int = 1) -> nn.Module:
    return {"draft": lambda: DraftMethod(model, exit_layer),
            "draft_greedy": lambda: DraftGreedyMethod(model, exit_layer, draft_length),
            "verify": lambda: VerifyMethod(model, exit_layer),
            "draft_verify": lambda: DraftVerifyMethod(model, exit_layer),
            "forward": lambda: FullMethod(model),
            "forward_all": lambda: FullLogitsMethod(model),
            "all": lambda: AllMethods(model, exit_layer)}[name]()


def output_names(name: str) -> list[str]:
    return {"draft": ["hidden", "logits"], "draft_greedy": ["drafts", "hidden"], "draft_verify": ["hidden", "logits"],
            "all": ["hidden", "draft_logits", "verify_logits", "logits"]}.get(name, ["logits"])


def has_dynamic_tokens(name: str) -> bool:
    return name != "draft_greedy"


def example_inputs(name: str, model: Transformer, tokens: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.tensor([0], dtype=torch.long)
    if name == "verify":
        return torch.zeros(1, tokens, model.config.hidden_size), pos
    return torch.zeros(1, 1 if name == "draft_greedy" else tokens, dtype=torch.long), pos
