"""How good is each exit layer? The numbers that decide whether self-speculation pays.

    python -m models.evaluate [--model DIR] [--compare DIR ...] [--limit N] [--out DIR]

For every exit layer E of each model: held-out loss and top-1 accuracy of the exited logits,
top-1 agreement with the last layer, and greedy self-speculative acceptance rate and mean tokens
per step at d in {2, 4, 6} on HumanEval prompts (128 new tokens each, EOS ignored). Greedy
acceptance is computed exactly from one pass over each greedy continuation (see
simulate_greedy_speculation; tests check it against real self-speculative runs). Writes
eval.json, eval.md and eval.png; with --compare, one row block per model (e.g. the ablation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import DEFAULT_MODEL_DIR, load_model, write_json
from models.data import corpus_files, encode_files, humaneval_prompts, split_files
from runtime.errors import UserError
from runtime.tokenizer import TextTokenizer

DRAFT_LENGTHS = (2, 4, 6)


@torch.no_grad()
def exit_quality(model, heldout_ids: np.ndarray, seq_len: int, windows: int) -> dict[int, dict]:
    """Per exit layer (1-based E = layers run): held-out loss, top-1 accuracy, agreement with the last layer."""
    n = model.config.num_hidden_layers
    sums = {e: {"loss": 0.0, "accuracy": 0.0, "agreement": 0.0} for e in range(1, n + 1)}
    starts = np.linspace(0, len(heldout_ids) - seq_len - 2, windows).astype(int)
    for s in starts:
        window = torch.from_numpy(heldout_ids[s:s + seq_len + 1].astype(np.int64))[None]
        tokens, targets = window[:, :-1], window[:, 1:]
        h = model.embed_tokens(tokens)
        cos, sin = model.rope(torch.arange(seq_len))
        predictions = []
        for e, layer in enumerate(model.layers, start=1):
            h = layer(h, cos, sin, None)
            logits = model.exit_logits(h)[0]
            predictions.append(logits.argmax(-1))
            sums[e]["loss"] += float(torch.nn.functional.cross_entropy(logits, targets[0]))
            sums[e]["accuracy"] += float((predictions[-1] == targets[0]).float().mean())
        for e in range(1, n + 1):
            sums[e]["agreement"] += float((predictions[e - 1] == predictions[-1]).float().mean())
    return {e: {k: v / len(starts) for k, v in m.items()} for e, m in sums.items()}


@torch.no_grad()
def greedy_continuation(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Plain greedy decoding with the static KV cache (EOS ignored, so every prompt gives new_tokens)."""
    model.setup_caches(len(prompt) + new_tokens + 1)
    logits = model(torch.tensor([prompt]), torch.tensor([0]))[0, -1]
    tokens = list(prompt)
    for _ in range(new_tokens):
        tokens.append(int(logits.argmax()))
        logits = model(torch.tensor([[tokens[-1]]]), torch.tensor([len(tokens) - 1]))[0, -1]
    return tokens


@torch.no_grad()
def exit_argmax(model, tokens: list[int]) -> torch.Tensor:
    """[L, T]: the greedy next-token prediction of every exit layer at every position, in one pass."""
    h = model.embed_tokens(torch.tensor([tokens]))
    cos, sin = model.rope(torch.arange(len(tokens)))
    rows = []
    for layer in model.layers:
        h = layer(h, cos, sin, None)
        rows.append(model.exit_logits(h)[0].argmax(-1))
    return torch.stack(rows)


def simulate_greedy_speculation(exit_pred: torch.Tensor, tokens: list[int], prompt_len: int, d: int,
                                new_tokens: int) -> tuple[int, int, int, int]:
    """(drafted, accepted, steps, emitted) of greedy self-speculation, computed from one pass.

    Greedy self-speculation emits the greedy sequence, and a draft is accepted exactly when the exit
    layer's argmax after the (already accepted) prefix equals the next greedy token. So the step
    statistics follow from `exit_pred` [T] of the exit layer along the greedy sequence `tokens`,
    which must extend at least d + 1 tokens past prompt_len + new_tokens.
    """
    drafted = accepted = steps = 0
    p, emitted = prompt_len, 1  # tokens[p] is the last emitted token; the first comes from the prompt pass
    while emitted < new_tokens:
        n = 0
        while n < d and int(exit_pred[p + n]) == tokens[p + n + 1]:
            n += 1
        drafted, accepted, steps = drafted + d, accepted + n, steps + 1
        emitted += n + 1
        p += n + 1
    return drafted, accepted, steps, emitted


def acceptance_table(model, prompts: list[list[int]], exit_layers, max_new_tokens: int) -> dict:
    """{(E, d): {acceptance_rate, mean_tokens_per_step}} over all prompts."""
    totals = {(e, d): [0, 0, 0, 0] for e in exit_layers for d in DRAFT_LENGTHS}
    for prompt in tqdm(prompts, desc="greedy continuations", file=sys.stderr):
        tokens = greedy_continuation(model, prompt, max_new_tokens + max(DRAFT_LENGTHS) + 1)
        preds = exit_argmax(model, tokens)
        for e, d in totals:
            stats = simulate_greedy_speculation(preds[e - 1], tokens, len(prompt), d, max_new_tokens)
            totals[e, d] = [a + b for a, b in zip(totals[e, d], stats)]
    return {key: {"acceptance_rate": t[1] / t[0], "mean_tokens_per_step": t[3] / t[2]} for key, t in totals.items()}


def load_with_heldout(model_dir: Path, corpus: Path | None = None):
    """(model, checkpoint, tokenizer, held-out token ids of the corpus split the model never trained on)."""
    model, ckpt = load_model(model_dir)
    tokenizer = TextTokenizer(ckpt.tokenizer_path, ckpt.bos_token_id)
    root, files = corpus_files(corpus)
    _, heldout = split_files(root, files)
    heldout_ids = encode_files(tokenizer.tokenizer, heldout, ckpt.bos_token_id or 0, ckpt.eos_token_ids[0])
    return model, ckpt, tokenizer, heldout_ids


def evaluate(model_dir: Path, limit: int, max_new_tokens: int, windows: int, exit_layers=None,
             corpus: Path | None = None) -> dict:
    model, ckpt, tokenizer, heldout_ids = load_with_heldout(model_dir, corpus)
    seq_len = min(512, ckpt.config.max_position_embeddings)
    quality = exit_quality(model, heldout_ids, seq_len, windows)
    prompts = [tokenizer.encode(p["prompt"]) for p in humaneval_prompts()[:limit]]
    n = ckpt.config.num_hidden_layers
    exits = exit_layers or range(1, n)
    table = acceptance_table(model, prompts, exits, max_new_tokens)
    rows = []
    for e in range(1, n + 1):
        row = {"exit_layer": e, **quality[e]}
        for d in DRAFT_LENGTHS:
            if (e, d) in table:
                row[f"d{d}"] = table[e, d]
        rows.append(row)
    return {"model": str(model_dir), "prompts": len(prompts), "rows": rows}


def markdown(results: list[dict]) -> str:
    head = ("| model | E | held-out loss | top-1 acc | agreement w/ last | " +
            " | ".join(f"acc. rate d={d} | tok/step d={d}" for d in DRAFT_LENGTHS) + " |")
    lines = [head, "|" + "---|" * (5 + 2 * len(DRAFT_LENGTHS))]
    for r in results:
        for row in r["rows"]:
            cells = [Path(r["model"]).name, str(row["exit_layer"]), f"{row['loss']:.3f}", f"{row['accuracy']:.3f}",
                     f"{row['agreement']:.3f}"]
            for d in DRAFT_LENGTHS:
                a = row.get(f"d{d}")
                cells += [f"{a['acceptance_rate']:.2f}", f"{a['mean_tokens_per_step']:.2f}"] if a else ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        name = Path(r["model"]).name
        es = [row["exit_layer"] for row in r["rows"]]
        axes[0].plot(es, [row["agreement"] for row in r["rows"]], marker="o", label=f"{name}: agreement")
        axes[0].plot(es, [row["accuracy"] for row in r["rows"]], marker="x", ls="--", label=f"{name}: top-1 acc")
        with_d = [row for row in r["rows"] if "d4" in row]
        axes[1].plot([row["exit_layer"] for row in with_d], [row["d4"]["acceptance_rate"] for row in with_d],
                     marker="o", label=f"{name}: d=4")
    axes[0].set(xlabel="exit layer E", ylabel="fraction", title="exited logits on held-out code")
    axes[1].set(xlabel="exit layer E", ylabel="acceptance rate", title="greedy self-speculation, HumanEval")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--compare", type=Path, nargs="*", default=[], help="more checkpoints, e.g. the ablation")
    p.add_argument("--limit", type=int, default=164, help="HumanEval prompts to generate from (default: all 164)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--windows", type=int, default=32, help="held-out windows of up to 512 tokens")
    p.add_argument("--exit-layers", type=int, nargs="*", help="exit layers to generate with (default: all)")
    p.add_argument("--corpus", type=Path, help="the training corpus folder, for its held-out split (default: "
                   "this Python's standard library)")
    p.add_argument("--out", type=Path, default=Path("runs/eval"))
    a = p.parse_args(argv)
    try:
        t = time.perf_counter()
        results = [evaluate(m, a.limit, a.max_new_tokens, a.windows, a.exit_layers, a.corpus)
                   for m in [a.model, *a.compare]]
        a.out.mkdir(parents=True, exist_ok=True)
        write_json(a.out / "eval.json", {"settings": {k: str(v) for k, v in vars(a).items()}, "results": results})
        (a.out / "eval.md").write_text(markdown(results))
        plot(results, a.out / "eval.png")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(results))
    print(f"wrote {a.out}/eval.json, eval.md, eval.png in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
