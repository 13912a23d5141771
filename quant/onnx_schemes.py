"""ONNX Runtime's own weight quantization of the exported graphs (the .onnx path).

    none  float32
    int4  MatMulNBits, 4-bit symmetric weights in blocks of --group-size (16..256) input channels,
          accuracy level 4 (activations quantized to int8 inside the kernel: the fast CPU path);
          the embedding as GatherBlockQuantized, 4-bit
    int8  the same kernels with 8-bit weights; the embedding as GatherBlockQuantized, 8-bit (written
          here: ONNX Runtime's quantizer does the Gather at 4 bits only)

torchao's 8da4w numerics (the .pte) are not carried into ONNX: ONNX Runtime fuses only its own
MatMulNBits layout into its fast kernels, so each target uses the quantizer its runtime is fast with.

--onnx-linear linear_q4 (int4): the MatMulNBits nodes' 4-bit weights and scales, unchanged, repacked for our custom
op layerskip.LinearQ4 (runtime/kernels/ort_ops.cpp, the .pte's linear_q4 kernel), which quantizes activations to 8
bits per row instead of per block: every row of a call has the bits it has alone, and the rows share one pass over
the weights.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from runtime.errors import UserError

ONNX_SCHEMES = ("none", "int4", "int8")
ONNX_LINEARS = ("matmulnbits", "linear_q4")
ALIASES = {"fp32": "none", "8da4w": "int4", "8da8w": "int8"}


def resolve_onnx_scheme(name: str) -> str:
    scheme = ALIASES.get(name, name)
    if scheme not in ONNX_SCHEMES:
        raise UserError(f"unknown quantization scheme {name!r}; use one of "
                        f"{', '.join(sorted(set(ONNX_SCHEMES) | set(ALIASES)))}.")
    return scheme


BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits takes


def check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise UserError(f"--group-size {block_size} is not an ONNX Runtime MatMulNBits block size; use one of "
                        f"{', '.join(map(str, BLOCK_SIZES))} for .onnx (it has no per-channel layout).")


def fold_transposed_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """MatMul(x, Transpose(W)) with a constant 2-D W -> MatMul(x, W^T stored as a constant).

    A tied LM head is exported as x @ Transpose(embedding); MatMulNBits takes only a constant B, so
    without this the head -- the largest matrix of a small-width model -- would stay float32.
    """
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        transpose = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        perm = [list(a.ints) for a in transpose.attribute if a.name == "perm"]
        weight = numpy_helper.to_array(initializers[transpose.input[0]])
        if weight.ndim != 2 or (perm and perm[0] != [1, 0]):
            continue
        name = transpose.input[0] + "_transposed"
        if name not in initializers:
            initializers[name] = numpy_helper.from_array(np.ascontiguousarray(weight.T), name)
            graph.initializer.append(initializers[name])
        node.input[1] = name
    return prune(proto)


def prune(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes whose outputs nobody reads and initializers no node reads."""
    graph = proto.graph
    while True:
        used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not any(o in used for o in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    return proto


def quantize_graph(proto: onnx.ModelProto, bits: int, block_size: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = fold_transposed_weights(proto)

    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=4, op_types_to_quantize=("MatMul", "Gather"),
                                     quant_axes=(("MatMul", 0), ("Gather", 1)))
    logging.getLogger().setLevel(logging.WARNING)  # the quantizer logs every node at INFO
    quantizer.process()
    proto = quantizer.model.model
    return prune(quantize_gathers_8bit(proto, block_size) if bits == 8 else proto)


def quantize_gathers_8bit(proto: onnx.ModelProto, block_size: int) -> onnx.ModelProto:
    """Gather(float table [V, D], ids) -> com.microsoft.GatherBlockQuantized, 8-bit blocks along D.

    Symmetric per block: q = round(w / scale) + 128 as uint8, scale = max|w| / 127, zero point 128.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    for i, node in enumerate(graph.node):
        if node.op_type != "Gather" or node.input[0] not in initializers:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = numpy_helper.to_array(initializers[node.input[0]])
        if axis != 0 or table.dtype != np.float32 or table.ndim != 2 or table.shape[1] % block_size:
            continue
        blocks = table.reshape(table.shape[0], -1, block_size)  # [V, D/B, B]
        scales = np.abs(blocks).max(-1) / 127.0  # [V, D/B]
        scales[scales == 0] = 1.0
        q = np.clip(np.round(blocks / scales[..., None]), -127, 127) + 128
        name = node.input[0]
        graph.initializer.extend([
            numpy_helper.from_array(q.astype(np.uint8).reshape(table.shape), name + "_q8"),
            numpy_helper.from_array(scales.astype(np.float32), name + "_q8_scales"),
            numpy_helper.from_array(np.full(scales.shape, 128, np.uint8), name + "_q8_zero_points")])
        graph.node[i].CopyFrom(helper.make_node(
            "GatherBlockQuantized", [name + "_q8", node.input[1], name + "_q8_scales", name + "_q8_zero_points"],
            list(node.output), name=(node.name or name) + "_q8", domain="com.microsoft",
            gather_axis=0, quantize_axis=1, block_size=block_size, bits=8))
    return proto


def quantize(proto: onnx.ModelProto, scheme: str, group_size: int) -> onnx.ModelProto:
    scheme = resolve_onnx_scheme(scheme)
    if scheme == "none":
        return proto
    return quantize_graph(proto, 4 if scheme == "int4" else 8, group_size)


def matmulnbits_weights(node: onnx.NodeProto, initializers: dict) -> tuple[np.ndarray, np.ndarray]:
    """A symmetric 4-bit MatMulNBits node's weights as (q [N, K] int8 in -8..7, scales [N, K/block] fp32):
    B [N, K/block, block/2] holds input 2i of a block in byte i's low nibble and 2i+1 in its high one, as u = q + 8."""
    from onnx import numpy_helper

    attrs = {a.name: a.i for a in node.attribute}
    n, k = attrs["N"], attrs["K"]
    packed = numpy_helper.to_array(initializers[node.input[1]])  # [N, K/block, block/2]
    u = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, -1)[:, :k]  # [N, K]
    scales = numpy_helper.to_array(initializers[node.input[2]]).reshape(n, -1)
    return u.astype(np.int8) - 8, scales.astype(np.float32)


def to_linear_q4(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every 4-bit MatMulNBits node -> layerskip.LinearQ4 on the same weights and scales, repacked
    (quant/linear_q4.py's layout). All or none: a graph keeping some MatMulNBits would keep their odd-row-count
    bits (runtime/onnx_backend.py), so a node the kernel cannot take (N not a multiple of 16, K not of the block,
    zero points, a bias) is refused in one line. Run on each method's graph after its norms are fused (ONNX
    Runtime's fusions do not see through an op they have no schema for); equal tensors are stored once on disk."""
    import torch
    from onnx import helper, numpy_helper

    from quant.linear_q4 import BLOCK, CHUNK, pack, pack_scales

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        attrs = {a.name: a.i for a in node.attribute}
        n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
        if (attrs.get("bits", 4) != 4 or len([x for x in node.input if x]) != 3 or n % BLOCK or k % block
                or block % CHUNK or k >= 2**19):
            raise UserError(f"--onnx-linear linear_q4 cannot take the {k}x{n} linear '{node.name}' (needs 4 bits, "
                            f"no zero points or bias, outputs a multiple of {BLOCK}, inputs of the block "
                            f"{block}); use --onnx-linear matmulnbits.")
        q, scales = matmulnbits_weights(node, initializers)
        weight_sums = (q.astype(np.float64).reshape(n, scales.shape[1], -1) * scales[:, :, None]).sum((1, 2))
        tensors = {"q4": pack(torch.from_numpy(q)).numpy(), "q4_scales": pack_scales(torch.from_numpy(scales)).numpy(),
                   "q4_sums": weight_sums.astype(np.float32)}
        names = []
        for suffix, value in tensors.items():
            name = f"{node.input[1]}_{suffix}"
            if name not in initializers:
                initializers[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
                graph.initializer.append(initializers[name])
            names.append(name)
        nodes.append(helper.make_node("LinearQ4", [node.input[0], *names], list(node.output), name=node.name + "_q4",
                                      domain="layerskip"))
    del graph.node[:]
    graph.node.extend(nodes)
    return prune(import_our_domain(proto))


def import_our_domain(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph's opset imports, with our ops' domain (layerskip, version 1) once."""
    from onnx import helper

    if not any(o.domain == "layerskip" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("layerskip", 1))
    return proto
