"""Lowering to ExecuTorch: one .pte holding the draft, verify and full-model methods.

Weights are stored once (the serializer keys constant data by content, so the LM head and final norm
shared by the methods appear once) and one KV cache is shared by all methods
(MemoryPlanningPass(share_mutable_buffers=True); without it the methods would each see their own).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim, ExportedProgram, export

from export.methods import example_inputs, has_dynamic_tokens, method_module
from models.model import Attention, RMSNorm, Transformer


def load_custom_ops() -> None:
    """Registers llama::update_cache / llama::custom_sdpa with torch (export) and the runtime (kernels)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


class CustomOpKVCache(nn.Module):
    """ExecuTorch's fused cache ops: write K/V at start_pos, attend causally over 0 .. start_pos+T-1 only.

    The cache layout is [1, S, H_kv, D] (sequence second), as the custom ops expect.
    """

    def __init__(self, max_seq_len: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.register_buffer("k", torch.zeros(1, max_seq_len, n_kv_heads, head_dim), persistent=False)
        self.register_buffer("v", torch.zeros(1, max_seq_len, n_kv_heads, head_dim), persistent=False)

    def attend_sequence_first(self, q, k, v, positions):
        """q: [1, T, H, D]; k, v: [1, T, H_kv, D] -> [1, T, H, D]."""
        start = positions[0].item()
        torch._check(start >= 0)
        torch._check(start < self.k.shape[1])
        torch.ops.llama.update_cache(k, self.k, start)
        torch.ops.llama.update_cache(v, self.v, start)
        return torch.ops.llama.custom_sdpa(q, self.k, self.v, start, None, 0, True)


class XnnpackAttention(nn.Module):
    """A layer's attention in the ops XNNPACK delegates while the token count T is dynamic: views with
    -1 for T (a symbolic size is not delegated), no transposes (the custom ops take [1, T, H, D]), and
    the rotary's rotate-half as a linear with a +-1 permutation matrix (exact; a dynamic slice is not
    delegated). The same projections, so quantized weights are shared as they are."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        d, half = self.head_dim, self.head_dim // 2
        rotate = torch.zeros(d, d)  # rotate_half(x) == x @ rotate.T: [-x[half:], x[:half]]
        rotate[torch.arange(half), torch.arange(half) + half] = -1.0
        rotate[torch.arange(half) + half, torch.arange(half)] = 1.0
        self.register_buffer("rotate", rotate, persistent=False)

    def forward(self, x, cos, sin, positions, cache: CustomOpKVCache):
        d = self.head_dim
        # x: [1, T, dim] -> q: [1, T, H, D], k/v: [1, T, H_kv, D]; cos, sin: [T, D] -> [T, 1, D]
        q = self.q_proj(x).view(1, -1, self.n_heads, d)
        k = self.k_proj(x).view(1, -1, self.n_kv_heads, d)
        v = self.v_proj(x).view(1, -1, self.n_kv_heads, d)
        cos, sin = cos.view(-1, 1, d), sin.view(-1, 1, d)
        q = q * cos + F.linear(q, self.rotate) * sin
        k = k * cos + F.linear(k, self.rotate) * sin
        y = cache.attend_sequence_first(q, k, v, positions)
        return self.o_proj(y.view(1, -1, self.n_heads * d))


class XnnpackRMSNorm(nn.Module):
    """RMSNorm with the mean of squares as a linear (XNNPACK delegates mean only over 4-D inputs)."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        dim = norm.weight.shape[0]
        self.register_buffer("mean_weight", torch.full((1, dim), 1.0 / dim), persistent=False)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(F.linear(x * x, self.mean_weight) + self.eps))


def prepare_for_executorch(model: Transformer, max_seq_len: int) -> Transformer:
    """Source transformation for the .pte (after quantization): the model's caches become ExecuTorch
    custom-op caches, and attention and norms the forms XNNPACK delegates whole. Each layer used to
    fall into ~6 delegated partitions around undelegated views, slices and means; now it is two (before
    and after the cache ops): the shipped model's full call 0.348 -> 0.328 ms at 8da4w, lowering
    faster (fewer partitions to compile)."""
    load_custom_ops()
    c = model.config
    model.caches = nn.ModuleList(CustomOpKVCache(max_seq_len, c.num_key_value_heads, c.head_dim)
                                 for _ in range(c.num_hidden_layers))
    for layer in model.layers:
        layer.self_attn = XnnpackAttention(layer.self_attn)
        layer.input_layernorm = XnnpackRMSNorm(layer.input_layernorm)
        layer.post_attention_layernorm = XnnpackRMSNorm(layer.post_attention_layernorm)
    model.norm = XnnpackRMSNorm(model.norm)
    model.max_seq_len = max_seq_len
    return model


def trace(model: Transformer, methods: list[str], exit_layer: int, max_tokens: int,
          draft_length: int = 1) -> dict[str, ExportedProgram]:
    tokens = Dim("tokens", min=1, max=max_tokens)
    programs = {}
    with torch.no_grad():
        for name in methods:
            module = method_module(name, model, exit_layer, draft_length)
            dynamic = ({1: tokens}, None) if has_dynamic_tokens(name) else None
            programs[name] = export(module, example_inputs(name, model), dynamic_shapes=dynamic, strict=False)
    return programs


# XNNPACK's delegate passes for ops our graphs never hand it (upsampling, SDPA: attention runs in the
# custom op outside XNNPACK, batch norm, pooling's getitem, padding, 1-D convolution, PReLU). Each pass
# re-traces every delegated subgraph with fake tensors under the symbolic token count, so skipping
# them cut the shipped model's lowering 166-180 -> 135-145 s (three paired runs), the .pte byte-identical.
UNUSED_XNNPACK_PASSES = ("ConvertToUpsampleBilinear2d", "ConvertToSDPAPass", "FuseBatchNormPass",
                         "DecomposeBatchNorm", "RemoveGetItemPass", "InsertPadQDQPass", "Conv1dUnsqueezePass",
                         "PReLUReshapePass")


@contextmanager
def without_unused_xnnpack_passes():
    import executorch.backends.xnnpack.xnnpack_preprocess as preprocess

    default = preprocess.XNNPACKPassManager

    class UsedPasses(default):
        def __init__(self, exported_program, passes=None):
            super().__init__(exported_program, passes)
            self.passes = [p for p in self.passes if p.__name__ not in UNUSED_XNNPACK_PASSES]

    preprocess.XNNPACKPassManager = UsedPasses
    try:
        yield
    finally:
        preprocess.XNNPACKPassManager = default


def lower(programs: dict[str, ExportedProgram], backend: str, constants: dict[str, Any]):
    """Edge dialect, XNNPACK delegation (unless 'portable'), memory planning with one shared KV cache."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    partitioner = [XnnpackPartitioner()] if backend == "xnnpack" else []
    with without_unused_xnnpack_passes():
        edge = to_edge_transform_and_lower(programs, partitioner=partitioner, constant_methods=constants,
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
    return edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True,
        do_quant_fusion_and_const_prop=True,  # folds the quantized embedding's dequantize into its lookup
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
    ))


def save(program, path: Path) -> None:
    with open(path, "wb") as f:
        program.write_to_file(f)


def export_pte(cfg, r, model: Transformer, directory: Path, stages):
    """All stages after load, writing directory/model.pte; returns the manifest (sizes filled in later)."""
    from export.pipeline import base_manifest
    from quant.torchao_schemes import quantize_model, resolve_scheme

    scheme = resolve_scheme(cfg.quant)
    backend = cfg.backend if cfg.backend in ("xnnpack", "portable") else "xnnpack"
    stages.run("quantize", quantize_model, model, scheme, cfg.group_size_for("pte", model.config, r.ckpt.recommended))
    prepare_for_executorch(model, r.max_seq_len)
    programs = stages.run("trace", trace, model, list(cfg.methods), r.exit_layer, cfg.max_tokens_per_call,
                          r.num_speculations)
    program = stages.run("lower", lower, programs, backend, runtime_constants(model, r.exit_layer, r.max_seq_len,
                                                                              cfg.max_tokens_per_call))
    stages.run("save", save, program, directory / "model.pte")
    return base_manifest(cfg, r, model, format="pte", files={"program": "model.pte"}, file_sizes={},
                         methods=list(cfg.methods), quant=scheme, backend=backend)


def runtime_constants(model: Transformer, exit_layer: int, max_seq_len: int, max_tokens: int) -> dict[str, int]:
    """Facts stored inside the .pte as constant methods; the runtime checks them against the manifest."""
    c = model.config
    return {"exit_layer": exit_layer, "max_seq_len": max_seq_len, "max_tokens_per_call": max_tokens,
            "num_layers": c.num_hidden_layers, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size}
