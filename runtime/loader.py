"""Open a backend from a checkpoint directory (eager) or an exported artifact directory (.pte / .onnx).

Opening an ONNX artifact imports neither PyTorch nor `export/` / `models/`: only the artifact schema,
the tokenizer and ONNX Runtime.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from runtime.artifact import read_manifest
from runtime.errors import UserError
from runtime.tokenizer import TextTokenizer

DEFAULT_DRAFT_LENGTH = 4


@dataclass
class Opened:
    backend: object  # a runtime.backend.Backend
    tokenizer: TextTokenizer
    eos_token_ids: list[int]
    num_speculations: int  # the recommended or requested d
    draft_threshold: float  # the recommended or requested tau (0: always d drafts)
    facts: dict = field(default_factory=dict)  # what was opened, for JSON records


@contextmanager
def full_install_needed(what: str):
    """An ImportError of PyTorch/ExecuTorch inside becomes one line naming the install that has them."""
    try:
        yield
    except ImportError as e:
        raise UserError(f"{what} needs {e.name or 'PyTorch'}, which this install lacks (requirements-onnx.txt "
                        f"runs .onnx artifacts only): pip install -e . for the full install.") from None


def recommended_exit_layer(recommended: dict, requested: Optional[int], num_layers: int, model_dir: Path,
                           autoregressive: bool = False) -> int:
    if requested is not None:
        return requested
    if "exit_layer" in recommended:
        return int(recommended["exit_layer"])
    if autoregressive:  # plain decoding emits the same tokens whatever the draft/verify split
        return max(1, num_layers // 2)
    raise UserError(f"checkpoint '{model_dir}' records no recommended exit layer (no layerskip.json); pass "
                    f"--exit-layer E (python -m models.evaluate --model {model_dir} shows each exit's acceptance), "
                    f"or --ar for plain decoding.")


def open_checkpoint(model_dir: Optional[Path | str] = None, exit_layer: Optional[int] = None,
                    num_speculations: Optional[int] = None, max_seq_len: Optional[int] = None,
                    threads: int = 0, draft_threshold: Optional[float] = None, autoregressive: bool = False) -> Opened:
    """The eager PyTorch backend on a Hugging Face checkpoint directory (default: the shipped model).
    `autoregressive`: only plain decoding will run, so a checkpoint without a recommended exit layer opens."""
    with full_install_needed("running a checkpoint directory (the eager backend)"):
        import torch

        from models.checkpoint import DEFAULT_MODEL_DIR, load_model, read_checkpoint
        from runtime.eager import EagerBackend

    model_dir = Path(model_dir or DEFAULT_MODEL_DIR)
    if threads:
        torch.set_num_threads(threads)
    ckpt = read_checkpoint(model_dir)
    exit_layer = recommended_exit_layer(ckpt.recommended, exit_layer, ckpt.config.num_hidden_layers, model_dir,
                                        autoregressive)
    ckpt.config.check_exit_layer(exit_layer)
    max_seq_len = max_seq_len or min(ckpt.config.max_position_embeddings, 2048)
    if max_seq_len < 2:
        raise UserError(f"--max-seq-len {max_seq_len} must be >= 2.")
    model, ckpt = load_model(model_dir)
    backend = EagerBackend(model, exit_layer, max_seq_len)
    d = num_speculations if num_speculations is not None else int(
        ckpt.recommended.get("num_speculations", DEFAULT_DRAFT_LENGTH))
    tau = draft_threshold if draft_threshold is not None else float(ckpt.recommended.get("draft_threshold", 0.0))
    facts = {"backend": "eager", "model": str(model_dir), "exit_layer": exit_layer, "max_seq_len": max_seq_len}
    return Opened(backend, TextTokenizer(ckpt.tokenizer_path, ckpt.bos_token_id), ckpt.eos_token_ids, d, tau, facts)


def open_artifact(artifact_dir: Path | str, provider: str = "cpu", threads: int = 0,
                  exit_layer: Optional[int] = None, num_speculations: Optional[int] = None,
                  preload: Optional[tuple[str, ...]] = None, draft_threshold: Optional[float] = None) -> Opened:
    """The backend an exported artifact directory holds, checked against its manifest; the `preload`
    methods (default: those self-speculation calls) are loaded now, and so checked; the others when first called."""
    manifest = read_manifest(artifact_dir)
    if provider != "cpu" and manifest.format != "onnx":
        raise UserError(f"--provider {provider} runs .onnx artifacts; '{artifact_dir}' is a .pte, which runs on the "
                        f"CPU (XNNPACK or portable kernels): drop --provider or pass the ONNX artifact.")
    if exit_layer is not None and exit_layer != manifest.exit_layer:
        raise UserError(f"artifact '{artifact_dir}' was exported with exit layer {manifest.exit_layer}; "
                        f"drop --exit-layer or re-export with --exit-layer {exit_layer}.")
    if manifest.format == "pte":
        with full_install_needed("running a .pte artifact"):
            from runtime.executorch_backend import ExecuTorchBackend

        backend = ExecuTorchBackend(manifest, threads=threads, preload=preload)
    else:
        from runtime.onnx_backend import OnnxBackend

        backend = OnnxBackend(manifest, provider=provider, threads=threads, preload=preload)
    tokenizer = TextTokenizer(manifest.directory / "tokenizer.json", manifest.bos_token_id)
    d = num_speculations if num_speculations is not None else manifest.num_speculations
    tau = draft_threshold if draft_threshold is not None else manifest.draft_threshold
    return Opened(backend, tokenizer, manifest.eos_token_ids, d, tau, manifest.summary())


def open_target(spec: dict, threads: int = 0, preload: Optional[tuple[str, ...]] = None) -> Opened:
    """A benchmark target: {"kind": "eager", "path": checkpoint} or {"kind": "artifact", "path": artifact,
    "provider": "cpu" or "cuda" (ONNX Runtime's execution provider; default cpu)}."""
    if spec["kind"] == "eager":
        return open_checkpoint(spec["path"], threads=threads)
    return open_artifact(spec["path"], provider=spec.get("provider", "cpu"), threads=threads, preload=preload)
