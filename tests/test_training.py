"""The LayerSkip recipe and the training script: recipe arithmetic, output format, resume, DDP, bad input."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import train as train_module
from runtime.errors import UserError
from models.config import ModelConfig
from models.layerskip import LayerSkipLoss, LayerSkipRecipe, skip_or_run
from models.model import DecoderLayer, Transformer
from models.train import TrainConfig, parse_args, train

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the recipe


def test_dropout_rates_rise_with_depth():
    rates = LayerSkipRecipe(dropout_max=0.2, dropout_scale="exp").dropout_rates(8)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert all(a < b for a, b in zip(rates, rates[1:]))
    assert rates[4] == pytest.approx(0.2 * (2 ** (4 / 7) - 1))  # p_l = p_max (2^(l/(L-1)) - 1)
    assert LayerSkipRecipe(dropout_max=0.2, dropout_scale="uniform").dropout_rates(4) == [0.2] * 4
    assert LayerSkipRecipe.off().dropout_rates(4) == [0.0] * 4


def test_curricula_choose_exit_layers():
    rot = LayerSkipRecipe(curriculum="rotational", rotation_interval=3)
    assert rot.exit_layers(0, 100, 8) == [0, 3, 6, 7] and rot.exit_layers(1, 100, 8) == [2, 5, 7]
    assert LayerSkipRecipe(curriculum="none").exit_layers(5, 100, 4) == [0, 1, 2, 3]
    gradual = LayerSkipRecipe(curriculum="gradual")
    assert gradual.exit_layers(0, 100, 8) == [6, 7] and gradual.exit_layers(99, 100, 8) == list(range(8))
    assert LayerSkipRecipe.off().exit_layers(3, 100, 8) == [7]


def test_loss_weights_grow_with_depth_and_sum_to_one():
    weights = LayerSkipRecipe(early_exit_scale=0.5).loss_weights([0, 3, 7], 8)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] < weights[1] < weights[2]
    assert weights[0] / weights[1] == pytest.approx(1 / 4)  # linear in depth: (0+1) / (3+1)


def test_skipped_samples_pass_through_unchanged():
    from conftest import tiny_model

    model = tiny_model()
    h = torch.randn(3, 5, model.config.hidden_size)
    cos, sin = model.rope(torch.arange(5))
    keep = torch.tensor([True, False, True])
    out = skip_or_run(model.layers[0], h, keep, cos, sin)
    full = model.layers[0](h, cos, sin, None)
    assert torch.equal(out[1], h[1])
    assert torch.allclose(out[[0, 2]], full[[0, 2]], atol=1e-6)


def test_focus_exit_carries_a_loss_every_step_at_its_own_weight():
    recipe = LayerSkipRecipe(curriculum="rotational", rotation_interval=2, focus_exit=4, focus_weight=1.0)
    for step in range(4):  # layer index 3 (E = 4) is in every step; the rotation is otherwise unchanged
        layers = recipe.exit_layers(step, 100, 16)
        assert 3 in layers and layers[-1] == 15 and layers == sorted(set(layers))
    assert recipe.exit_layers(1, 100, 16) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert recipe.exit_layers(0, 100, 16) == [0, 2, 3, 4, 6, 8, 10, 12, 14, 15]
    weights = dict(zip([1, 3, 15], recipe.loss_weights([1, 3, 15], 16)))
    assert weights[3] == pytest.approx(weights[15])  # focus weight 1 = the last layer's
    assert weights[1] / weights[15] == pytest.approx(2 / 16)  # others stay linear in depth
    half = LayerSkipRecipe(focus_exit=4, focus_weight=0.5).loss_weights([3, 15], 16)
    assert half[0] / half[1] == pytest.approx(0.5)


def test_exit_distill_mixes_the_exit_cross_entropy_with_the_kl_to_the_last_layer():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
    tokens, targets = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    keep = torch.ones(3, 2, dtype=torch.bool)
    plain, per_layer = LayerSkipLoss(model, 0.0)(tokens, targets, keep, [0, 2], [1.0, 0.0])
    assert float(plain) == pytest.approx(float(per_layer[0]))  # a = 0: the paper's cross-entropy
    pure, _ = LayerSkipLoss(model, 1.0)(tokens, targets, keep, [0, 2], [1.0, 0.0])
    with torch.no_grad():  # a = 1: KL(last || exit), by hand
        h = model.embed_tokens(tokens)
        cos, sin = model.rope(torch.arange(8))
        exits = []
        for layer in model.layers:
            h = layer(h, cos, sin, None)
            exits.append(torch.log_softmax(model.exit_logits(h).float(), -1))
        kl = (exits[2].exp() * (exits[2] - exits[0])).sum(-1).mean()
    assert float(pure) == pytest.approx(float(kl), rel=1e-4)
    mixed, _ = LayerSkipLoss(model, 0.25)(tokens, targets, keep, [0, 2], [0.5, 0.5])
    expected = 0.5 * (0.75 * float(per_layer[0]) + 0.25 * float(kl)) + 0.5 * float(per_layer[2])
    assert float(mixed) == pytest.approx(expected, rel=1e-4)  # the last layer keeps its cross-entropy
    pure.backward()  # the last layer's distribution is a target: no gradient reaches the layer after the exit
    assert all(p.grad is None or not p.grad.any() for p in model.layers[1].parameters())


@pytest.mark.parametrize("bad", [dict(dropout_max=1.0), dict(dropout_max=-0.1), dict(curriculum="sideways"),
                                 dict(dropout_scale="cubic"), dict(rotation_interval=0), dict(focus_exit=-1),
                                 dict(focus_weight=-1.0), dict(exit_distill=1.5), dict(exit_distill=-0.1)])
def test_recipe_settings_out_of_range(bad):
    with pytest.raises(UserError):
        LayerSkipRecipe(**bad)


# ---------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (root / f"mod{i}.py").write_text("".join(
            f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40)))
    return root


def tiny_args(out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--corpus", str(corpus), "--vocab-size", "300", "--dim", "32", "--layers", "3",
            "--heads", "2", "--kv-heads", "1", "--ffn-dim", "64", "--seq-len", "32", "--batch-size", "4",
            "--warmup-steps", "1", "--eval-every", "3", "--checkpoint-every", "3", "--lr", "1e-2", *extra]


def test_training_writes_a_checkpoint_transformers_loads(tmp_path, corpus):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path / "run"
    train(parse_args(tiny_args(out, corpus, "--steps", "6")))
    log = json.loads((out / "train_log.json").read_text())
    assert log["log"][-1]["train_loss"]["2"] < log["log"][0]["train_loss"]["2"]  # the last layer learns
    assert set(log["final_heldout_loss"]) == {"0", "1", "2"}  # a held-out loss for every exit
    assert (out / "train_loss.png").stat().st_size > 1000
    hf = LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(out, local_files_only=True)
    from models.checkpoint import load_model

    ours, _ = load_model(out)
    ids = torch.tensor([tok.encode("def f1_2(x):")])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids, torch.tensor([0]))).abs().max() <= 1e-4


def test_resume_continues_exactly_where_it_stopped(tmp_path, corpus, monkeypatch):
    straight = tmp_path / "straight"
    train(parse_args(tiny_args(straight, corpus, "--steps", "6")))

    resumed = tmp_path / "resumed"
    real_step = train_module.train_step

    def crash_at_step_4(run, step):
        if step == 4:
            raise KeyboardInterrupt
        return real_step(run, step)

    monkeypatch.setattr(train_module, "train_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(parse_args(tiny_args(resumed, corpus, "--steps", "6")))
    assert torch.load(resumed / "train_state.pt", weights_only=False)["step"] == 3  # the last checkpoint
    monkeypatch.setattr(train_module, "train_step", real_step)
    train(parse_args(tiny_args(resumed, corpus, "--steps", "6")))
    a = torch.load(straight / "train_state.pt", weights_only=False)["model"]
    b = torch.load(resumed / "train_state.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tmp_path, corpus):
    out = tmp_path / "run"
    train(parse_args(tiny_args(out, corpus, "--steps", "3")))
    with pytest.raises(UserError, match="written with other settings"):
        train(parse_args(tiny_args(out, corpus, "--steps", "3", "--layer-dropout", "0.3")))


def test_continual_training_from_a_llama_checkpoint(tmp_path, corpus, tiny_checkpoint):
    out = tmp_path / "ft"
    train(parse_args(["--out", str(out), "--init-from", str(tiny_checkpoint), "--corpus", str(corpus),
                      "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--warmup-steps", "0",
                      "--eval-every", "2", "--checkpoint-every", "2"]))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert (out / "tokenizer.json").read_bytes() == (tiny_checkpoint / "tokenizer.json").read_bytes()


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, corpus, monkeypatch):
    out = tmp_path / "run"
    train(parse_args(tiny_args(out, corpus, "--steps", "3")))
    before = (out / "train_state.pt").read_bytes()

    def no_space(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError, match="No space left on device"):
        train(parse_args(tiny_args(out, corpus, "--steps", "3", "--restart")))
    assert (out / "train_state.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_ddp_ranks_end_with_identical_weights(tmp_path, corpus):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           str(REPO / "tests" / "ddp_worker.py"), *tiny_args(out, corpus, "--steps", "4", "--threads", "1")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rank0, rank1 = (torch.load(out / f"rank{r}_weights.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert not torch.equal(rank0["embed_tokens.weight"], torch.load(out / "rank0_initial.pt")["embed_tokens.weight"])


# ---------------------------------------------------------------- bad input


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no .py files"):
        train(parse_args(tiny_args(tmp_path / "run", tmp_path / "empty", "--steps", "2")))


def test_init_from_a_non_llama_checkpoint(tmp_path, corpus):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="not 'llama'"):
        train(parse_args(["--out", str(tmp_path / "o"), "--init-from", str(tmp_path / "gpt2"), "--corpus", str(corpus)]))


def test_focus_exit_must_be_below_the_last_layer(tmp_path, corpus):
    with pytest.raises(UserError, match="--focus-exit 3 must be below --layers 3"):
        parse_args(tiny_args(tmp_path / "o", corpus, "--focus-exit", "3"))


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, corpus):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="no CUDA GPU is available"):
        parse_args(tiny_args(tmp_path / "o", corpus, "--device", "cuda"))


def test_reused_tokenizer_is_kept_and_a_missing_one_named(tmp_path, corpus):
    first = tmp_path / "first"
    train(parse_args(tiny_args(first, corpus, "--steps", "2")))
    second = tmp_path / "second"
    train(parse_args(tiny_args(second, corpus, "--steps", "2", "--tokenizer", str(first / "tokenizer.json"),
                               "--focus-exit", "1")))
    assert (second / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()
    assert all("0" in e["train_loss"] for e in json.loads((second / "train_log.json").read_text())["log"])
    with pytest.raises(UserError, match="--tokenizer .* does not exist"):
        train(parse_args(tiny_args(tmp_path / "third", corpus, "--steps", "2", "--tokenizer", str(tmp_path / "none.json"))))


def test_cli_reports_bad_settings_in_one_line(tmp_path, corpus):
    proc = subprocess.run([sys.executable, "-m", "models.train", *tiny_args(tmp_path / "o", corpus, "--layer-dropout",
                                                                            "1.5")], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --layer-dropout 1.5 is out of range; pass a rate in [0, 1)."]
