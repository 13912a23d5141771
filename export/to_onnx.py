"""Lowering to ONNX: draft.onnx, verify.onnx and forward.onnx (and draft_verify.onnx) sharing one weights file.

The model is traced once, torch.onnx.export(dynamo=True) of the `all` method (export/methods.py:
the draft, verify and forward methods' code in one graph, KV caches as explicit inputs/outputs,
export/onnx_attention.py), quantized once, and each method's graph is cut out of it: draft =
tokens -> hidden, exit logits; verify = hidden -> logits; forward = tokens -> logits; draft_verify = tokens
-> hidden, logits. (Tracing each
method alone took twice as long: 8.7 s vs 4.1-4.5 s for the shipped model.) Initializers are written
once into weights.bin, keyed by content, and every graph refers to them by offset.
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

from export.methods import example_inputs, method_module, output_names
from export.onnx_attention import CACHE_KINDS, FUSED_KINDS, fused_attention
from runtime.artifact import cache_input_names, cache_output_names, method_layers, uses_our_onnx_ops
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


def trace_all(model: Transformer, exit_layer: int, max_seq_len: int, max_tokens: int, kind: str) -> onnx.ModelProto:
    """One trace of every layer: the `all` method (export/methods.py), which the methods are cut from."""
    from export.onnx_contrib import translation_table

    c = model.config
    layers = range(c.num_hidden_layers)
    module = WithExternalCaches(method_module("all", model, exit_layer), layers, c.num_hidden_layers, kind).eval()
    x, pos = example_inputs("all", model)
    past = [torch.zeros(1, c.num_key_value_heads, max_seq_len, c.head_dim) for _ in range(2 * len(layers))]
    with torch.no_grad(), warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp, \
            (fused_attention(model, max_seq_len) if kind in FUSED_KINDS else nullcontext()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (x, pos, past),
            dynamic_shapes={"x": {1: Dim("tokens", min=1, max=max_tokens)}, "input_pos": None, "past": [None] * len(past)},
            input_names=["tokens", "input_pos", *cache_input_names(layers)],
            output_names=output_names("all") + cache_output_names(layers),
            opset_version=OPSET, custom_translation_table=translation_table() if kind in FUSED_KINDS else None,
            dynamo=True, optimize=True, verbose=False)
        # Round-trip through disk so that models over protobuf's 2 GB limit work too.
        program.save(str(Path(tmp) / "m.onnx"), external_data=True)
        return onnx.load(str(Path(tmp) / "m.onnx"), load_external_data=True)


def method_io(name: str, exit_layer: int, num_layers: int) -> tuple[list[str], dict[str, str]]:
    """A method's inputs, and its outputs as {name in the `all` graph: name in the method's graph}."""
    layers = method_layers(name, exit_layer, num_layers)
    inputs = ["hidden" if name == "verify" else "tokens", "input_pos", *cache_input_names(layers)]
    outputs = {"draft": {"hidden": "hidden", "draft_logits": "logits"}, "verify": {"verify_logits": "logits"},
               "draft_verify": {"hidden": "hidden", "verify_logits": "logits"}, "forward": {"logits": "logits"}}[name]
    return inputs, {**outputs, **{n: n for n in cache_output_names(layers)}}


def cut(proto: onnx.ModelProto, inputs: list[str], outputs: dict[str, str]) -> onnx.ModelProto:
    """In place: the part of the graph that computes `outputs` (renamed as mapped) from `inputs`, which
    may be intermediate values. A kept Shape(tokens)[1:2] (the token count) reads the first input
    instead, for a cut that starts at `hidden` [1, T, dim]."""
    g = proto.graph
    producer = {out: node for node in g.node for out in node.output}
    graph_inputs = {v.name for v in g.input}
    kept, used, stack = set(), set(), list(outputs)
    while stack:
        value = stack.pop()
        if value in used:
            continue
        used.add(value)
        node = producer.get(value)
        if value in inputs or node is None or id(node) in kept:
            continue
        kept.add(id(node))
        if node.op_type == "Shape" and node.input[0] in graph_inputs and node.input[0] not in inputs:
            span = {a.name: a.i for a in node.attribute}
            if span.get("start") != 1 or span.get("end") != 2:
                raise RuntimeError(f"cannot cut at {inputs[0]}: {node.name} reads the shape of {node.input[0]}")
            node.input[0] = inputs[0]
        stack.extend(i for i in node.input if i)
    missing = [v for v in used & graph_inputs if v not in inputs]
    if missing:
        raise RuntimeError(f"cannot cut the graph at {inputs}: it needs {missing}")
    values = {v.name: v for v in (*g.input, *g.output, *g.value_info)}
    new_inputs = [onnx.ValueInfoProto() for _ in inputs]
    for v, name in zip(new_inputs, inputs):
        v.CopyFrom(values[name])
    new_outputs = []
    for old, new in outputs.items():
        v = onnx.ValueInfoProto()
        v.CopyFrom(values[old])
        v.name = new
        new_outputs.append(v)
    nodes = [node for node in g.node if id(node) in kept]
    for node in nodes:
        for k, out in enumerate(node.output):
            if out in outputs:
                node.output[k] = outputs[out]
    for field, keep in ((g.node, nodes), (g.input, new_inputs), (g.output, new_outputs)):
        kept_copies = list(keep)
        del field[:]
        field.extend(kept_copies)
    for field in (g.initializer, g.value_info):
        for k in reversed(range(len(field))):
            if field[k].name not in used or field[k].name in inputs:
                del field[k]
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


def to_row_attention(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every GroupQueryAttention node -> our layerskip.RowAttention on the same inputs (without the two it leaves
    empty: q|k|v comes packed) and outputs (runtime/kernels/ort_ops.cpp)."""
    from onnx import helper

    from quant.onnx_schemes import import_our_domain

    nodes = []
    for node in proto.graph.node:
        if node.op_type == "GroupQueryAttention":
            assert node.input[1] == node.input[2] == "", "GroupQueryAttention with separate key and value inputs"
            heads = {a.name: a.i for a in node.attribute}
            node = helper.make_node("RowAttention", [node.input[0], *node.input[3:9]], list(node.output),
                                    name=node.name, domain="layerskip", num_heads=heads["num_heads"],
                                    kv_num_heads=heads["kv_num_heads"])
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return import_our_domain(proto)


def split_exit_norm(proto: onnx.ModelProto) -> onnx.ModelProto:
    """In place, for a graph that outputs `hidden` and runs on past it (draft_verify): the residual Add that
    makes `hidden` and layer E's input norm as two nodes, Add + SimplifiedLayerNormalization, the ops that
    draft (ends at the Add) and verify (starts at the norm) run there, rather than one fused
    SkipSimplifiedLayerNormalization, which rounds the norm differently in some rows (models/deep16 int4:
    one logit 3.8e-6 apart, which flipped a near-tie in 1 of 30 prompts). Then a draft_verify row has the
    bits of draft + verify, as exact lookup needs."""
    from onnx import helper

    g = proto.graph
    for i, node in enumerate(g.node):
        if node.op_type == "SkipSimplifiedLayerNormalization" and node.output[3:4] == ["hidden"]:
            assert len(node.input) == 3 and not any(node.output[1:3]), "a skip norm with bias or statistics"
            epsilon = next(a.f for a in node.attribute if a.name == "epsilon")
            add = helper.make_node("Add", node.input[:2], ["hidden"], name=f"{node.name}_add")
            norm = helper.make_node("SimplifiedLayerNormalization", ["hidden", node.input[2]], node.output[:1],
                                    name=f"{node.name}_norm", epsilon=epsilon, axis=-1, stash_type=1)
            g.node.remove(node)
            g.node.insert(i, norm)
            g.node.insert(i, add)
            break
    return proto


def cut_methods(combined: onnx.ModelProto, methods: list[str], exit_layer: int, max_seq_len: int, kind: str,
                num_layers: int) -> dict[str, onnx.ModelProto]:
    """Each method's graph out of the `all` graph (the last one takes the original); norms fused per graph
    (a fused norm would span a cut)."""
    protos = {}
    for i, name in enumerate(methods):
        proto = combined if i == len(methods) - 1 else onnx.ModelProto()
        if proto is not combined:
            proto.CopyFrom(combined)
        proto = cut(proto, *method_io(name, exit_layer, num_layers))
        proto.graph.name = name
        if kind in FUSED_KINDS:
            proto = split_exit_norm(fuse_norms(proto))
        if kind == "row":  # after the fusions, which infer shapes through GroupQueryAttention, not through our op
            proto = to_row_attention(proto)
        proto.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=str(v)) for k, v in {
            "layerskip.method": name, "layerskip.exit_layer": exit_layer, "layerskip.max_seq_len": max_seq_len,
            "layerskip.kv_cache": kind}.items())
        protos[name] = proto
    return protos


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


def check(directory: Path, files: dict[str, str], our_ops: bool) -> None:
    """Each graph loads in ONNX Runtime, the runtime it is for (onnx.checker does not know the
    ONNX-domain ops ONNX Runtime adds, such as SimplifiedLayerNormalization), with our op library where the graphs
    call our ops."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if our_ops:
        from runtime.kernels import ort_ops_library

        so.register_custom_ops_library(str(ort_ops_library()))
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    for role, file in files.items():
        if role != "weights":
            ort.InferenceSession(str(directory / file), so, providers=["CPUExecutionProvider"])


def export_onnx(cfg, r, model: Transformer, directory: Path, stages):
    """All stages after load for the ONNX target; returns the manifest (sizes filled in later)."""
    from export.pipeline import base_manifest, lookup_defaults
    from quant.onnx_schemes import quantize, resolve_onnx_scheme

    scheme = resolve_onnx_scheme(cfg.quant)
    kind = cfg.onnx_kv_cache
    # The fused greedy draft is .pte-only: in ONNX each of its d+1 passes would need its own KV output
    # (a value can be written once), and ONNX Runtime would copy whole caches between them.
    methods = cfg.methods_for("onnx", model.config)
    # One trace and one quantization for all methods, then each method's graph is cut out of it.
    combined = stages.run("trace", trace_all, model, r.exit_layer, r.max_seq_len, cfg.max_tokens_per_call, kind)
    combined = stages.run("quantize", quantize, combined, scheme, cfg.group_size_for("onnx", model.config, r.ckpt.recommended))
    protos = stages.run("cut", cut_methods, combined, methods, r.exit_layer, r.max_seq_len, kind,
                        model.config.num_hidden_layers)
    linear = cfg.onnx_linear_for()
    if linear == "linear_q4":
        from quant.onnx_schemes import to_linear_q4

        protos = stages.run("repack", lambda methods: {name: to_linear_q4(p) for name, p in methods.items()}, protos)
        if kind == "row":  # each layer one node of our op (export/onnx_fused_layer.py)
            from export.onnx_fused_layer import fuse_decoder_layers

            protos = stages.run("fuse layers", lambda methods: {n: fuse_decoder_layers(p) for n, p in methods.items()},
                                protos)
    files = stages.run("save", save_shared, protos, directory)
    stages.run("check", check, directory, files, uses_our_onnx_ops(kind, linear))
    return base_manifest(cfg, r, model, format="onnx", files=files, file_sizes={}, methods=methods,
                         quant=scheme, backend="onnxruntime",
                         extra={"kv_cache": kind, **({"pad_drafts": True} if cfg.pad_drafts else {}),
                                **({"linear": linear} if scheme != "none" else {}),
                                **(lookup_defaults(r.ckpt.recommended, "onnx") if cfg.exact_lookup else {})})
