"""Helpers shared by the .pte and .onnx tests: one call sequence, compared against the eager model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from models.checkpoint import load_model
from runtime.eager import EagerBackend

PROMPT = [0, 17, 42, 99, 7, 250, 3, 64, 11]


def call_sequence(backend) -> list[torch.Tensor]:
    """Prompt, three drafts and a verify, then a rollback: positions rewritten with other tokens."""
    out = [backend.draft(PROMPT, 0).clone(), backend.verify(0, len(PROMPT)).clone()]
    pos = len(PROMPT)
    for k, tok in enumerate((5, 6, 7)):
        out.append(backend.draft([tok], pos + k).clone())
    out.append(backend.verify(pos, 3).clone())
    # rollback: only the first draft was kept; position pos+1 gets another token
    out.append(backend.draft([9, 10], pos + 1).clone())
    out.append(backend.verify(pos, 3))
    return [o.clone() for o in out]


def eager_reference(checkpoint, exit_layer: int, max_seq_len: int) -> list[torch.Tensor]:
    model, _ = load_model(checkpoint)
    return call_sequence(EagerBackend(model, exit_layer, max_seq_len))


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def copy_artifact(directory: Path, tmp_path: Path, **manifest_changes) -> Path:
    """A copy of an artifact directory to damage in a test, with some manifest fields changed."""
    copy = Path(shutil.copytree(directory, tmp_path / "art"))
    if manifest_changes:
        manifest = json.loads((copy / "manifest.json").read_text())
        (copy / "manifest.json").write_text(json.dumps({**manifest, **manifest_changes}))
    return copy
