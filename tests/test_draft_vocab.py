"""The draft head over K tokens: ranking, exact greedy and sampling output, exported artifacts, bad input."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_model
from exported import PROMPT, call_sequence, max_diff
from export.pipeline import ExportConfig, run_export
from models.checkpoint import load_model
from models.draft_vocab import COUNTS_FILE, draft_vocab_ids
from runtime.errors import UserError
from runtime.decoding import GenerationConfig, generate
from runtime.eager import EagerBackend
from runtime.loader import open_artifact
from test_decoding import exact_second_token_distribution, goodness_of_fit, second_tokens

pytestmark = pytest.mark.filterwarnings("ignore")

K = 160  # of the tiny vocabulary's 320


@pytest.fixture(scope="module")
def counted_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with token counts that rank the odd ids first."""
    directory = shutil.copytree(tiny_checkpoint, tmp_path_factory.mktemp("counted") / "ckpt")
    counts = [1000 + i if i % 2 else i for i in range(320)]
    (directory / COUNTS_FILE).write_text(json.dumps({"counts": counts}))
    return directory


def test_ids_are_the_most_frequent_tokens_or_the_lowest_ids(counted_checkpoint, tiny_checkpoint):
    ids, ranked_by = draft_vocab_ids(counted_checkpoint, 320, K)
    assert ids.tolist() == list(range(1, 320, 2)) and ranked_by == COUNTS_FILE
    ids, ranked_by = draft_vocab_ids(tiny_checkpoint, 320, 3)
    assert ids.tolist() == [0, 1, 2] and "token id" in ranked_by


def test_draft_logits_are_the_heads_rows_and_minus_infinity_elsewhere():
    model = tiny_model()
    ids = torch.tensor([3, 10, 11, 200])
    tokens, pos = torch.tensor([PROMPT]), torch.tensor([0])
    with torch.no_grad():
        full = model.prefix(tokens, pos, 2, logits="all").logits
        model.use_draft_vocab(ids)
        restricted = model.prefix(tokens, pos, 2, logits="all").logits
        suffix = model(tokens, pos)
        model.use_draft_vocab(None)
        assert torch.equal(model(tokens, pos), suffix)  # the verifier's head is untouched
    assert torch.allclose(restricted[..., ids], full[..., ids], atol=1e-6)
    outside = torch.ones(320, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(restricted[..., outside]).all()


@pytest.mark.parametrize("k", [8, 160])
def test_greedy_self_speculation_with_a_draft_vocab_equals_autoregressive(k):
    model = tiny_model()
    prompt = PROMPT
    ar = generate(EagerBackend(model, 2, 128), prompt, GenerationConfig(max_new_tokens=60, self_speculative=False))
    model.use_draft_vocab(torch.arange(k))
    spec = generate(EagerBackend(model, 2, 128), prompt, GenerationConfig(max_new_tokens=60, num_speculations=3))
    assert spec.tokens == ar.tokens
    assert 0 < spec.stats.accepted < spec.stats.drafted


def test_sampling_with_a_draft_vocab_keeps_the_distribution(small_vocab_model):
    prompt = [3, 7]
    cfg = GenerationConfig(max_new_tokens=2, num_speculations=2, temperature=1.0)
    exact = exact_second_token_distribution(small_vocab_model, prompt, cfg)
    restricted = copy.deepcopy(small_vocab_model)
    restricted.use_draft_vocab(torch.tensor([0, 2, 3, 5, 7, 8]))
    observed = second_tokens(EagerBackend(restricted, 1, 64), 12, cfg, 2000, prompt)
    assert goodness_of_fit(observed, exact) > 1e-3


@pytest.mark.parametrize("backend", ["xnnpack", "onnx"])
def test_exported_draft_head_matches_eager_and_keeps_greedy_output(counted_checkpoint, tmp_path, backend):
    manifest = run_export(ExportConfig(model=counted_checkpoint, out=tmp_path, backend=backend, max_seq_len=128,
                                       max_tokens_per_call=16, draft_vocab=K))[0]
    assert manifest.draft_vocab == K and manifest.extra["draft_vocab"]["ranked_by"] == COUNTS_FILE
    model, _ = load_model(counted_checkpoint)
    model.use_draft_vocab(torch.arange(1, 320, 2))
    expected = call_sequence(EagerBackend(model, manifest.exit_layer, manifest.max_seq_len))
    backend_ = open_artifact(manifest.directory).backend
    got = call_sequence(backend_)
    assert all(np.array_equal(np.isneginf(g), np.isneginf(e)) for g, e in zip(got, expected))
    finite = [np.where(np.isneginf(t), 0, t) for t in got]
    assert max_diff(finite, [np.where(np.isneginf(t), 0, t) for t in expected]) <= 1e-4
    ar = generate(backend_, PROMPT, GenerationConfig(max_new_tokens=40, self_speculative=False))
    spec = generate(backend_, PROMPT, GenerationConfig(max_new_tokens=40, num_speculations=3))
    assert spec.tokens == ar.tokens


@pytest.mark.parametrize("k", [-1, 321])
def test_a_draft_vocab_out_of_range_is_a_user_error(tiny_checkpoint, tmp_path, k):
    with pytest.raises(UserError, match="--draft-vocab"):
        run_export(ExportConfig(model=tiny_checkpoint, out=tmp_path, draft_vocab=k))
    assert not (tmp_path / "pte").exists()


def test_a_token_count_file_of_another_vocabulary_is_a_user_error(tiny_checkpoint, tmp_path):
    directory = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (directory / COUNTS_FILE).write_text(json.dumps({"counts": [1, 2, 3]}))
    with pytest.raises(UserError, match="regenerate"):
        draft_vocab_ids(directory, 320, 10)
    (directory / COUNTS_FILE).write_text("not json")
    with pytest.raises(UserError, match=COUNTS_FILE):
        draft_vocab_ids(directory, 320, 10)
