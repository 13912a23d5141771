"""Plain decoders a user could pick instead of ours, measured under the benchmark's protocol.

    ort_genai         ONNX Runtime GenAI: its model builder (`onnxruntime_genai.models.builder`) on the
                      same checkpoint at the artifact's bits and block size, run by its C++ generation
                      loop (og.Generator), greedy. The counterpart of our .onnx artifacts.
    executorch_llama  ExecuTorch's own Llama export (`executorch.extension.llm.export.export_llm`) of the
                      same checkpoint at the artifact's scheme and group size, run by its C++ text runner
                      (TextLLMRunner), greedy. The counterpart of our .pte artifacts.

A peer decodes the same prompts (ORT GenAI takes our token ids; ExecuTorch's runner takes text and
reads it into the same ids), with the same number of new tokens and thread count, stops at the same
EOS, and is timed like runtime.measure.run_pass: from the first generated token to the last (the
prompt excluded). ORT GenAI needs `pip install -e ".[peers]"`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import UserError

GENAI_PRECISION = {"int4": "int4", "int8": "int8", "none": "fp32"}  # our ONNX scheme -> the builder's -p


def import_genai():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise UserError("the ONNX Runtime GenAI peer needs onnxruntime-genai: pip install -e '.[peers]'.") from None
    return og


def last_line(stderr: str) -> str:
    """What a failed tool's error says, for a one-line UserError."""
    return (stderr.strip().splitlines() or ["(no output)"])[-1][:300]


def build_ort_genai(checkpoint: Path, out: Path, scheme: str, block_size: int, threads: int) -> float:
    """Build the checkpoint with ORT GenAI's model builder into `out`; returns the build's wall seconds.

    `scheme` is our ONNX scheme (int4, int8, none); quantized builds use `block_size` and accuracy
    level 4 (int8 activations), as our MatMulNBits graphs do. `threads` (0: ONNX Runtime's default)
    goes into genai_config.json, where og.Model reads its session options."""
    import_genai()
    if scheme not in GENAI_PRECISION:
        raise UserError(f"no ORT GenAI build for scheme {scheme!r}; use one of {', '.join(GENAI_PRECISION)}.")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
           "-p", GENAI_PRECISION[scheme], "-e", "cpu", "-c", str(out / "cache")]
    if scheme != "none":
        cmd += ["--extra_options", f"block_size={block_size}", "accuracy_level=4"]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    shutil.rmtree(out / "cache", ignore_errors=True)  # the builder's scratch files
    if done.returncode != 0:
        raise UserError(f"ORT GenAI's builder failed on '{checkpoint}' ({last_line(done.stderr)}); it builds "
                        f"Hugging Face Llama checkpoints (config.json + safetensors).")
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if threads:
        options["intra_op_num_threads"] = threads
        options["inter_op_num_threads"] = 1
    config_path.write_text(json.dumps(config, indent=2))
    return seconds


ET_QUANTIZATION = {  # our .pte scheme -> export_llm's quantization settings (8da8w: not wired up)
    "8da4w": lambda group: {"qmode": "8da4w", "group_size": group, "embedding_quantize": "4,32"},
    "none": lambda group: {},
}


class OrtGenAIDecoder:
    """Greedy plain decoding with og.Generator on a built model directory."""

    name = "ort_genai"

    def __init__(self, directory: Path):
        self.og = import_genai()
        self.model = self.og.Model(str(directory))

    def generate(self, prompt: list[int], max_new_tokens: int) -> tuple[list[int], float, float]:
        """(new tokens, seconds to the first, seconds from the first to the last)."""
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens)
        t0 = time.perf_counter()
        generator = og.Generator(self.model, params)
        generator.append_tokens(prompt)
        tokens: list[int] = []
        t_first = None
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            if t_first is None:
                t_first = time.perf_counter()
        return tokens, t_first - t0, time.perf_counter() - t_first

    def matches(self, tokens: list[int], ours: list[int]) -> bool:
        return tokens == ours


# ---------------------------------------------------------------- ExecuTorch's Llama export and runner


def write_meta_checkpoint(checkpoint: Path, out: Path) -> dict:
    """The checkpoint in Meta's Llama layout, as ExecuTorch's Llama export reads it: consolidated.pth
    (Meta's parameter names) and params.json. The rotary stays in Hugging Face's half-split layout
    (use_hf_rope), so Q and K need no permuting. Returns the token ids for the .pte's metadata."""
    import torch

    from models.checkpoint import load_model

    model, ckpt = load_model(checkpoint)
    c = model.config
    if c.rope_scaling is not None:
        raise UserError(f"the ExecuTorch Llama peer takes plain rotary only; '{checkpoint}' scales it.")
    weights = {"tok_embeddings.weight": model.embed_tokens.weight, "norm.weight": model.norm.weight,
               "output.weight": model.lm_head.weight}
    for i, layer in enumerate(model.layers):
        a, m = layer.self_attn, layer.mlp
        for name, p in (("attention.wq", a.q_proj), ("attention.wk", a.k_proj), ("attention.wv", a.v_proj),
                        ("attention.wo", a.o_proj), ("feed_forward.w1", m.gate_proj),
                        ("feed_forward.w2", m.down_proj), ("feed_forward.w3", m.up_proj)):
            weights[f"layers.{i}.{name}.weight"] = p.weight
        weights[f"layers.{i}.attention_norm.weight"] = layer.input_layernorm.weight
        weights[f"layers.{i}.ffn_norm.weight"] = layer.post_attention_layernorm.weight
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone().contiguous() for k, v in weights.items()}, out / "consolidated.pth")
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "hidden_dim": c.intermediate_size,
              "head_dim": c.head_dim, "norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "use_hf_rope": True,
              "use_scaled_rope": False}
    (out / "params.json").write_text(json.dumps(params, indent=2))
    return {"bos": ckpt.bos_token_id or 0, "eos": list(ckpt.eos_token_ids), "tokenizer": str(ckpt.tokenizer_path)}


def build_executorch_llama(checkpoint: Path, out: Path, group_size: int, max_seq_len: int,
                           scheme: str = "8da4w") -> float:
    """Export the checkpoint with ExecuTorch's own Llama export (llama3 model class, KV cache, SDPA with
    KV cache, XNNPACK with extended ops; `scheme` 8da4w at `group_size` (0: per channel) with a 4-bit
    embedding, or none) to out/llama.pte, the tokenizer beside it; returns the wall seconds of
    conversion + export."""
    t = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The converted weights go to a fresh temporary directory: a checkpoint path that contains a
    # scheme name ("8da4w") makes the export read the checkpoint as already quantized, and fail.
    with tempfile.TemporaryDirectory(prefix="layerskip-meta-") as tmp:
        ids = write_meta_checkpoint(checkpoint, Path(tmp))
        shutil.copy(ids["tokenizer"], out / "tokenizer.json")
        config = {
            "base": {"model_class": "llama3", "checkpoint": str(Path(tmp) / "consolidated.pth"),
                     "params": str(Path(tmp) / "params.json"),
                     "metadata": json.dumps({"get_bos_id": ids["bos"], "get_eos_ids": ids["eos"]})},
            "model": {"use_kv_cache": True, "use_sdpa_with_kv_cache": True, "dtype_override": "fp32"},
            "export": {"max_seq_length": max_seq_len, "max_context_length": max_seq_len, "output_dir": str(out),
                       "output_name": str(out / "llama.pte")},  # a bare name is written to the working directory
            "quantization": ET_QUANTIZATION[scheme](group_size),
            "backend": {"xnnpack": {"enabled": True, "extended_ops": True}}}
        (Path(tmp) / "config.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML; hydra wants .yaml
        done = subprocess.run([sys.executable, "-m", "executorch.extension.llm.export.export_llm", "--config",
                               str(Path(tmp) / "config.yaml")], capture_output=True, text=True, cwd=tmp)
        shutil.copy(Path(tmp) / "config.yaml", out / "export_config.yaml")
    if done.returncode != 0 or not (out / "llama.pte").exists():
        raise UserError(f"ExecuTorch's Llama export failed on '{checkpoint}' ({last_line(done.stderr)}).")
    return time.perf_counter() - t


class ExecuTorchLlamaDecoder:
    """Greedy plain decoding with ExecuTorch's C++ text runner (TextLLMRunner) on build_executorch_llama's .pte.

    The runner takes text: each prompt's ids are decoded and it tokenizes them again with the same
    tokenizer.json (the same ids on the 30 benchmark prompts; checked with its C++ tokenizer); its
    tokens come back as text pieces, so `generate` returns the pieces, timed from the first piece
    to the last."""

    name = "executorch_llama"

    def __init__(self, directory: Path, tokenizer):
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers llama::custom_sdpa)
        import executorch.kernels.quantized  # noqa: F401  (the 4-bit embedding)
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

        self.tokenizer = tokenizer
        self.config_type = GenerationConfig
        self.runner = TextLLMRunner(str(directory / "llama.pte"), str(directory / "tokenizer.json"))

    def generate(self, prompt: list[int], max_new_tokens: int) -> tuple[list[str], float, float]:
        bos = self.tokenizer.bos_token_id
        text = self.tokenizer.decode(prompt)  # special tokens dropped: the BOS goes in as its text
        if prompt and prompt[0] == bos:
            # The runner adds no BOS of its own here (num_bos is not applied to this tokenizer), but
            # its tokenizer reads special tokens written in the text.
            text = self.tokenizer.tokenizer.id_to_token(bos) + text
        config = self.config_type(echo=False, max_new_tokens=max_new_tokens, temperature=0.0)
        pieces, stamps = [], []

        def on_token(piece: str) -> None:
            stamps.append(time.perf_counter())
            pieces.append(piece)

        self.runner.reset()
        t0 = time.perf_counter()
        with quiet_native_output():  # the runner logs its own stats on every generate
            self.runner.generate(text, config, on_token)
        if not stamps:
            return [], 0.0, 0.0
        return pieces, stamps[0] - t0, stamps[-1] - stamps[0]

    def matches(self, pieces: list[str], ours: list[int]) -> bool:
        return "".join(pieces) == self.tokenizer.decode(ours)


@contextmanager
def quiet_native_output():
    """Send file descriptors 1 and 2 (what C++ code writes to) to /dev/null for a while."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)
