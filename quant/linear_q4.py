"""--pte-linear linear_q4: the .pte's 4-bit linears through our kernel, layerskip::linear_q4
(runtime/kernels/linear_q4.cpp), instead of XNNPACK's.

The arithmetic is torchao's 8da4w (int8 per-token asymmetric activations x int4 symmetric weights, a scale per output
channel and group of G inputs, or per output channel), computed in integers per group: a row's result is exact up to
its float steps, so it has the same bits whatever the number of rows in the call, and all rows of a call share one
pass over the weights. On the Llama-3.2-1B shape a 5-row verify through XNNPACK's 4-bit GEMM costs 1.5-2.2x a 1-row
call; through this kernel 1.1-1.4x at two threads, 1.7-2.1x at one (where 5 rows of dot products take about as long
as reading the weights once). README, "Five sessions ago".

Weight layout ([N/16, K/8, 64] bytes): a block of 16 output channels x a chunk of 8 inputs per 64 bytes, byte 4i + j
holding channel i's input j (low nibble) and 4 + j (high nibble), each as u = q + 8 in 0..15; blocks in groups of 4
(the last may hold fewer) whose chunks are interleaved, [chunk 0 of the group's blocks][chunk 1 ...]..., so that the
kernel's pass over a group reads one stream. The scales ([K/G, N]) go in the same order, 16 channels per block and
group of G inputs where the weights have a chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK, CHUNK, GROUP = 16, 8, 4  # output channels per block, inputs per 64-byte chunk, blocks interleaved


def fits(linear: nn.Module) -> bool:
    """A torchao 8da4w linear the kernel takes: whole blocks of outputs, groups of whole chunks of inputs, no bias."""
    weight = getattr(linear, "weight", None)
    if not (isinstance(linear, nn.Linear) and linear.bias is None and hasattr(weight, "qdata")
            and getattr(weight, "scale", None) is not None and weight.scale.dim() == 2):
        return False
    groups = weight.scale.shape[1]
    return (linear.out_features % BLOCK == 0 and linear.in_features % (groups * CHUNK) == 0
            and linear.in_features < 2**19 and not weight.zero_point.any())


def interleave(by_block: torch.Tensor) -> torch.Tensor:
    """[blocks, steps, width] -> the same, flat, with each group of 4 blocks' steps interleaved."""
    blocks, steps, width = by_block.shape
    whole = blocks // GROUP * GROUP
    # [groups, 4 blocks, steps, width] -> [groups, steps, 4 blocks, width]; the last group's [r, steps, width] likewise
    grouped = by_block[:whole].reshape(-1, GROUP, steps, width).transpose(1, 2)
    return torch.cat([grouped.reshape(-1), by_block[whole:].transpose(0, 1).reshape(-1)])


def deinterleave(flat: torch.Tensor, blocks: int, steps: int, width: int) -> torch.Tensor:
    """interleave's inverse -> [blocks, steps, width]."""
    whole = blocks // GROUP * GROUP
    grouped = flat[:whole * steps * width].view(-1, steps, GROUP, width).transpose(1, 2).reshape(whole, steps, width)
    rest = flat[whole * steps * width:].view(steps, blocks - whole, width).transpose(0, 1)
    return torch.cat([grouped, rest])


def pack(q: torch.Tensor) -> torch.Tensor:
    """int4 values q [N, K] (int8 in -8..7) -> the kernel's layout, uint8 [N/16, K/8, 64]."""
    n, k = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    # [N, K] -> [N/16, 16 channels, K/8, 2 halves, 4 inputs] -> [N/16, K/8, 16, 4, 2]
    u = u.view(n // BLOCK, BLOCK, k // CHUNK, 2, 4).permute(0, 2, 1, 4, 3)
    by_block = (u[..., 0] | (u[..., 1] << 4)).reshape(n // BLOCK, k // CHUNK, 64)
    return interleave(by_block).view(n // BLOCK, k // CHUNK, 64)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """pack's inverse: uint8 [N/16, K/8, 64] -> int8 [N, K] in -8..7."""
    blocks, chunks, _ = packed.shape
    packed = deinterleave(packed.reshape(-1), blocks, chunks, 64)  # [N/16, K/8, 64], block by block
    nibbles = torch.stack([packed & 0x0F, packed >> 4], -1)  # [N/16, K/8, 64, 2]
    # [N/16, K/8, 16, 4, 2] -> [N/16, 16, K/8, 2, 4] -> [N, K]
    u = nibbles.view(blocks, chunks, BLOCK, 4, 2).permute(0, 2, 1, 4, 3).reshape(blocks * BLOCK, chunks * CHUNK)
    return (u.to(torch.int16) - 8).to(torch.int8)


def pack_scales(scale: torch.Tensor) -> torch.Tensor:
    """torchao's scales [N, K/G] -> the kernel's [K/G, N], in the weights' block order."""
    n, groups = scale.shape
    by_block = scale.float().t().reshape(groups, n // BLOCK, BLOCK).transpose(0, 1)  # [N/16, K/G, 16]
    return interleave(by_block).view(groups, n)


def unpack_scales(packed: torch.Tensor) -> torch.Tensor:
    """pack_scales' inverse -> [N, K/G]."""
    groups, n = packed.shape
    return deinterleave(packed.reshape(-1), n // BLOCK, groups, BLOCK).transpose(0, 1).reshape(groups, n).t()


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """torchao's int8 per-token asymmetric quantize-dequantize (what the kernel computes in integers)."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255.0).clamp(min=torch.finfo(torch.float32).eps)
    zero = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    q = (torch.round(x * (1.0 / scale)) + zero).clamp(-128, 127)
    return (q - zero) * scale


def linear_q4(x, weight, scales, weight_sums):
    """layerskip::linear_q4 in torch (its reference; ExecuTorch runs our kernel). weight: pack()'s layout; scales:
    [K/G, N] (pack_scales); weight_sums: [N], each output channel's sum of its weights (the kernel applies the
    activations' zero point through it)."""
    q = unpack(weight).float()  # [N, K]
    groups, n = scales.shape
    w = (q.view(n, groups, -1) * unpack_scales(scales)[:, :, None]).view(n, -1)  # [N, K/G, G] x [N, K/G, 1]
    return torch.nn.functional.linear(quantize_activations(x), w)


def define_op() -> None:
    from runtime.kernels import define_torch_op

    define_torch_op("linear_q4", "Tensor x, Tensor weight, Tensor scales, Tensor weight_sums", linear_q4,
                    lambda x, weight, scales, weight_sums: x.new_empty(*x.shape[:-1], scales.shape[1]))


class LinearQ4(nn.Module):
    """A torchao 8da4w linear (fits()), through layerskip::linear_q4; or several on the same input as one (joined())."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        """q: the int4 values [N, K] in -8..7; scale: [N, K/G]."""
        super().__init__()
        n, groups = scale.shape
        self.in_features, self.out_features = q.shape[1], n
        self.register_buffer("weight_q4", pack(q), persistent=False)
        self.register_buffer("scales", pack_scales(scale), persistent=False)  # [K/G, N]
        w = q.double().view(n, groups, -1) * scale.double()[:, :, None]  # [N, K/G, G]
        self.register_buffer("weight_sums", w.sum((1, 2)).float(), persistent=False)  # [N]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "LinearQ4":
        return cls(linear.weight.qdata, linear.weight.scale)

    @classmethod
    def joined(cls, linears: list["LinearQ4"]) -> "LinearQ4":
        """One LinearQ4 computing `linears` (same input width and groups) side by side: output channels in their
        order. Each channel's result has the bits it has in its own linear (a channel's arithmetic reads only its
        weights and the row's quantized activations), and the row is quantized once instead of once per linear."""
        parts = [linear.dense_weights() for linear in linears]
        return cls(torch.cat([q for q, _ in parts]), torch.cat([scale for _, scale in parts]))

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int4 values [N, K] and scales [N, K/G] this linear was packed from."""
        return unpack(self.weight_q4), unpack_scales(self.scales)

    def forward(self, x):
        return torch.ops.layerskip.linear_q4(x, self.weight_q4, self.scales, self.weight_sums)


class JoinedMLP(nn.Module):
    """An MLP whose gate and up projections (LinearQ4s) are one LinearQ4; the same ops after it."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_up_proj = LinearQ4.joined([mlp.gate_proj, mlp.up_proj])
        self.down_proj, self.intermediate = mlp.down_proj, mlp.gate_proj.out_features

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.intermediate, -1)
        return self.down_proj(F.silu(gate) * up)


def join_projections(model: nn.Module) -> int:
    """After use_linear_q4 and the .pte's source transforms (export/to_pte.prepare_for_executorch): in every layer,
    q/k/v (the attention's qkv_proj) and gate/up (JoinedMLP) become one LinearQ4 each, their output split after it;
    returns how many linears were joined. One call and one quantization of the row instead of three and two (the
    shipped .pte: results/probe_pte_joined_projections.txt); every output keeps its bits (LinearQ4.joined)."""
    joined = 0
    for layer in getattr(model, "layers", []):
        attn = layer.self_attn
        parts = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
        if hasattr(attn, "qkv_proj") and all(isinstance(p, LinearQ4) for p in parts):
            attn.qkv_proj, attn.qkv_sizes = LinearQ4.joined(parts), [p.out_features for p in parts]
            attn.q_proj = attn.k_proj = attn.v_proj = None
            joined += 3
        mlp = layer.mlp
        if isinstance(getattr(mlp, "gate_proj", None), LinearQ4) and isinstance(getattr(mlp, "up_proj", None), LinearQ4):
            layer.mlp = JoinedMLP(mlp)
            joined += 2
    return joined


def use_linear_q4(model: nn.Module) -> int:
    """Every 8da4w linear the kernel fits becomes a LinearQ4, in place; returns how many. A module shared by two
    parents is swapped once and stays shared."""
    define_op()
    swapped: dict[int, LinearQ4] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in swapped:
                setattr(parent, name, swapped[id(child)])
            elif fits(child):
                swapped[id(child)] = LinearQ4.from_linear(child)
                setattr(parent, name, swapped[id(child)])
    return len(swapped)
