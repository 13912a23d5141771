"""ONNX Runtime's own weight quantization of the exported graphs (the .onnx path).

    none  float32
    int4  MatMulNBits, 4-bit symmetric weights in blocks of --group-size input channels,
          accuracy level 4 (activations quantized to int8 inside the kernel: the fast CPU path);
          the embedding as GatherBlockQuantized, 4-bit
    int8  the same kernels with 8-bit weights

torchao's 8da4w numerics (the .pte) are not carried into ONNX: ONNX Runtime fuses only its own
MatMulNBits layout into its fast kernels, so each target uses the quantizer its runtime is fast with.
"""

from __future__ import annotations

import logging

import onnx

from models.errors import UserError

ONNX_SCHEMES = ("none", "int4", "int8")
ALIASES = {"fp32": "none", "8da4w": "int4", "8da8w": "int8"}


def resolve_onnx_scheme(name: str) -> str:
    scheme = ALIASES.get(name, name)
    if scheme not in ONNX_SCHEMES:
        raise UserError(f"unknown quantization scheme {name!r}; use one of "
                        f"{', '.join(sorted(set(ONNX_SCHEMES) | set(ALIASES)))}.")
    return scheme


def quantize_graph(proto: onnx.ModelProto, bits: int, block_size: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=4, op_types_to_quantize=("MatMul", "Gather"),
                                     quant_axes=(("MatMul", 0), ("Gather", 1)))
    logging.getLogger().setLevel(logging.WARNING)  # the quantizer logs every node at INFO
    quantizer.process()
    return quantizer.model.model


def quantize_graphs(protos: dict[str, onnx.ModelProto], scheme: str, group_size: int) -> dict[str, onnx.ModelProto]:
    scheme = resolve_onnx_scheme(scheme)
    if scheme == "none":
        return protos
    bits = 4 if scheme == "int4" else 8
    return {name: quantize_graph(proto, bits, group_size) for name, proto in protos.items()}
