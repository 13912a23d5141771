"""Plain decoders a user could pick instead of ours, measured under the benchmark's protocol.

    ort_genai   ONNX Runtime GenAI: its model builder (`onnxruntime_genai.models.builder`) on the same
                checkpoint at the artifact's bits and block size, run by its C++ generation loop
                (og.Generator), greedy. The counterpart of our .onnx artifacts.

A peer decodes the same token ids (no tokenizer in the loop), with the same number of new tokens, the
same thread count, stops at the same EOS, and is timed like runtime.measure.run_pass: from the first
generated token to the last (the prompt excluded). Needs `pip install -e ".[peers]"`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from runtime.errors import UserError

GENAI_PRECISION = {"int4": "int4", "int8": "int8", "none": "fp32"}  # our ONNX scheme -> the builder's -p


def import_genai():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise UserError("the ONNX Runtime GenAI peer needs onnxruntime-genai: pip install -e '.[peers]'.") from None
    return og


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
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        raise UserError(f"ORT GenAI's builder failed on '{checkpoint}' ({last}); it builds Hugging Face Llama "
                        f"checkpoints (config.json + safetensors).")
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if threads:
        options["intra_op_num_threads"] = threads
        options["inter_op_num_threads"] = 1
    config_path.write_text(json.dumps(config, indent=2))
    return seconds


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
