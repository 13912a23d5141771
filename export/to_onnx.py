"""Lowering to ONNX: draft.onnx, verify.onnx and forward.onnx sharing one weights file.

Each graph is torch.onnx.export(dynamo=True) of the same method modules the .pte is traced from,
with the KV caches as explicit inputs/outputs (export/onnx_attention.py). Initializers are
written once into weights.bin, keyed by content (the exporter names folded constants differently
in each graph), and every graph refers to them by offset.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path

import onnx
import torch
from onnx.external_data_helper import set_external_data
from torch import nn
from torch.export import Dim

from export.methods import example_inputs, has_dynamic_tokens, method_module, output_names
from export.onnx_attention import CACHE_KINDS, fused_attention
from runtime.artifact import cache_input_names, cache_output_names, method_layers
from runtime.errors import UserError
from models.model import Transformer

WEIGHTS_FILE = "weights.bin"
INLINE_BYTES = 1024  # initializers smaller than this stay inside each graph
ALIGN = 64
OPSET = 21


class WithExternalCaches(nn.Module):
    """A method whose layers read/write KV caches passed as graph inputs (past_*) and outputs (present_*)."""

    def __init__(self, method: nn.Module, layers: range, n_layers: int, kind: str):
        super().__init__()
        self.method, self.layers, self.n_layers, self.kind = method, layers, n_layers, kind

    def forward(self, x, input_pos, past: list[torch.Tensor]):
        caches = [None] * self.n_layers
        for j, i in enumerate(self.layers):
            caches[i] = CACHE_KINDS[self.kind](past[2 * j], past[2 * j + 1])
        outputs = self.method(x, input_pos, caches=caches)
        return (*outputs, *[t for i in self.layers for t in caches[i].outputs])


def trace_method(model: Transformer, name: str, exit_layer: int, max_seq_len: int, max_tokens: int,
                 kind: str, draft_length: int) -> onnx.ModelProto:
    from export.onnx_contrib import translation_table

    c = model.config
    layers = method_layers(name, exit_layer, c.num_hidden_layers)
    module = WithExternalCaches(method_module(name, model, exit_layer, draft_length), layers, c.num_hidden_layers,
                                kind).eval()
    x, pos = example_inputs(name, model)
    past = [torch.zeros(1, c.num_key_value_heads, max_seq_len, c.head_dim) for _ in range(2 * len(layers))]
    tokens = Dim("tokens", min=1, max=max_tokens)
    input_names = ["hidden" if name == "verify" else "tokens", "input_pos", *cache_input_names(layers)]
    token_dims = {1: tokens} if has_dynamic_tokens(name) else None
    with torch.no_grad(), warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp, \
            (fused_attention(model, max_seq_len) if kind == "gqa" else nullcontext()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (x, pos, past), dynamic_shapes={"x": token_dims, "input_pos": None, "past": [None] * len(past)},
            input_names=input_names, output_names=output_names(name) + cache_output_names(layers),
            opset_version=OPSET, custom_translation_table=translation_table() if kind == "gqa" else None,
            dynamo=True, optimize=True, verbose=False)
        # Round-trip through disk so that models over protobuf's 2 GB limit work too.
        program.save(str(Path(tmp) / "m.onnx"), external_data=True)
        proto = onnx.load(str(Path(tmp) / "m.onnx"), load_external_data=True)
    if kind == "gqa":
        proto = fuse_norms(proto)
    proto.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=str(v)) for k, v in {
        "layerskip.method": name, "layerskip.exit_layer": exit_layer, "layerskip.max_seq_len": max_seq_len,
        "layerskip.kv_cache": kind}.items())
    return proto


def fuse_norms(proto: onnx.ModelProto) -> onnx.ModelProto:
    """RMSNorm (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul) -> SimplifiedLayerNormalization, and
    the residual Add before it -> SkipSimplifiedLayerNormalization, by ONNX Runtime's own fusions
    (its session optimizer does not match this form). The shipped model: 449 -> 331 nodes per
    forward graph before the attention fusion."""
    import logging

    from onnxruntime.transformers.fusion_simplified_layernorm import (
        FusionSimplifiedLayerNormalization, FusionSkipSimplifiedLayerNormalization)
    from onnxruntime.transformers.onnx_model import OnnxModel

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    model = OnnxModel(proto)
    FusionSimplifiedLayerNormalization(model).apply()
    FusionSkipSimplifiedLayerNormalization(model).apply()
    model.prune_graph()
    model.topological_sort()
    return model.model


def trace(model: Transformer, methods: list[str], exit_layer: int, max_seq_len: int, max_tokens: int,
          kind: str, draft_length: int) -> dict[str, onnx.ModelProto]:
    return {name: trace_method(model, name, exit_layer, max_seq_len, max_tokens, kind, draft_length)
            for name in methods}


def save_shared(protos: dict[str, onnx.ModelProto], directory: Path) -> dict[str, str]:
    """Write each graph as NAME.onnx, with every large initializer stored once in weights.bin."""
    offsets: dict[str, tuple[int, int]] = {}  # content hash -> (offset, length): equal bytes stored once
    with open(directory / WEIGHTS_FILE, "wb") as weights:
        for proto in protos.values():
            for tensor in proto.graph.initializer:
                data = tensor.raw_data
                if len(data) < INLINE_BYTES:
                    continue
                key = hashlib.sha256(data).hexdigest()
                if key not in offsets:
                    weights.write(b"\0" * (-weights.tell() % ALIGN))
                    offsets[key] = (weights.tell(), len(data))
                    weights.write(data)
                offset, length = offsets[key]
                set_external_data(tensor, WEIGHTS_FILE, offset, length)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
    files = {"weights": WEIGHTS_FILE}
    for name, proto in protos.items():
        for node in proto.graph.node:  # the exporter's per-node debug metadata (stack traces) is most of the file
            node.ClearField("metadata_props")
            node.doc_string = ""
        onnx.save(proto, str(directory / f"{name}.onnx"))
        files[name] = f"{name}.onnx"
    return files


def check(directory: Path, files: dict[str, str]) -> None:
    """Each graph loads in ONNX Runtime, the runtime it is for (onnx.checker does not know the
    ONNX-domain ops ONNX Runtime adds, such as SimplifiedLayerNormalization)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    for role, file in files.items():
        if role != "weights":
            ort.InferenceSession(str(directory / file), so, providers=["CPUExecutionProvider"])


def export_onnx(cfg, r, model: Transformer, directory: Path, stages):
    """All stages after load for the ONNX target; returns the manifest (sizes filled in later)."""
    from export.pipeline import base_manifest
    from quant.onnx_schemes import quantize_graphs, resolve_onnx_scheme

    scheme = resolve_onnx_scheme(cfg.quant)
    kind = cfg.onnx_kv_cache
    # The fused greedy draft is .pte-only: in ONNX each of its d+1 passes would need its own KV output
    # (a value can be written once), and ONNX Runtime would copy whole caches between them.
    methods = [m for m in cfg.methods if m != "draft_greedy"]
    protos = stages.run("trace", trace, model, methods, r.exit_layer, r.max_seq_len,
                        cfg.max_tokens_per_call, kind, r.num_speculations)
    protos = stages.run("quantize", quantize_graphs, protos, scheme, cfg.group_size_for("onnx", model.config))
    files = stages.run("save", save_shared, protos, directory)
    stages.run("check", check, directory, files)
    return base_manifest(cfg, r, model, format="onnx", files=files, file_sizes={}, methods=methods,
                         quant=scheme, backend="onnxruntime", extra={"kv_cache": kind})
