"""The model's shape: one dataclass, validated in one place, read from and written to HF config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from runtime.artifact import check_exit_layer
from runtime.errors import UserError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling of rotary embeddings (HF `rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"config field {name}={getattr(self, name)} must be a positive integer.")
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise UserError(
                    f"config hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly or change the head count.")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise UserError(f"config head_dim={self.head_dim} must be even for rotary embeddings.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"config num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention).")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise UserError("config rms_norm_eps and rope_theta must be positive.")

    @property
    def n_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def num_parameters(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        layers = self.num_hidden_layers * (attn + mlp + 2 * self.hidden_size)
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return layers + embeddings + self.hidden_size

    def check_exit_layer(self, exit_layer: int) -> int:
        """The draft prefix is layers [0, E) and the verify suffix [E, L): both must be non-empty."""
        return check_exit_layer(exit_layer, self.num_hidden_layers)

    # ---- Hugging Face config.json ----

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type != "llama":
            raise UserError(
                f"{source} has model_type={model_type!r}, not 'llama'; LayerSkip export needs a "
                f"Llama-architecture checkpoint (LlamaForCausalLM).")
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source} has hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported.")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise UserError(f"{source} sets {flag}=true; biased Llama projections are not supported.")
        # transformers >= 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                                  float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
        elif rope_type not in ("default", None):
            raise UserError(f"{source} uses rope_type={rope_type!r}; supported: default, llama3.")
        try:
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=int(hf["num_attention_heads"]),
                num_key_value_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
                head_dim=int(hf.get("head_dim") or 0),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta),
                rope_scaling=scaling,
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            )
        except KeyError as missing:
            raise UserError(f"{source} lacks the field {missing}; is it a complete Llama config?") from None

    def to_hf(self) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **dataclasses.asdict(self.rope_scaling)}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)
