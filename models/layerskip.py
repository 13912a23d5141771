"""The LayerSkip training recipe: layer dropout, the early-exit loss and its curricula.

Pure functions of (config, step, layer): the training loop in models/train.py applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.errors import UserError
from models.model import Transformer

DROPOUT_SCALES = ("exp", "linear", "uniform")
CURRICULA = ("none", "rotational", "gradual")


@dataclass
class LayerSkipRecipe:
    """`off()` gives the ablation: plain last-layer training."""

    dropout_max: float = 0.2  # p_max: the last layer's dropout rate
    dropout_scale: str = "exp"  # how p_l rises with depth: exp (2^x - 1), linear, uniform
    early_exit: bool = True
    curriculum: str = "rotational"  # which layers carry the early-exit loss at a step
    rotation_interval: int = 2  # rotational: every R-th layer, shifted by one each step
    early_exit_scale: float = 1.0  # e_scale: weight of non-final layers before normalising
    # The exit you will deploy (E = layers run; 0: none): its loss is in every step, weighted
    # focus_weight x the last layer's before normalising. Pulls exit quality (and, in some runs, the
    # copying circuit) to layers <= E; where the circuit lands also depends on the seed (model cards).
    focus_exit: int = 0
    focus_weight: float = 1.0
    # Self-distillation (not in the paper): an early exit's loss is (1 - a) x its cross-entropy on the
    # next token + a x KL(last layer's distribution, detached || the exit's). What acceptance counts is
    # agreement with the last layer, not with the data; a = 0 is the paper's loss.
    exit_distill: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.dropout_max < 1.0:
            raise UserError(f"--layer-dropout {self.dropout_max} is out of range; pass a rate in [0, 1).")
        if self.dropout_scale not in DROPOUT_SCALES:
            raise UserError(f"--dropout-scale {self.dropout_scale!r} is unknown; use one of {', '.join(DROPOUT_SCALES)}.")
        if self.curriculum not in CURRICULA:
            raise UserError(f"--curriculum {self.curriculum!r} is unknown; use one of {', '.join(CURRICULA)}.")
        if self.rotation_interval < 1:
            raise UserError(f"--rotation-interval {self.rotation_interval} must be >= 1.")
        if self.early_exit_scale < 0:
            raise UserError(f"--early-exit-scale {self.early_exit_scale} must be >= 0.")
        if self.focus_exit < 0 or self.focus_weight < 0:
            raise UserError("--focus-exit and --focus-weight must be >= 0.")
        if not 0.0 <= self.exit_distill <= 1.0:
            raise UserError(f"--exit-distill {self.exit_distill} is out of range; pass a weight in [0, 1].")

    @classmethod
    def off(cls) -> "LayerSkipRecipe":
        return cls(dropout_max=0.0, early_exit=False)

    def dropout_rates(self, n_layers: int) -> list[float]:
        """p_l = p_max * s(l / (L-1)); with s(x) = 2^x - 1 the first layer is never dropped."""
        def scale(x: float) -> float:
            return {"exp": 2.0 ** x - 1.0, "linear": x, "uniform": 1.0}[self.dropout_scale]
        return [self.dropout_max * scale(l / max(n_layers - 1, 1)) for l in range(n_layers)]

    def exit_layers(self, step: int, total_steps: int, n_layers: int) -> list[int]:
        """Layer indices whose output carries a loss at this step; the last layer always does."""
        last = n_layers - 1
        if not self.early_exit:
            return [last]
        if self.curriculum == "none":
            early = list(range(last))
        elif self.curriculum == "rotational":
            early = [l for l in range(last) if (l + step) % self.rotation_interval == 0]
        else:  # gradual: enable layers from last to first as training proceeds
            enabled = math.ceil((step + 1) / max(total_steps, 1) * last)
            early = list(range(last - enabled, last))
        if self.focus_exit and self.focus_exit - 1 not in early:
            early = sorted(early + [self.focus_exit - 1])
        return early + [last]

    def loss_weights(self, layers: list[int], n_layers: int) -> list[float]:
        """Weights growing linearly with depth, e_scale on non-final layers, normalised to sum to one;
        the focus exit's raw weight is focus_weight (the last layer's is 1)."""
        def raw_weight(l: int) -> float:
            if l == n_layers - 1:
                return 1.0
            if l == self.focus_exit - 1:
                return self.focus_weight
            return (l + 1) / n_layers * self.early_exit_scale
        raw = [raw_weight(l) for l in layers]
        total = sum(raw)
        return [w / total for w in raw]


class LayerSkipLoss(nn.Module):
    """The model's training forward: layer dropout per sample, then the weighted early-exit loss.

    A module (not a function) so that DistributedDataParallel can wrap it.
    """

    def __init__(self, model: Transformer, distill: float = 0.0):
        super().__init__()
        self.model = model
        self.distill = distill  # LayerSkipRecipe.exit_distill

    def forward(self, tokens, targets, keep, exit_layers: list[int], weights: list[float]):
        """tokens, targets: [B, T]; keep: [L, B] bool (False = skip layer l for sample b).

        Returns (weighted loss, {layer: that layer's loss}).
        """
        model = self.model
        h = model.embed_tokens(tokens)  # [B, T, dim]
        cos, sin = model.rope(torch.arange(tokens.shape[1], device=tokens.device))
        losses, exit_logits = {}, {}
        last = len(model.layers) - 1
        for l, layer in enumerate(model.layers):
            h = skip_or_run(layer, h, keep[l], cos, sin)
            if l in exit_layers:
                logits = model.exit_logits(h).flatten(0, 1).float()  # [B*T, vocab]
                losses[l] = F.cross_entropy(logits, targets.flatten())
                if self.distill:
                    exit_logits[l] = logits
        total = sum(w * self.exit_loss(l, losses[l], exit_logits, last) for l, w in zip(exit_layers, weights))
        return total, {l: v.detach() for l, v in losses.items()}

    def exit_loss(self, layer: int, cross_entropy, exit_logits: dict, last: int):
        """The loss layer `layer` trains on: its cross-entropy, mixed with the KL to the last layer."""
        a = self.distill
        if layer == last or a == 0.0:
            return cross_entropy
        target = F.log_softmax(exit_logits[last].detach(), dim=-1)
        kl = F.kl_div(F.log_softmax(exit_logits[layer], dim=-1), target, log_target=True, reduction="batchmean")
        return (1.0 - a) * cross_entropy + a * kl


def skip_or_run(layer: nn.Module, h: torch.Tensor, keep: torch.Tensor, cos, sin) -> torch.Tensor:
    """Run `layer` only on the samples it keeps; skipped samples pass through unchanged."""
    if bool(keep.all()):
        return layer(h, cos, sin, None)
    if not bool(keep.any()):
        return h
    out = h.clone()
    out[keep] = layer(h[keep], cos, sin, None)
    return out
