"""Shared fixtures: tiny random checkpoints written to disk exactly as users' checkpoints are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.checkpoint import RECOMMENDED_FILE, save_checkpoint
from models.config import ModelConfig
from models.model import Transformer
from models.tokenizer import train_bpe_tokenizer

# Tiny models gain nothing from threads, and the test machine may be busy.
torch.set_num_threads(1)

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
        "for i in range(10):\n    print(i * i)\n", "import os\nprint(os.getcwd())\n"] * 20


def tiny_model(seed: int = 0, agreeable: bool = True, **overrides) -> Transformer:
    """A random model. `agreeable` damps the residual writes of the later layers, so that early exits
    often (not always) agree with the last layer: speculation then sees both acceptances and rejections."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25)
        if agreeable:
            n = model.config.num_hidden_layers
            for l in range(1, n):
                scale = 0.6 ** l
                model.layers[l].self_attn.o_proj.weight.mul_(scale)
                model.layers[l].mlp.down_proj.weight.mul_(scale)
    return model


def write_checkpoint(directory: Path, model: Transformer, exit_layer: int = 2, d: int = 3) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, directory, bos_token_id=0, eos_token_ids=[1])
    tok = train_bpe_tokenizer(TEXT, model.config.vocab_size)
    tok.save(str(directory / "tokenizer.json"))
    (directory / RECOMMENDED_FILE).write_text(json.dumps({"exit_layer": exit_layer, "num_speculations": d}))
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", tiny_model())


@pytest.fixture(scope="session")
def wide_checkpoint(tmp_path_factory) -> Path:
    """Wide enough that weights, not graph structure, dominate file sizes (for the stored-once checks)."""
    model = tiny_model(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512)
    return write_checkpoint(tmp_path_factory.mktemp("wide") / "ckpt", model, exit_layer=1, d=3)


@pytest.fixture(scope="session")
def small_vocab_model() -> Transformer:
    """12 tokens, 3 layers, exits that often disagree: for exact sampling-distribution tests."""
    return tiny_model(seed=3, agreeable=False, vocab_size=12, num_hidden_layers=3)
