"""A Llama-family decoder, split at an exit layer E into a draft prefix and a verify suffix.

Module and parameter names mirror Hugging Face's LlamaForCausalLM (minus its `model.` prefix), so a
checkpoint's state dict loads as it is. Batch size is 1 throughout: this is an on-device decoder.

    prefix(tokens, pos, E)  : embed -> layers [0, E)            -> hidden at layer E  [1, T, dim]
    exit_logits(hidden)     : final norm -> shared LM head       -> logits             [1, T, vocab]
    suffix(hidden, pos, E)  : layers [E, L) -> norm -> LM head   -> logits             [1, T, vocab]
    forward(tokens, pos)    : suffix(prefix(tokens, pos, E), pos, E) for any E

A draft head (use_draft_vocab) restricts the drafts' exited logits to K tokens; verification keeps
the full head.

Positions are contiguous: a call on T tokens covers positions pos .. pos+T-1, with `input_pos` a
[1] long tensor holding pos. Each layer's KV cache is a static buffer written by position, so
rolling back rejected drafts is only moving the position back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """[head_dim/2] inverse frequencies, with Llama 3 scaling when the config asks for it."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq.float()
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, interpolated, scaled).float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos, sin: [T, D] (HF's non-interleaved layout: halves, not pairs)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class LayerCache(Protocol):
    """Stores one layer's K/V for the positions of a call and attends over everything cached so far."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q: [1, H, T, D]; k, v: [1, H_kv, T, D]; positions: [T] -> [1, H, T, D]."""
        ...


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Grouped-query attention without copying K/V to every query head.

    q: [B, H, T, D]; k, v: [B, H_kv, S, D]; mask: [T, S] bool (True = attend) or None for causal.
    """
    b, n_heads, t, d = q.shape
    groups = n_heads // k.shape[1]
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    if mask is None:
        mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - t)
    # Query head h uses KV head h // groups: fold the group into the query length.
    q = q.reshape(b, k.shape[1], groups * t, d)  # [B, H_kv, G*T, D]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(groups, 1))
    return y.reshape(b, n_heads, t, d)


class StaticKVCache(nn.Module):
    """A fixed-size K/V buffer written by position; attention is masked to positions <= the query's."""

    def __init__(self, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (1, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def attend(self, q, k, v, positions):
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        mask = torch.arange(self.k.shape[2], device=q.device)[None, :] <= positions[:, None]  # [T, S]
        return grouped_sdpa(q, self.k, self.v, mask)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin, positions, cache: Optional[LayerCache]):
        b, t, _ = x.shape  # b > 1 only in training, which runs without a cache
        # x: [B, T, dim] -> q: [B, H, T, D], k/v: [B, H_kv, T, D]
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = grouped_sdpa(q, k, v, None) if cache is None else cache.attend(q, k, v, positions)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, positions, cache: Optional[LayerCache] = None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DraftHead(nn.Module):
    """The drafts' exit head over K chosen tokens: those rows of the LM head, as a [K, dim] linear.

    Drafts can only propose these tokens (the others get logit -inf); verification keeps the full
    head, so greedy output is unchanged and sampling keeps the model's distribution. It pays where
    the head is a large share of a draft (vocab 128k: the head is about as costly as 4 layers).
    """

    def __init__(self, lm_head: nn.Linear, token_ids: torch.Tensor):
        super().__init__()
        self.vocab_size = lm_head.out_features
        self.proj = nn.Linear(lm_head.in_features, len(token_ids), bias=False)
        self.proj.weight = nn.Parameter(lm_head.weight.detach()[token_ids].clone())
        self.register_buffer("token_ids", token_ids.long().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sub = self.proj(x)  # [1, T, K]
        full = torch.full((*sub.shape[:-1], self.vocab_size), float("-inf"), dtype=sub.dtype, device=sub.device)
        return full.index_copy(-1, self.token_ids, sub)  # [1, T, vocab]


@dataclass
class PrefixOutput:
    hidden: torch.Tensor  # [1, T, dim]: residual stream after layer E-1, the verify suffix's input
    logits: Optional[torch.Tensor]  # [1, T', vocab] exited logits (T' = 1 when only the last is asked for)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.caches: nn.ModuleList = nn.ModuleList()
        self.max_seq_len = 0
        self.draft_head: Optional[DraftHead] = None

    def use_draft_vocab(self, token_ids: Optional[torch.Tensor]) -> None:
        """Drafts exit through a head over `token_ids` only (None: the full head again)."""
        self.draft_head = None if token_ids is None else DraftHead(self.lm_head, token_ids)

    def setup_caches(self, max_seq_len: int, dtype: Optional[torch.dtype] = None) -> None:
        """Install one static KV cache per layer (zeroed), sized for `max_seq_len` positions."""
        c = self.config
        dtype = dtype or self.embed_tokens.weight.dtype
        self.caches = nn.ModuleList(StaticKVCache(max_seq_len, c.num_key_value_heads, c.head_dim, dtype)
                                    for _ in range(c.num_hidden_layers))
        self.max_seq_len = max_seq_len

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        dtype = self.embed_tokens.weight.dtype
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def run_layers(self, h, input_pos, start: int, stop: int, caches: Optional[Sequence[LayerCache]] = None):
        """Layers [start, stop) on h: [1, T, dim] at positions input_pos .. input_pos+T-1."""
        positions = input_pos + torch.arange(h.shape[1], device=h.device)  # [T]
        cos, sin = self.rope(positions)
        caches = self.caches if caches is None else caches
        for i in range(start, stop):
            h = self.layers[i](h, cos, sin, positions, caches[i] if len(caches) else None)
        return h

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The shared final norm and LM head, applied at any layer: [1, T, dim] -> [1, T, vocab]."""
        return self.lm_head(self.norm(hidden))

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The drafts' exited logits: through the draft head when one is set. [1, T, dim] -> [1, T, vocab]."""
        return self.exit_logits(hidden) if self.draft_head is None else self.draft_head(self.norm(hidden))

    def prefix(self, tokens, input_pos, exit_layer: int, logits: str = "last", caches=None) -> PrefixOutput:
        """Layers [0, E) on tokens [1, T]. `logits`: 'last', 'all' or 'none' draft logits."""
        hidden = self.run_layers(self.embed_tokens(tokens), input_pos, 0, exit_layer, caches)
        if logits == "none":
            return PrefixOutput(hidden, None)
        return PrefixOutput(hidden, self.draft_logits(hidden[:, -1:] if logits == "last" else hidden))

    def suffix(self, hidden, input_pos, exit_layer: int, caches=None) -> torch.Tensor:
        """Layers [E, L) on the layer-E hidden states [1, T, dim] -> logits [1, T, vocab]."""
        return self.exit_logits(self.run_layers(hidden, input_pos, exit_layer, self.config.num_hidden_layers, caches))

    def forward(self, tokens, input_pos, caches=None) -> torch.Tensor:
        """The full model on tokens [1, T] -> logits [1, T, vocab]."""
        n = self.config.num_hidden_layers
        return self.exit_logits(self.run_layers(self.embed_tokens(tokens), input_pos, 0, n, caches))
