"""The draft vocabulary: the K tokens a draft head may propose (export.py --draft-vocab K).

Tokens are ranked by the checkpoint's token_counts.json (how often each id occurs in its training
data) when it has one, else by id: byte-level BPE vocabularies list tokens in merge order, which
roughly follows frequency. The shipped model carries counts over its training split:

    python -m models.draft_vocab --model models/default      # writes models/default/token_counts.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from runtime.errors import UserError

COUNTS_FILE = "token_counts.json"


def check_draft_vocab(k: int, vocab_size: int) -> None:
    if not 0 <= k <= vocab_size:
        raise UserError(f"--draft-vocab {k} is out of range; pass 0 (the full head) or a size up to the "
                        f"vocabulary's {vocab_size} tokens.")


def draft_vocab_ids(model_dir: Path | str, vocab_size: int, k: int) -> tuple[torch.Tensor, str]:
    """(the K most frequent token ids, sorted [K] long; where the ranking came from)."""
    check_draft_vocab(k, vocab_size)
    path = Path(model_dir) / COUNTS_FILE
    if not path.exists():
        return torch.arange(k), "token id (no token_counts.json)"
    try:
        counts = np.asarray(json.loads(path.read_text())["counts"], dtype=np.int64)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"'{path}' is not a token-count file ({e}); delete it or regenerate it with "
                        f"python -m models.draft_vocab.") from None
    if counts.shape != (vocab_size,):
        raise UserError(f"'{path}' counts {counts.shape[0] if counts.ndim == 1 else '?'} tokens but the vocabulary "
                        f"has {vocab_size}; regenerate it with python -m models.draft_vocab.")
    ranked = np.argsort(-counts, kind="stable")[:k]  # ties keep the lower id first
    return torch.from_numpy(np.sort(ranked)), COUNTS_FILE


def coverage(ids: torch.Tensor, tokens: np.ndarray) -> float:
    """The share of `tokens` (ids) that lie in the draft vocabulary."""
    return float(np.isin(tokens, ids.numpy()).mean())


def count_training_tokens(model_dir: Path, corpus: Path | None = None) -> np.ndarray:
    from models.checkpoint import read_checkpoint
    from models.data import corpus_files, encode_files, split_files
    from tokenizers import Tokenizer

    ckpt = read_checkpoint(model_dir)
    tokenizer = Tokenizer.from_file(str(ckpt.tokenizer_path))
    root, files = corpus_files(corpus)
    train, _ = split_files(root, files)
    stream = encode_files(tokenizer, train, ckpt.bos_token_id or 0, ckpt.eos_token_ids[0])
    return np.bincount(stream, minlength=ckpt.config.vocab_size)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Count token ids over a checkpoint's training split (for --draft-vocab).")
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (gets token_counts.json)")
    p.add_argument("--corpus", type=Path, default=None, help="folder of .py files (default: the stdlib corpus)")
    args = p.parse_args(argv)
    try:
        counts = count_training_tokens(args.model, args.corpus)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.model / COUNTS_FILE
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"source": "training split of the corpus", "counts": counts.tolist()}) + "\n")
    tmp.replace(out)
    print(f"wrote {out}: {int(counts.sum())} tokens counted, {int((counts > 0).sum())} of {len(counts)} ids seen")
    return 0


if __name__ == "__main__":
    sys.exit(main())
