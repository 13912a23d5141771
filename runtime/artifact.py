"""What the exporter and the runtime agree on about an artifact directory, and nothing else.

manifest.json (the runtime facts, checked when an artifact is opened), the layers each exported
method holds, and the ONNX graphs' cache input/output names. `export/` writes through this module
and `runtime/` reads through it; it imports only the standard library, so that an app running an
artifact never loads the exporter, the model code or PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from runtime.errors import UserError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
FORMATS = ("pte", "onnx")


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} '{path}' is not valid JSON ({e}); restore or regenerate the file.") from None


def check_exit_layer(exit_layer: int, num_layers: int) -> int:
    """The draft prefix is layers [0, E) and the verify suffix [E, L): both must be non-empty."""
    if not isinstance(exit_layer, int) or not 1 <= exit_layer <= num_layers - 1:
        raise UserError(f"exit layer {exit_layer} is out of range: this model has {num_layers} layers, "
                        f"so pass --exit-layer between 1 and {num_layers - 1}.")
    return exit_layer


def method_layers(name: str, exit_layer: int, num_layers: int) -> range:
    """The layers whose KV cache a method reads and writes."""
    if name in ("draft", "draft_greedy"):
        return range(0, exit_layer)
    return range(exit_layer, num_layers) if name == "verify" else range(0, num_layers)


def cache_input_names(layers: range) -> list[str]:
    """ONNX graph inputs of the KV caches, in this order: past_key_i, past_value_i for each layer i."""
    return [f"past_{kv}_{i}" for i in layers for kv in ("key", "value")]


def cache_output_names(layers: range) -> list[str]:
    return [f"present_{kv}_{i}" for i in layers for kv in ("key", "value")]


@dataclass(frozen=True)
class ModelShape:
    """The model facts a runtime needs to size its buffers (a subset of the exported model config)."""

    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> "ModelShape":
        return cls(int(c["num_hidden_layers"]), int(c["hidden_size"]), int(c["num_key_value_heads"]),
                   int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]), int(c["vocab_size"]))


def uses_our_onnx_ops(onnx_kv_cache: Optional[str], onnx_linear: Optional[str]) -> bool:
    """Whether .onnx graphs call our custom ops (runtime/kernels/ort_ops.cpp), whose library a session must register:
    the row attention or the linear_q4 linears."""
    return onnx_kv_cache == "row" or onnx_linear == "linear_q4"


def exact_for_lookup(target: str, pad_drafts: bool, onnx_kv_cache: str, pte_attention: str) -> bool:
    """Whether an artifact for `target` ("onnx", else a .pte) gives each row of a multi-row draft call the
    bits of a 1-row one (export.py --pad-drafts on the gqa or row graphs, --pte-attention
    row_invariant_drafts or row_sdpa): then greedy decoding with --lookup equals plain decoding."""
    if target == "onnx":
        return pad_drafts and onnx_kv_cache in ("gqa", "row")
    return pte_attention in ("row_invariant_drafts", "row_sdpa")


@dataclass
class Manifest:
    format: str  # "pte" or "onnx"
    files: dict[str, str]  # role -> file name in the directory (e.g. {"program": "model.pte"})
    file_sizes: dict[str, int]  # file name -> bytes, to catch truncated copies before loading
    methods: list[str]
    model_config: dict[str, Any]  # models.config.ModelConfig.to_dict() of the exported model
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
    draft_threshold: float = 0.0  # the recommended tau of adaptive drafting (0: always d drafts)
    extra: dict[str, Any] = field(default_factory=dict)
    manifest_version: int = MANIFEST_VERSION
    directory: Path = Path(".")  # where it was read from; not stored

    @property
    def shape(self) -> ModelShape:
        return ModelShape.from_config(self.model_config)

    @property
    def draft_vocab(self) -> int:
        """K when the drafts exit through a head over K tokens; 0 for the full head."""
        return int(self.extra.get("draft_vocab", {}).get("size", 0))

    @property
    def exact_lookup(self) -> bool:
        return exact_for_lookup(self.format, bool(self.extra.get("pad_drafts")), self.extra.get("kv_cache", "gqa"),
                                self.extra.get("attention", ""))

    def path(self, role: str) -> Path:
        return self.directory / self.files[role]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("directory")
        return d

    def summary(self) -> dict[str, Any]:
        return {"backend": f"{self.format}/{self.backend}", "artifact": str(self.directory), "quant": self.quant,
                "exit_layer": self.exit_layer, "draft_threshold": self.draft_threshold,
                "max_seq_len": self.max_seq_len, "file_sizes": self.file_sizes,
                "draft_vocab": self.draft_vocab, "exact_lookup": self.exact_lookup,
                **{k: self.extra[k] for k in ("kv_cache", "attention", "linear") if k in self.extra}}


def read_manifest(directory: Path | str) -> Manifest:
    """Read and check an artifact directory: manifest present and complete, every file there, whole."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"Artifact directory '{directory}' does not exist; run export.py first.")
    path = directory / MANIFEST
    if not path.exists():
        inside = sorted(f.parent.name for f in directory.glob(f"*/{MANIFEST}"))
        if inside:  # export.py --out OUT writes OUT/pte and OUT/onnx
            raise UserError(f"'{directory}' holds artifacts in {', '.join(inside)}; pass --artifact "
                            f"{directory / inside[0]}" + (" (or another of them)." if len(inside) > 1 else "."))
        raise UserError(f"Artifact directory '{directory}' has no {MANIFEST}; re-export it with export.py.")
    raw = read_json(path, "Artifact manifest")
    if raw.get("manifest_version") != MANIFEST_VERSION:
        raise UserError(f"'{path}' has manifest version {raw.get('manifest_version')}, this runtime reads "
                        f"{MANIFEST_VERSION}; re-export the artifact with this version of export.py.")
    fields = [f for f in dataclasses.fields(Manifest) if f.name != "directory"]
    names = {f.name for f in fields}
    optional = {f.name for f in fields if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    missing = sorted(n for n in names - optional if n not in raw)
    if missing:
        raise UserError(f"'{path}' lacks {', '.join(missing)}; re-export the artifact with export.py.")
    manifest = Manifest(**{k: v for k, v in raw.items() if k in names}, directory=directory)
    if manifest.format not in FORMATS:
        raise UserError(f"'{path}' has format {manifest.format!r}; expected one of {FORMATS}.")
    try:
        shape = manifest.shape
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise UserError(f"'{path}' has an incomplete model_config; re-export the artifact with export.py.") from None
    check_exit_layer(manifest.exit_layer, shape.num_layers)
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
