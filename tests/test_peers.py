"""The plain decoders we are measured against (runtime/peers.py, runtime.bench --peers)."""

import json
import sys

import pytest

from export.pipeline import ExportConfig, run_export
from exported import PROMPT
from models.checkpoint import DEFAULT_MODEL_DIR
from models.data import prompt_set
from runtime import bench
from runtime.decoding import GenerationConfig, generate
from runtime.errors import UserError
from runtime.loader import open_artifact, open_checkpoint
from runtime.peers import ExecuTorchLlamaDecoder, OrtGenAIDecoder, build_executorch_llama, build_ort_genai

pytestmark = pytest.mark.filterwarnings("ignore")


def export_onnx(checkpoint, out, **kw):
    return run_export(ExportConfig(model=checkpoint, out=out, backend="onnx", max_seq_len=128,
                                   max_tokens_per_call=16, **kw))[0]


@pytest.fixture(params=["checkpoint", "gguf import"])
def llama_checkpoint(request, tiny_checkpoint, tmp_path):
    """A Llama checkpoint directory: the tiny one, or one imported from a GGUF file (models.import_gguf,
    whose config once lacked the `architectures` ORT GenAI's builder dispatches on)."""
    if request.param == "checkpoint":
        return tiny_checkpoint
    from gguf_files import tiny_hf_llama, write_gguf
    from models.import_gguf import import_gguf

    return import_gguf(write_gguf(tmp_path / "m.gguf", tiny_hf_llama(tied=True)), tmp_path / "imported")


def test_ort_genai_decodes_what_our_plain_decoding_does(llama_checkpoint, tmp_path):
    """At fp32 both are the same model: ORT GenAI's build of the checkpoint, driven by our token ids
    and timing, emits exactly our autoregressive tokens, first token included."""
    ours = open_artifact(export_onnx(llama_checkpoint, tmp_path / "ours", exit_layer=1).directory, threads=1)
    seconds = build_ort_genai(llama_checkpoint, tmp_path / "genai", "none", 32, threads=1)
    assert seconds > 0
    config = json.loads((tmp_path / "genai" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 1
    peer = OrtGenAIDecoder(tmp_path / "genai")
    for prompt in (PROMPT, PROMPT[:3]):
        tokens, ttft, decode = peer.generate(prompt, 24)
        expected = generate(ours.backend, prompt, GenerationConfig(max_new_tokens=24, self_speculative=False,
                                                                   eos_token_ids=(1,))).tokens
        assert tokens == expected and ttft > 0 and decode > 0


def test_executorch_llama_runner_decodes_what_we_do(tmp_path):
    """fp32 both: ExecuTorch's Llama export of the shipped model (Meta's layout, Hugging Face rotary)
    and its C++ runner, given our prompt as text, emit our autoregressive text. (The shipped model,
    not a random tiny one: the runner's Python binding fails on tokens that are part of a UTF-8
    character, which a random model emits at once; about 90 s of export.)"""
    ours = open_checkpoint(DEFAULT_MODEL_DIR)
    seconds = build_executorch_llama(DEFAULT_MODEL_DIR, tmp_path / "et", 0, 256, "none")
    assert seconds > 0 and (tmp_path / "et" / "llama.pte").exists()
    assert not list((tmp_path / "et").glob("*.pth"))  # the converted weights are not kept
    peer = ExecuTorchLlamaDecoder(tmp_path / "et", ours.tokenizer)
    for prompt in prompt_set("humaneval")[:2]:
        ids = ours.tokenizer.encode(prompt["prompt"])
        pieces, ttft, decode = peer.generate(ids, 24)
        expected = generate(ours.backend, ids, GenerationConfig(max_new_tokens=24, self_speculative=False,
                                                                eos_token_ids=tuple(ours.eos_token_ids))).tokens
        assert peer.matches(pieces, expected) and len(expected) == 24 and ttft > 0 and decode > 0
        assert not peer.matches(pieces[:-1], expected)


def test_bench_peers_pairs_ort_genai_with_each_onnx_artifact(tiny_checkpoint, tmp_path, capsys):
    artifact = export_onnx(tiny_checkpoint, tmp_path / "a", quant="int4", group_size=32).directory
    out = tmp_path / "bench"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def add(a, b):"}\n{"prompt": "for i in range(10):"}\n')
    assert bench.main(["--artifact", str(artifact), "--peers", "--prompts", f"file:{prompts}", "--max-new-tokens", "12",
                       "--repeats", "1", "--threads", "1", "--no-rss", "--positions", "5", "100000",
                       "--out", str(out)]) == 0
    run = json.loads((out / "bench.json").read_text())["runs"][0]
    # --positions: every call's cost at each cache position, the one past the cache clamped to the last a step fits
    last = run["max_seq_len"] - run["num_speculations"] - 2
    assert list(run["calls_ms_by_position"]) == ["5", str(last)]
    assert all(c["full_1"] > 0 and c[f"verify_{run['num_speculations'] + 1}"] > 0 for c in run["calls_ms_by_position"].values())
    assert f"| {run['label']} | {last} |" in (out / "bench.md").read_text()
    modes = run["modes"]
    peer = modes["peers"]["ort_genai"]
    assert peer["group_size"] == 32 and peer["build_s"] > 0 and 0 <= peer["greedy_identical_to_ar"] <= 1
    plain = {"ar": modes["ar"]["decode_tokens_per_s"], "ar_full": modes["ar_full"]["decode_tokens_per_s"],
             "ort_genai": peer["decode_tokens_per_s"]}
    assert modes["fastest_plain"] == max(plain, key=plain.get)
    assert modes["speedup_vs_fastest_plain"] == pytest.approx(modes["spec"]["decode_tokens_per_s"] / max(plain.values()))
    assert "| ort_genai |" in (out / "bench.md").read_text()
    assert (out / "tokens_per_s.png").exists()


def test_without_onnxruntime_genai_the_peer_names_the_install(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    with pytest.raises(UserError, match=r"pip install -e '\.\[peers\]'"):
        build_ort_genai(tiny_checkpoint, tmp_path / "genai", "int4", 32, threads=1)


def test_a_checkpoint_the_builder_cannot_read_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="ORT GenAI's builder failed"):
        build_ort_genai(tmp_path / "empty", tmp_path / "genai", "int4", 32, threads=1)


def test_peers_are_built_from_the_checkpoint_the_artifact_came_from(tiny_checkpoint, tmp_path, monkeypatch):
    """--peers on an artifact: its recorded source (a directory, or a .gguf file: imported), else --model, and
    only a checkpoint with the recorded hash; before, a source that was not a directory (a .gguf) silently fell
    back to --model's default, the shipped model, and the peer decoded another model."""
    import shutil
    from types import SimpleNamespace

    from gguf_files import tiny_hf_llama, write_gguf
    from models.checkpoint import checkpoint_hash

    monkeypatch.setenv("LAYERSKIP_EDGE_CACHE", str(tmp_path / "cache"))

    def manifest(path):
        return SimpleNamespace(source={"path": str(path), "sha256": checkpoint_hash(path)}, directory=tmp_path / "art")

    assert bench.peer_checkpoint(manifest(tiny_checkpoint), DEFAULT_MODEL_DIR) == tiny_checkpoint
    gguf = write_gguf(tmp_path / "m.gguf", tiny_hf_llama())
    imported = bench.peer_checkpoint(manifest(gguf), DEFAULT_MODEL_DIR)
    assert (imported / "config.json").exists() and imported != DEFAULT_MODEL_DIR
    moved = manifest(tiny_checkpoint)
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    moved.source["path"] = str(tmp_path / "gone")  # exported elsewhere: --model names the same checkpoint
    assert bench.peer_checkpoint(moved, copy) == copy
    with pytest.raises(UserError, match="--peers builds the plain decoders from the checkpoint .* pass --model"):
        bench.peer_checkpoint(moved, DEFAULT_MODEL_DIR)
