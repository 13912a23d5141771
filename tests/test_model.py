"""The model against transformers' LlamaForCausalLM, and the prefix/suffix split against the full model."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.checkpoint import load_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
VARIANTS = {
    "gqa-untied": dict(num_key_value_heads=2),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": dict(num_key_value_heads=2, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "sharded": dict(num_key_value_heads=1),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_pair(request, tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=256, **VARIANTS[request.param])
    hf = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, max_shard_size="100KB" if request.param == "sharded" else "10GB")
    if request.param == "sharded":
        assert (path / "model.safetensors.index.json").exists()
    ours, _ = load_model(path)
    return hf, ours


def test_logits_match_transformers(hf_pair):
    hf, ours = hf_pair
    tokens = torch.randint(0, 211, (1, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        assert (ours(tokens, torch.tensor([0])) - expected).abs().max() <= 1e-4
        # incrementally, through the static KV cache, in two chunks
        ours.setup_caches(128)
        first = ours(tokens[:, :45], torch.tensor([0]))
        second = ours(tokens[:, 45:], torch.tensor([45]))
    assert (torch.cat([first, second], 1) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("exit_layer", [1, 2])
def test_prefix_then_suffix_is_the_full_model(hf_pair, exit_layer):
    _, ours = hf_pair
    tokens = torch.randint(0, 211, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(tokens, torch.tensor([0]))
        ours.setup_caches(64)
        pre = ours.prefix(tokens, torch.tensor([0]), exit_layer, logits="all")
        split = ours.suffix(pre.hidden, torch.tensor([0]), exit_layer)
        exited = ours.exit_logits(ours.run_layers(ours.embed_tokens(tokens), torch.tensor([0]), 0, exit_layer, []))
    assert (split - full).abs().max() <= 1e-5
    assert (pre.logits - exited).abs().max() <= 1e-5


def test_bf16_checkpoint_loads_as_float32(tmp_path):
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    model, _ = load_model(tmp_path)
    assert model.lm_head.weight.dtype == torch.float32
