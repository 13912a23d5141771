"""torchao quantization applied to the model before torch.export (the .pte path).

    none   float32
    8da4w  int8 dynamic per-token activations x int4 weights, per group of G input channels
           (G = 0: one scale per output channel); embedding int4 weight-only, same layout
                                                                 (what --quant int4 means on XNNPACK)
    8da8w  int8 dynamic activations x int8 weights per output channel;
           embedding int8 weight-only per channel                (what --quant int8 means on XNNPACK)

Weight-only quantized linears are not offered: they lower to XNNPACK without error but compute
wrong results in executorch 1.5.1.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.errors import UserError
from models.model import Transformer

SCHEMES = ("none", "8da4w", "8da8w")
ALIASES = {"int4": "8da4w", "int8": "8da8w", "fp32": "none"}


def resolve_scheme(name: str) -> str:
    scheme = ALIASES.get(name, name)
    if scheme not in SCHEMES:
        raise UserError(f"unknown quantization scheme {name!r}; use one of "
                        f"{', '.join(sorted(set(SCHEMES) | set(ALIASES)))}.")
    return scheme


def check_group_size(group_size: int) -> None:
    if group_size != 0 and (group_size < 16 or group_size & (group_size - 1)):
        raise UserError(f"--group-size {group_size} must be 0 (one scale per output channel) or a power of two "
                        f">= 16 (e.g. 32, 64, 128) for the .pte.")


def linear_filter(group_size: int):
    """Linears whose input width the group size divides (others stay float)."""
    def keep(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and (group_size == 0 or module.in_features % group_size == 0)
    return keep


def quantize_model(model: Transformer, scheme: str, group_size: int = 32) -> Transformer:
    """Quantize linears and the embedding in place; the model must not be traced yet."""
    scheme = resolve_scheme(scheme)
    if scheme == "none":
        return model
    check_group_size(group_size)
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if scheme == "8da4w":
        weight_dtype, granularity, groups = torch.int4, PerGroup(group_size) if group_size else PerAxis(0), group_size
    else:
        weight_dtype, granularity, groups = torch.int8, PerAxis(0), 0
    untie(model)
    with torch.no_grad():
        quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=granularity),
                  filter_fn=linear_filter(groups))
        embedding_ok = groups == 0 or model.config.hidden_size % groups == 0
        if embedding_ok:
            quantize_(model, IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=granularity),
                      filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    release_checkpoint_file(model)
    return model


def release_checkpoint_file(model: nn.Module) -> None:
    """Copy the tensors quantization left as they were (norms) out of the checkpoint's memory map.

    A safetensors checkpoint loads as views of one memory-mapped file; while any view lives, every
    page of the file read so far stays mapped and counts as resident. On the 1B shape the norms alone
    kept 4.9 GB resident through lowering (7.4 -> 2.4 GB after quantization once copied out)."""
    for module in model.modules():
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None and type(tensor) in (torch.Tensor, nn.Parameter):
                tensor.data = tensor.data.clone()


def untie(model: Transformer) -> None:
    """Give the LM head its own parameter: the head is quantized for matmul, the embedding for lookup."""
    if model.lm_head.weight is model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.embed_tokens.weight.detach().clone())
