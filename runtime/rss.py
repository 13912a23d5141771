"""Peak resident memory (Linux), and the fresh process that measures it for one decoding mode.

    python -m runtime.rss '{"kind": "artifact", "path": DIR, "mode": "spec", "d": 4, "prompts": [[...]], ...}'

The child imports the runtime libraries, notes the peak so far (the imports), resets the peak to
the current RSS (/proc/self/clear_refs), opens the backend, decodes the prompts and prints one JSON
line: {"import_peak_rss_mb", "baseline_rss_mb", "peak_rss_mb", "process_peak_rss_mb", "torch_imported"}.
With "torch_free": true it first makes `import torch` fail, as an app installed from
requirements-onnx.txt would: only ONNX Runtime, numpy and tokenizers are imported.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Optional

# What the full install's probe imports before the peak is reset: torch, ExecuTorch and ONNX Runtime
# alone peak at ~430 MB here, more than a small model adds.
FULL_RUNTIME_MODULES = ("executorch.runtime", "executorch.extension.llm.custom_ops.custom_ops",
                        "executorch.kernels.quantized", "onnxruntime")
TORCH_FREE_MODULES = ("onnxruntime", "tokenizers")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> float:
    """Resets this process's peak RSS to its current RSS (Linux); returns that RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak RSS (MB) since the process started or since reset_peak_rss()."""
    return _status_mb("VmHWM")


def block_torch() -> None:
    """Make every later `import torch` raise ImportError (a None entry in sys.modules does that)."""
    sys.modules["torch"] = None


def torch_imported() -> bool:
    return sys.modules.get("torch") is not None


def probe(spec: dict) -> dict:
    """The child's work: see the module docstring."""
    torch_free = bool(spec.get("torch_free"))
    if torch_free:
        block_torch()
    for module in TORCH_FREE_MODULES if torch_free else FULL_RUNTIME_MODULES:
        importlib.import_module(module)
    from runtime.decoding import generate
    from runtime.loader import open_target
    from runtime.measure import mode_config

    import_peak = peak_rss_mb()
    baseline = reset_peak_rss()
    if spec["kind"] == "two_model":
        from runtime.two_model import TwoModelBackend

        backend = TwoModelBackend({k: Path(v) for k, v in spec["paths"].items()}, spec["exit_layer"],
                                  spec["num_layers"], spec["max_seq_len"], 64)
        eos: tuple = ()
    else:  # the full-model baseline loads only its own method, as an app running it alone would
        opened = open_target(spec, spec.get("threads", 0), ("forward",) if spec["mode"] == "ar_full" else None)
        backend, eos = opened.backend, tuple(opened.eos_token_ids)
    cfg = mode_config(spec["mode"], spec["d"], spec["max_new_tokens"], eos, spec.get("draft_threshold", 0.0))
    for ids in spec["prompts"]:
        generate(backend, ids, cfg)
    peak = peak_rss_mb()
    return {"import_peak_rss_mb": import_peak, "baseline_rss_mb": baseline, "peak_rss_mb": peak,
            "process_peak_rss_mb": max(import_peak, peak), "torch_imported": torch_imported()}


def rss_probe(spec: dict) -> Optional[dict]:
    """Run `probe(spec)` in a fresh Python process; None (with a warning) if it failed."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "runtime.rss", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"warning: RSS probe failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
