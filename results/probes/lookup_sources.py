"""Probe (simulation): tokens per step of other draft sources for the steps lookup leaves to the exit.

Takes an artifact's plain greedy output on the first N HumanEval prompts (the tokens an exact decoder
emits), then replays the steps: each step drafts from the context as runtime --lookup does (the last n
tokens' latest earlier occurrence, K tokens), optionally falling back to shorter n-grams or to a
trigram datastore built from the training corpus (the stdlib, as the shipped model was trained on),
and emits the accepted drafts plus one token. Reports steps and tokens per step by source, and a speedup
estimate from a per-step cost model: base + per_row x drafts (in units of a plain step; measured costs
go in as --base and --per-row). No model runs after the first pass: this ranks draft sources, it does
not time them.

    python results/probes/lookup_sources.py ARTIFACT --tokenizer TOKENIZER.json [--prompts 30]
        [--base 1.1 --per-row 0.1] [--json F.json]
"""
import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.data import corpus_files, encode_files, prompt_set, split_files  # noqa: E402
from runtime.bench import encode_prompts  # noqa: E402
from runtime.decoding import GenerationConfig, generate, lookup_drafts  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402


class TrigramChains:
    """(a, b) -> the corpus's most frequent next token, its share and count; drafts follow the chain."""

    def __init__(self, stream: np.ndarray):
        vocab = int(stream.max()) + 1
        keys = stream[:-2] * vocab + stream[1:-1]
        pairs, counts = np.unique(keys * vocab + stream[2:], return_counts=True)
        self.vocab, totals, best = vocab, collections.Counter(), {}
        for pair, count in zip(pairs.tolist(), counts.tolist()):
            key, nxt = divmod(pair, vocab)
            totals[key] += count
            if key not in best or count > best[key][1]:
                best[key] = (nxt, count)
        self.table = {key: (nxt, count / totals[key], totals[key]) for key, (nxt, count) in best.items()}

    def drafts(self, context, k, min_share, min_count=2):
        a, b, out = context[-2], context[-1], []
        for _ in range(k):
            entry = self.table.get(a * self.vocab + b)
            if entry is None or entry[1] < min_share or entry[2] < min_count:
                break
            out.append(entry[0])
            a, b = b, entry[0]
        return out


def replay(prompts, outputs, k, ngrams, chains=None, min_share=1.0, base=1.0, per_row=0.0):
    stats = collections.defaultdict(lambda: [0, 0])  # source -> [steps, tokens]
    cost = tokens = 0.0
    for ids, out in zip(prompts, outputs):
        seq, i = list(ids) + list(out), len(ids)
        while i < len(seq):
            context, drafts, source = seq[:i], [], "none"
            for n in ngrams:
                drafts = lookup_drafts(context, k, n)
                if drafts:
                    source = f"context {n}-gram"
                    break
            if not drafts and chains is not None:
                drafts = chains.drafts(context, k, min_share)
                source = "datastore" if drafts else "none"
            accepted = 0
            while accepted < len(drafts) and i + accepted < len(seq) and drafts[accepted] == seq[i + accepted]:
                accepted += 1
            got = min(accepted + 1, len(seq) - i)
            stats[source][0] += 1
            stats[source][1] += got
            cost += base + per_row * len(drafts) if drafts else 1.0
            tokens += got
            i += got
    return {"by_source": {s: {"steps": v[0], "tokens_per_step": v[1] / v[0]} for s, v in sorted(stats.items())},
            "estimated_speedup": tokens / cost}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--prompts", type=int, default=30)
    p.add_argument("--base", type=float, default=1.1, help="a drafted step's cost without drafts, in plain steps")
    p.add_argument("--per-row", type=float, default=0.1, help="the cost of each draft row, in plain steps")
    p.add_argument("--json")
    a = p.parse_args()
    from tokenizers import Tokenizer

    opened = open_artifact(a.artifact, threads=1, preload=("forward",))
    prompts, _ = encode_prompts(opened, [q["prompt"] for q in prompt_set("humaneval")[:a.prompts]], 128)
    cfg = GenerationConfig(max_new_tokens=128, self_speculative=False, full_model_baseline=True,
                           eos_token_ids=tuple(opened.eos_token_ids))
    outputs = [generate(opened.backend, ids, cfg).tokens for ids in prompts]
    root, files = corpus_files()
    train, _ = split_files(root, files)
    chains = TrigramChains(encode_files(Tokenizer.from_file(a.tokenizer), train, 0, 0).astype(np.int64))
    cost = dict(base=a.base, per_row=a.per_row)
    runs = {}
    for k in (3, 5, 8):
        for ngrams in ((2,), (3, 2), (4, 3, 2), (2, 1), (3, 2, 1)):
            runs[f"K {k}, n-grams {ngrams}"] = replay(prompts, outputs, k, ngrams, **cost)
    for share in (0.3, 0.5, 0.7, 0.9):
        runs[f"K 5, 2-gram, then datastore at share >= {share}"] = replay(prompts, outputs, 5, (2,), chains, share, **cost)
    for name, r in runs.items():
        print(f"{name}: {r['estimated_speedup']:.3f}x  " + ", ".join(
            f"{s} {v['steps']} steps x {v['tokens_per_step']:.2f}" for s, v in r["by_source"].items()), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"artifact": a.artifact, "prompts": a.prompts, "cost_model": cost,
                                            "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
