"""Reading and writing Hugging Face Llama checkpoint directories on local disk (never a hub)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.config import ModelConfig
from runtime.artifact import read_json
from runtime.errors import UserError
from models.model import Transformer, rope_inverse_frequencies

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"
RECOMMENDED_FILE = "layerskip.json"  # the recommended (exit layer, draft length) beside the weights
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Checkpoint:
    """What a checkpoint directory holds besides weights: its config and runtime facts."""

    path: Path
    config: ModelConfig
    bos_token_id: Optional[int]
    eos_token_ids: list[int]
    recommended: dict[str, Any] = field(default_factory=dict)  # {"exit_layer": E, "num_speculations": d}

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def checkpoint_dir(path: Path | str) -> Path:
    """The checkpoint directory `path` names: itself, or for a llama.cpp .gguf file its imported copy."""
    path = Path(path)
    if path.suffix == ".gguf" and not path.is_dir():
        from models.import_gguf import cached_import

        return cached_import(path)
    return path


def read_checkpoint(path: Path | str) -> Checkpoint:
    """Validate a checkpoint directory (or .gguf file) and read its config, token ids and recommended settings."""
    path = checkpoint_dir(path)
    if not path.is_dir():
        raise UserError(f"Checkpoint directory '{path}' does not exist; pass --model with a local "
                        f"Hugging Face Llama checkpoint directory or a llama.cpp .gguf file.")
    hf = read_json(path / "config.json", "Checkpoint config")
    config = ModelConfig.from_hf(hf, source=str(path / "config.json"))
    gen_path = path / "generation_config.json"
    gen = read_json(gen_path, "Generation config") if gen_path.exists() else {}
    eos = _token_ids(gen.get("eos_token_id", hf.get("eos_token_id")))
    bos = gen.get("bos_token_id", hf.get("bos_token_id"))
    rec_path = path / RECOMMENDED_FILE
    recommended = read_json(rec_path, "Recommended settings") if rec_path.exists() else {}
    return Checkpoint(path, config, None if bos is None else int(bos), eos, recommended)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(read_json(index, "Checkpoint index")["weight_map"].values()))
        return [path / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return [path / name]
    raise UserError(f"Checkpoint directory '{path}' has no model.safetensors, model.safetensors.index.json "
                    f"or pytorch_model.bin; copy the weights there.")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        if not file.exists():
            raise UserError(f"Checkpoint shard '{file}' named in the index does not exist; copy it there.")
        try:
            part = (load_file(str(file)) if file.suffix == ".safetensors"
                    else torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except (SafetensorError, RuntimeError, OSError, EOFError) as e:
            raise UserError(f"Checkpoint weights '{file}' are corrupt or truncated ({str(e).splitlines()[0]}); "
                            f"re-download or re-save them.") from None
        state.update(part)
    return state


def hf_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


def ours_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in state.items()}


def load_model(path: Path | str, dtype: torch.dtype = torch.float32) -> tuple[Transformer, Checkpoint]:
    """Build the model from a checkpoint directory, in `dtype`, in eval mode."""
    ckpt = read_checkpoint(path)
    state = hf_to_ours(_read_weights(ckpt.path))
    if ckpt.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    expected = {k for k in model.state_dict() if not (ckpt.config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise UserError(f"Checkpoint '{ckpt.path}' does not match its config.json: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}; check that the weights belong to this config.")
    for name, tensor in state.items():
        want = model.state_dict()[name].shape
        if tensor.shape != want:
            raise UserError(f"Checkpoint tensor {name} has shape {tuple(tensor.shape)} but config.json implies "
                            f"{tuple(want)}; check that the weights belong to this config.")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if ckpt.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Buffers computed from the config (not stored in checkpoints) are rebuilt off the meta device.
    model.inv_freq = rope_inverse_frequencies(ckpt.config)
    return model.eval(), ckpt


def atomic_write(target: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path over target: a failure never leaves a half-written file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates the file private to its owner
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(target: Path, obj: Any) -> None:
    atomic_write(target, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def save_checkpoint(model: Transformer, out_dir: Path | str, bos_token_id: Optional[int],
                    eos_token_ids: list[int], dtype: torch.dtype = torch.float32) -> None:
    """Write config.json, model.safetensors and generation_config.json (each file atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    atomic_write(out / "model.safetensors",
                 lambda p: save_file(ours_to_hf(state), str(p), metadata={"format": "pt"}))
    hf = {**config.to_hf(), "torch_dtype": str(dtype).removeprefix("torch."),
          "bos_token_id": bos_token_id, "eos_token_id": eos_token_ids[0] if len(eos_token_ids) == 1 else eos_token_ids}
    write_json(out / "config.json", hf)
    write_json(out / "generation_config.json", {"bos_token_id": bos_token_id, "eos_token_id": hf["eos_token_id"]})


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_hash(path: Path | str) -> str:
    """A short hash of a checkpoint's config and weight files, recorded in exported artifacts."""
    path = checkpoint_dir(path)
    h = hashlib.sha256()
    for file in [path / "config.json", *_weight_files(path)]:
        h.update(file.name.encode())
        h.update(file_sha256(file).encode())
    return h.hexdigest()[:16]
