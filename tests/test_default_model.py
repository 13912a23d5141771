"""The shipped models (the default and deep16): loadable by transformers, documented, and as good an
early exit as claimed."""

import json
import re

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from models.checkpoint import DEFAULT_MODEL_DIR, load_model
from models.data import humaneval_prompts
from runtime.decoding import GenerationConfig, generate
from runtime.loader import open_checkpoint

DEEP16_DIR = DEFAULT_MODEL_DIR.parent / "deep16"
SHIPPED = [pytest.param(DEFAULT_MODEL_DIR, id="default"), pytest.param(DEEP16_DIR, id="deep16")]


@pytest.mark.parametrize("model_dir", SHIPPED)
def test_transformers_loads_it_and_agrees_with_our_model(model_dir):
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir, local_files_only=True)
    ours, _ = load_model(model_dir)
    tokens = torch.tensor([[0] + hf_tokenizer.encode("def add(a, b):\n    return a + b\n", add_special_tokens=False)])
    with torch.no_grad():
        assert (ours(tokens, torch.tensor([0])) - hf(tokens).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("model_dir,depth_share", [(DEFAULT_MODEL_DIR, 2), (DEEP16_DIR, 4)], ids=["default", "deep16"])
def test_recommended_settings_are_used_and_reach_the_acceptance_target(model_dir, depth_share):
    opened = open_checkpoint(model_dir)  # no --exit-layer / --num-speculations: the model's layerskip.json
    recommended = json.loads((model_dir / "layerskip.json").read_text())
    assert (opened.backend.exit_layer, opened.num_speculations, opened.draft_threshold) == (
        recommended["exit_layer"], recommended["num_speculations"], recommended["draft_threshold"])
    assert opened.backend.exit_layer <= opened.backend.num_layers // depth_share  # default L/2, deep16 L/4
    accepted = drafted = 0
    for problem in humaneval_prompts()[:4]:
        ids = opened.tokenizer.encode(problem["prompt"])
        spec = generate(opened.backend, ids, GenerationConfig(max_new_tokens=64, num_speculations=4,
                                                              draft_threshold=opened.draft_threshold))
        ar = generate(opened.backend, ids, GenerationConfig(max_new_tokens=64, self_speculative=False))
        assert spec.tokens == ar.tokens
        accepted, drafted = accepted + spec.stats.accepted, drafted + spec.stats.drafted
    assert accepted / drafted >= 0.6


@pytest.mark.parametrize("model_dir", SHIPPED)
def test_model_card_states_the_trained_facts(model_dir):
    card = (model_dir / "README.md").read_text()
    log = json.loads((model_dir / "train_log.json").read_text())
    assert log["corpus"]["sha256"] in card
    assert f"{log['parameters']:,}" in card
    assert re.search(r"python -m models\.train .*--steps %d" % log["config"]["steps"], card, re.S)
    for flag, key in (("--dim", "hidden_size"), ("--layers", "num_hidden_layers"), ("--ffn-dim", "intermediate_size")):
        assert f"{flag} {log['config'][key]} " in card
    if log["config"]["recipe"].get("focus_exit"):
        assert f"--focus-exit {log['config']['recipe']['focus_exit']} " in card
    for loss in log["final_heldout_loss"].values():
        assert f"{loss:.3f}" in card


def test_shipped_token_counts_cover_the_training_split():
    from models.draft_vocab import COUNTS_FILE, draft_vocab_ids

    counts = json.loads((DEFAULT_MODEL_DIR / COUNTS_FILE).read_text())["counts"]
    log = json.loads((DEFAULT_MODEL_DIR / "train_log.json").read_text())
    assert sum(counts) == log["corpus"]["train_tokens"]
    ids, ranked_by = draft_vocab_ids(DEFAULT_MODEL_DIR, len(counts), 8)
    assert ranked_by == COUNTS_FILE and min(counts[i] for i in ids) >= sorted(counts)[-8]
