"""Where does each exit learn to copy? The analysis behind the default model's exit-loss cliff.

    python -m models.induction [--model DIR] [--windows 16] [--out FILE.json]

Code repeats itself: after `self.` comes the attribute seen after `self.` before. A token is
*copyable* when the current token occurred earlier in the window and the token that followed it
then is the next token now (what an induction head predicts). For every exit layer this prints
the held-out loss on copyable tokens and on the rest, and for every layer the strongest head's
attention to the copy source (induction score) and to the previous token (previous-token score).
An induction circuit needs a previous-token head in one layer and an induction head in a later
one; the exits before the induction head cannot copy, which is the loss cliff between them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import DEFAULT_MODEL_DIR, write_json
from models.evaluate import load_with_heldout
from models.model import apply_rope
from runtime.errors import UserError


def copy_sources(tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """source[t]: the position after the last earlier occurrence of tokens[t] (-1: none);
    copyable[t]: that position holds tokens[t + 1]. tokens has T + 1 entries; both are [T]."""
    t_len = len(tokens) - 1
    source, copyable, last_seen = np.full(t_len, -1), np.zeros(t_len, bool), {}
    for t in range(t_len):
        j = last_seen.get(tokens[t])
        if j is not None:
            source[t], copyable[t] = j + 1, tokens[j + 1] == tokens[t + 1]
        last_seen[tokens[t]] = t
    return source, copyable


def attention_weights(attn, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """One layer's causal attention probabilities [H, T, T] for input x [1, T, dim] (normed)."""
    _, t, _ = x.shape
    q = attn.q_proj(x).view(1, t, attn.n_heads, attn.head_dim).transpose(1, 2)  # [1, H, T, D]
    k = attn.k_proj(x).view(1, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # [1, H_kv, T, D]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)  # [1, H, T, D]
    scores = (q @ k.transpose(-1, -2))[0] / attn.head_dim ** 0.5  # [H, T, T]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


@torch.no_grad()
def induction_report(model, heldout_ids: np.ndarray, windows: int = 16, seq_len: int = 512) -> dict:
    n_layers = model.config.num_hidden_layers
    loss_copy, loss_rest = [[] for _ in range(n_layers)], [[] for _ in range(n_layers)]
    induction = np.zeros((n_layers, model.config.num_attention_heads))
    previous = np.zeros_like(induction)
    copyable_share = []
    for start in np.linspace(0, len(heldout_ids) - seq_len - 2, windows).astype(int):
        window = heldout_ids[start:start + seq_len + 1].astype(np.int64)
        source, copyable = copy_sources(window.tolist())
        copyable_share.append(copyable.mean())
        targets = torch.from_numpy(window[1:])
        has_source = np.nonzero(source >= 0)[0]
        h = model.embed_tokens(torch.from_numpy(window[None, :-1]))
        cos, sin = model.rope(torch.arange(seq_len))
        for l, layer in enumerate(model.layers):
            probs = attention_weights(layer.self_attn, layer.input_layernorm(h), cos, sin).numpy()
            induction[l] += probs[:, has_source, source[has_source]].mean(-1)
            previous[l] += probs[:, np.arange(1, seq_len), np.arange(seq_len - 1)].mean(-1)
            h = layer(h, cos, sin, None)
            token_loss = F.cross_entropy(model.exit_logits(h)[0], targets, reduction="none").numpy()
            loss_copy[l].append(token_loss[copyable])
            loss_rest[l].append(token_loss[~copyable])
    induction, previous = induction / windows, previous / windows
    rows = [{"layer": l + 1,
             "loss_copyable": float(np.concatenate(loss_copy[l]).mean()),
             "loss_other": float(np.concatenate(loss_rest[l]).mean()),
             "induction_score": float(induction[l].max()), "induction_head": int(induction[l].argmax()),
             "previous_token_score": float(previous[l].max()), "previous_token_head": int(previous[l].argmax())}
            for l in range(n_layers)]
    return {"windows": windows, "seq_len": seq_len, "copyable_share": float(np.mean(copyable_share)), "rows": rows}


def markdown(report: dict) -> str:
    lines = [f"copyable tokens: {report['copyable_share']:.1%} of {report['windows']} x {report['seq_len']} held-out tokens",
             "", "| exit / layer | loss, copyable tokens | loss, other tokens | induction score (head) | previous-token score (head) |",
             "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['layer']} | {r['loss_copyable']:.3f} | {r['loss_other']:.3f} | "
                     f"{r['induction_score']:.3f} ({r['induction_head']}) | "
                     f"{r['previous_token_score']:.3f} ({r['previous_token_head']}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--corpus", type=Path, help="the training corpus folder (default: this Python's standard library)")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--out", type=Path, help="also write the report as JSON here")
    a = p.parse_args(argv)
    try:
        model, ckpt, _, ids = load_with_heldout(a.model, a.corpus)
        report = induction_report(model.eval(), ids, a.windows, min(512, ckpt.config.max_position_embeddings))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(report))
    if a.out:
        write_json(a.out, {"model": str(a.model), **report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
