"""Each decoder layer of an int4 `.onnx` graph as one node of our op layerskip.DecoderLayer (runtime/kernels/ort_ops.cpp),
as export/fused_layer.py makes each layer of a `.pte` one kernel call.

A layer of our graphs is 10 nodes after quant.onnx_schemes.to_linear_q4 (the q|k|v LinearQ4, RowAttention, the o
LinearQ4, SkipSimplifiedLayerNormalization, gate and up LinearQ4s, Sigmoid, two Muls, the down LinearQ4) plus the
norm or residual Add that closes it; ONNX Runtime spends ~0.4 us a node whatever its size, and our ops read their
inputs through its C API (results/probe_ort_call_overhead.txt). The fused op computes the same steps row by row (its
norms and SiLU are the .pte kernel's, layer_rows.h), so a row keeps its bits whatever the number of rows in a call,
and every method of an artifact runs the same op: draft, verify, draft_verify and the full call agree bit for bit.

    x_out = h + down(silu(gate(n2)) * up(n2)),  n2 = rms_norm(h),  h = x + o(attend(qkv(rms_norm(x))))
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import onnx
from onnx import helper

LAYER_OP = "DecoderLayer"


def _attr(node, name: str):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _skip_sum(node) -> str:
    """The residual sum a SkipSimplifiedLayerNormalization also outputs (its 4th output), or "" where it has none."""
    return node.output[3] if len(node.output) > 3 else ""


def _linear_weights(node) -> list[str]:
    """A LinearQ4's weight, scales and weight_sums."""
    return list(node.input[1:4])


class _Graph:
    def __init__(self, graph: onnx.GraphProto):
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.consumers = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)

    def made_by(self, name: str, op: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def only_consumer(self, name: str, op: str):
        users = self.consumers[name]
        return users[0] if len(users) == 1 and users[0].op_type == op else None


def _match_layer(g: _Graph, attention) -> Optional[dict]:
    """The nodes of the layer around one RowAttention node, or None where the graph is not shaped as our layers are."""
    qkv = g.made_by(attention.input[0], "LinearQ4")
    opening = g.producer.get(qkv.input[0]) if qkv is not None else None
    if opening is None:
        return None
    if opening.op_type == "SimplifiedLayerNormalization" and len(opening.input) == 2:
        x_in = opening.input[0]
    elif opening.op_type == "SkipSimplifiedLayerNormalization" and len(opening.input) == 3 and \
            opening.output[0] == qkv.input[0] and _skip_sum(opening):
        x_in = _skip_sum(opening)  # the previous layer's output
    else:
        return None
    o = g.only_consumer(attention.output[0], "LinearQ4")
    post = g.only_consumer(o.output[0], "SkipSimplifiedLayerNormalization") if o is not None else None
    if post is None or len(post.input) != 3 or sorted(post.input[:2]) != sorted([x_in, o.output[0]]) or \
            not _skip_sum(post):
        return None
    x_mid, normed = _skip_sum(post), post.output[0]
    mlp = {}
    for linear in g.consumers[normed]:
        users = g.consumers[linear.output[0]]
        if linear.op_type != "LinearQ4":
            return None
        if sorted(u.op_type for u in users) == ["Mul", "Sigmoid"]:  # gate: silu(g) = g * sigmoid(g)
            sigmoid, silu = sorted(users, key=lambda u: u.op_type != "Sigmoid")
            if sorted(silu.input) != sorted([linear.output[0], sigmoid.output[0]]):
                return None
            mlp.update(gate=linear, sigmoid=sigmoid, silu=silu)
        elif len(users) == 1 and users[0].op_type == "Mul":
            mlp.update(up=linear, product=users[0])
    if set(mlp) != {"gate", "sigmoid", "silu", "up", "product"} or \
            sorted(mlp["product"].input) != sorted([mlp["silu"].output[0], mlp["up"].output[0]]):
        return None
    down = g.only_consumer(mlp["product"].output[0], "LinearQ4")
    closing = g.consumers[down.output[0]] if down is not None else []
    if len(closing) != 1 or closing[0].op_type not in ("Add", "SkipSimplifiedLayerNormalization") or \
            (closing[0].op_type != "Add" and len(closing[0].input) != 3) or \
            sorted(closing[0].input[:2]) != sorted([x_mid, down.output[0]]):
        return None
    eps = _attr(opening, "epsilon")
    if eps is None or _attr(post, "epsilon") != eps:
        return None
    return {"x_in": x_in, "opening": opening, "qkv": qkv, "attention": attention, "o": o, "post": post, "down": down,
            "closing": closing[0], "eps": eps, **mlp}


def fuse_decoder_layers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """In place: every layer as one DecoderLayer node; the graph unchanged where any layer does not match."""
    g = proto.graph
    graph = _Graph(g)
    layers = [_match_layer(graph, n) for n in g.node if n.op_type == "RowAttention"]
    if not layers or any(layer is None for layer in layers):
        return proto
    replace, removed = {}, set()  # node (by id) -> the node that takes its place; ids of nodes dropped
    for layer in layers:
        attention, closing = layer["attention"], layer["closing"]
        if closing.op_type == "Add":
            x_out = closing.output[0]
            removed.add(id(closing))
        else:  # the next norm stays, on the layer's output: SkipSimplifiedLayerNormalization -> its sum made here
            x_out = _skip_sum(closing) or f"{attention.output[0]}_out"
            replace[id(closing)] = helper.make_node(
                "SimplifiedLayerNormalization", [x_out, closing.input[2]], [closing.output[0]],
                name=f"{closing.name}_norm", epsilon=_attr(closing, "epsilon"), axis=-1, stash_type=1)
        replace[id(layer["qkv"])] = helper.make_node(
            LAYER_OP, [layer["x_in"], layer["opening"].input[-1], *_linear_weights(layer["qkv"]), *attention.input[1:7],
                       *_linear_weights(layer["o"]), layer["post"].input[2],
                       *(w for k in ("gate", "up", "down") for w in _linear_weights(layer[k]))],
            [x_out, *attention.output[1:3]], name=f"{attention.name or attention.output[0]}_layer", domain="layerskip",
            num_heads=_attr(attention, "num_heads"), kv_num_heads=_attr(attention, "kv_num_heads"), epsilon=layer["eps"])
        removed.update(id(layer[k]) for k in ("attention", "o", "post", "gate", "sigmoid", "silu", "up", "product",
                                              "down"))
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in removed]
    kept_outputs = {o.name for o in g.output}
    while True:  # drop what nothing reads any more (the norms that fed the q|k|v linears)
        read = {name for n in nodes for name in n.input} | kept_outputs
        alive = [n for n in nodes if any(out in read for out in n.output if out)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    del g.node[:]
    g.node.extend(nodes)
    return proto
