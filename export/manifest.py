"""manifest.json: the runtime facts of an exported artifact directory, checked when it is opened."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from models.checkpoint import read_json
from models.config import ModelConfig
from models.errors import UserError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
FORMATS = ("pte", "onnx")


@dataclass
class Manifest:
    format: str  # "pte" or "onnx"
    files: dict[str, str]  # role -> file name in the directory (e.g. {"program": "model.pte"})
    file_sizes: dict[str, int]  # file name -> bytes, to catch truncated copies before loading
    methods: list[str]
    model_config: dict[str, Any]
    exit_layer: int
    num_speculations: int
    max_seq_len: int
    max_tokens_per_call: int
    bos_token_id: Optional[int]
    eos_token_ids: list[int]
    quant: str  # the scheme applied (e.g. "8da4w", "matmulnbits-int4", "none")
    group_size: int
    source: dict[str, str]  # {"path": ..., "sha256": ...} of the checkpoint exported
    versions: dict[str, str]
    backend: str  # "xnnpack", "portable" or "onnxruntime"
    extra: dict[str, Any] = field(default_factory=dict)
    manifest_version: int = MANIFEST_VERSION
    directory: Path = Path(".")  # where it was read from; not stored

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model_config)

    @property
    def draft_vocab(self) -> int:
        """K when the drafts exit through a head over K tokens; 0 for the full head."""
        return int(self.extra.get("draft_vocab", {}).get("size", 0))

    def path(self, role: str) -> Path:
        return self.directory / self.files[role]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("directory")
        return d

    def summary(self) -> dict[str, Any]:
        return {"backend": f"{self.format}/{self.backend}", "artifact": str(self.directory), "quant": self.quant,
                "exit_layer": self.exit_layer, "max_seq_len": self.max_seq_len, "file_sizes": self.file_sizes,
                "draft_vocab": self.draft_vocab, **({"kv_cache": self.extra["kv_cache"]} if "kv_cache" in self.extra else {})}


def read_manifest(directory: Path | str) -> Manifest:
    """Read and check an artifact directory: manifest present and complete, every file there, whole."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"Artifact directory '{directory}' does not exist; run export.py first.")
    path = directory / MANIFEST
    if not path.exists():
        raise UserError(f"Artifact directory '{directory}' has no {MANIFEST}; re-export it with export.py.")
    raw = read_json(path, "Artifact manifest")
    if raw.get("manifest_version") != MANIFEST_VERSION:
        raise UserError(f"'{path}' has manifest version {raw.get('manifest_version')}, this runtime reads "
                        f"{MANIFEST_VERSION}; re-export the artifact with this version of export.py.")
    names = {f.name for f in dataclasses.fields(Manifest)} - {"directory"}
    missing = sorted(n for n in names if n not in raw and n != "extra")
    if missing:
        raise UserError(f"'{path}' lacks {', '.join(missing)}; re-export the artifact with export.py.")
    manifest = Manifest(**{k: v for k, v in raw.items() if k in names}, directory=directory)
    if manifest.format not in FORMATS:
        raise UserError(f"'{path}' has format {manifest.format!r}; expected one of {FORMATS}.")
    manifest.config.check_exit_layer(manifest.exit_layer)
    for name, size in manifest.file_sizes.items():
        file = directory / name
        if not file.exists():
            raise UserError(f"Artifact file '{file}' is missing; re-export the artifact or copy the whole directory.")
        if file.stat().st_size != size:
            raise UserError(f"Artifact file '{file}' has {file.stat().st_size} bytes but the manifest says {size}: "
                            f"it is truncated or corrupt; re-export or re-copy it.")
    return manifest


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")


def check_fact(manifest: Manifest, name: str, found: Any, expected: Any) -> None:
    """The artifact's own record of a fact must equal the manifest's."""
    if found != expected:
        raise UserError(f"artifact '{manifest.directory}' does not match its manifest: {name} is {found} in the "
                        f"model file but {expected} in {MANIFEST}; re-export the artifact instead of mixing files.")
