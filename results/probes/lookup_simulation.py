"""Probe: what lookup would propose along the eager model's greedy continuations (no artifact, no timing).

Greedy self-speculation emits the greedy sequence, so each step's lookup and its accepted drafts follow from
that sequence alone. Over the first N HumanEval prompts x 128 tokens, stepping as the runtime does (K = 5
drafts at a 2-token match, d = 3 exit drafts at tau 0.3 elsewhere, teacher-forced):
  - steps without a 2-token match: how many have a 1-token match, and how often its next token is right
    (the fallback's guess), against the exit's first draft;
  - 2-token matches by how far the match reaches back: the share of steps accepting at least k of 12 drafts.

    python results/probes/lookup_simulation.py [--model models/default] [--exit-layer 4] [--prompts 30]
"""
import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.checkpoint import load_model  # noqa: E402
from models.data import humaneval_prompts  # noqa: E402
from models.evaluate import greedy_continuation  # noqa: E402
from runtime.decoding import lookup_drafts  # noqa: E402
from runtime.tokenizer import TextTokenizer  # noqa: E402

NEW, K, D, TAU, RUN = 128, 5, 3, 0.3, 12


@torch.no_grad()
def exit_predictions(model, tokens: list[int], exit_layer: int) -> tuple[list[int], list[float]]:
    """The exit's argmax and its probability after every prefix of tokens, in one pass."""
    h = model.embed_tokens(torch.tensor([tokens]))
    cos, sin = model.rope(torch.arange(len(tokens)))
    for layer in model.layers[:exit_layer]:
        h = layer(h, cos, sin, None)
    conf, pred = torch.softmax(model.exit_logits(h)[0], -1).max(-1)
    return pred.tolist(), conf.tolist()


def matched_back(context: list[int], n: int = 2, most: int = 16) -> tuple[int, int]:
    """(index after the latest earlier occurrence of the last n tokens, how many tokens that match reaches)."""
    for j in range(len(context) - n - 1, -1, -1):
        if context[j:j + n] == context[-n:]:
            m = n
            while m < most and j - (m - n) - 1 >= 0 and context[j - (m - n) - 1] == context[-m - 1]:
                m += 1
            return j + n, m
    return -1, 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "models/default"))
    p.add_argument("--exit-layer", type=int, default=4)
    p.add_argument("--prompts", type=int, default=30)
    a = p.parse_args()
    model, ckpt = load_model(a.model)
    model.eval()
    tokenizer = TextTokenizer(ckpt.tokenizer_path, ckpt.bos_token_id)
    fallback, by_match = collections.Counter(), collections.defaultdict(list)
    for q in humaneval_prompts()[:a.prompts]:
        prompt = tokenizer.encode(q["prompt"])
        t = greedy_continuation(model, prompt, NEW + RUN + 1)
        pred, conf = exit_predictions(model, t, a.exit_layer)
        pos, emitted = len(prompt), 1
        while emitted < NEW:
            context = t[:pos + 1]
            start, m = matched_back(context)
            if start >= 0:
                drafts = lookup_drafts(context, RUN, 2)
                n = 0
                while n < RUN and drafts[n] == t[pos + 1 + n]:
                    n += 1
                by_match[min(m, 8)].append(n)
                n = min(n, K)  # the step as the runtime takes it
            else:
                fallback["without a 2-token match"] += 1
                guess = lookup_drafts(context, 1, 1)
                fallback["with a 1-token match"] += bool(guess)
                fallback["its next token right"] += bool(guess) and guess[0] == t[pos + 1]
                fallback["the exit's first draft right"] += pred[pos] == t[pos + 1]
                n = 0
                while n < D and conf[pos + n] >= TAU and pred[pos + n] == t[pos + 1 + n]:
                    n += 1
            emitted, pos = emitted + n + 1, pos + n + 1
    print(f"{a.model}, exit {a.exit_layer}, {a.prompts} prompts x {NEW}: steps {dict(fallback)}")
    print(f"2-token matches by matched tokens (8: 8 or more): share of steps accepting at least k of {RUN} drafts")
    for m in sorted(by_match):
        v = by_match[m]
        shares = " ".join(f"{sum(x >= k for x in v) / len(v):.2f}" for k in range(1, RUN + 1))
        print(f"  {m}: {len(v):4d} steps, k = 1..{RUN}: {shares}")


if __name__ == "__main__":
    main()
