"""Helpers shared by the .pte and .onnx tests: one call sequence, compared against the eager model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from models.checkpoint import load_model
from runtime.eager import EagerBackend

PROMPT = [0, 17, 42, 99, 7, 250, 3, 64, 11]


def call_sequence(backend) -> list[np.ndarray]:
    """Prompt, three drafts and a verify, then a rollback: positions rewritten with other tokens.
    Each result is copied at once: a backend may reuse its output buffer on the next call."""
    out = [np.array(backend.draft(PROMPT, 0)), np.array(backend.verify(0, len(PROMPT)))]
    pos = len(PROMPT)
    for k, tok in enumerate((5, 6, 7)):
        out.append(np.array(backend.draft([tok], pos + k)))
    out.append(np.array(backend.verify(pos, 3)))
    # rollback: only the first draft was kept; position pos+1 gets another token
    out.append(np.array(backend.draft([9, 10], pos + 1)))
    out.append(np.array(backend.verify(pos, 3)))
    return out


def verify_together_and_alone(backend, verify=None) -> tuple[np.ndarray, np.ndarray]:
    """Logits of rows pos .. pos+4 after a prompt and five drafts: one 5-token verify, and five 1-token ones.
    `verify(pos, count)` makes the verify calls (default: the backend's own)."""
    verify = verify or backend.verify
    backend.draft(PROMPT, 0)
    backend.verify(0, len(PROMPT))
    pos, tokens = len(PROMPT), [PROMPT[-1], 5, 6, 7, 8]
    for k, token in enumerate(tokens):
        backend.draft([token], pos + k)
    together = np.array(verify(pos, len(tokens)))
    alone = np.stack([np.array(verify(pos + k, 1))[0] for k in range(len(tokens))])
    return together, alone


def eager_reference(checkpoint, exit_layer: int, max_seq_len: int) -> list[np.ndarray]:
    model, _ = load_model(checkpoint)
    return call_sequence(EagerBackend(model, exit_layer, max_seq_len))


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def copy_artifact(directory: Path, tmp_path: Path, **manifest_changes) -> Path:
    """A copy of an artifact directory to damage in a test, with some manifest fields changed."""
    copy = Path(shutil.copytree(directory, tmp_path / "art"))
    if manifest_changes:
        manifest = json.loads((copy / "manifest.json").read_text())
        (copy / "manifest.json").write_text(json.dumps({**manifest, **manifest_changes}))
    return copy


def five_rows_each_way(backend, *ways) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exit-cache rows and logits of five tokens after the prompt, computed each way: way(tokens, pos) -> logits."""
    out = []
    for way in ways:
        backend.draft(PROMPT, 0)
        backend.verify(0, len(PROMPT))
        pos, tokens = len(PROMPT), [PROMPT[-1], 5, 6, 7, 8]
        logits = np.array(way(tokens, pos))
        exit_cache = backend.exit_cache.numpy() if hasattr(backend.exit_cache, "numpy") else backend.exit_cache
        out.append((np.array(exit_cache[pos:pos + 5]), logits))
    return out


def drafts_together_and_alone(backend) -> list[tuple[np.ndarray, np.ndarray]]:
    """Drafted in one call, and one by one; then verified in one call."""
    def alone(tokens, pos):
        for k, token in enumerate(tokens):
            backend.draft([token], pos + k)
        return backend.verify(pos, len(tokens))

    def together(tokens, pos):
        backend.draft(tokens, pos)
        return backend.verify(pos, len(tokens))

    return five_rows_each_way(backend, together, alone)


def draft_verify_and_one_by_one(backend) -> list[tuple[np.ndarray, np.ndarray]]:
    """Through one draft_verify call, and through 1-token draft and verify calls (plain decoding)."""
    def one_by_one(tokens, pos):
        logits = []
        for k, token in enumerate(tokens):
            backend.draft([token], pos + k)
            logits.append(np.array(backend.verify(pos + k, 1)[0]))
        return np.stack(logits)

    return five_rows_each_way(backend, backend.draft_verify, one_by_one)


def check_looked_up_drafts_keep_the_tokens(backend, monkeypatch, k: int = 4) -> None:
    """Make --lookup propose plain decoding's next k tokens at every step, the third of them wrong at every
    other step (so both full and partial acceptances occur), and check that every step then drafts by
    lookup in one call (draft_verify, where the artifact has it) or one prefix call, and decodes plain
    decoding's tokens."""
    from runtime import decoding
    from runtime.decoding import GenerationConfig, generate

    plain = generate(backend, PROMPT, GenerationConfig(max_new_tokens=60, self_speculative=False)).tokens
    steps = []

    def propose(context, most, n, *run):
        done = len(context) - len(PROMPT)  # tokens emitted so far
        drafts = list(plain[done:done + min(k, most)])
        steps.append(None)
        if len(steps) % 2 and len(drafts) > 2:
            drafts[2] = (drafts[2] + 1) % 256
        return drafts

    monkeypatch.setattr(decoding, "lookup_drafts", propose)
    result = generate(backend, PROMPT, GenerationConfig(max_new_tokens=60, num_speculations=3, lookup=k))
    s = result.stats
    assert result.tokens == plain
    merged = getattr(backend, "has_draft_verify", False)
    assert s.lookup_steps == s.steps and s.draft_calls == (0 if merged else s.steps) + 1  # + 1: the prompt
    assert s.verify_calls == s.steps + 1
    assert 0 < s.accepted < s.drafted


def generate_cli_lookup(artifact: Path, capsys, *flags: str) -> int:
    """The K of --lookup that `python -m runtime.generate --artifact ARTIFACT [flags]` decodes with."""
    from runtime import generate as cli

    assert cli.main(["--artifact", str(artifact), "--prompt", "def add(a, b):", "--max-new-tokens", "8", "--json",
                     *flags]) == 0
    return json.loads(capsys.readouterr().out)["settings"]["lookup"]
