"""Probe: can a trained linear head on an untrained model's early layer predict its greedy token?

SmolLM2-135M has no LayerSkip training: its exit at layer 8 of 30 through the shared head (the logit lens)
drafts nothing worth verifying. This fits a linear head (K outputs: the K tokens the full model picks most
often; initialised from those rows of the LM head) on the normed layer-E residual of stdlib code, to the
full model's greedy token, and reports on held-out files: how often its top-1 is the model's token, and,
for confidence thresholds tau, the share of positions it would draft and how often those drafts are right.
A draft at E = 8 costs ~0.3 of a plain step on this CPU, so drafts must be right well over half the time.

    python results/probes/linear_exit_head.py CHECKPOINT --exits 4,8,12 [--train-tokens 12000] [--json F]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.checkpoint import load_model  # noqa: E402
from models.data import corpus_files, read_text, split_files  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402


def chunks(tok, files, n_tokens, rng, seq=256):
    out, total = [], 0
    for f in rng.permutation(len(files)):
        ids = tok.encode(read_text(files[f])).ids
        for s in range(0, len(ids) - seq, seq * 4):
            out.append(ids[s:s + seq])
            total += seq
            if total >= n_tokens:
                return out
    return out


def features(model, seqs, exits):
    """{E: normed residual entering layer E [N, dim]}, the full model's greedy tokens [N]."""
    hidden, targets = {e: [] for e in exits}, []
    with torch.no_grad():
        for s in seqs:
            h = model.embed_tokens(torch.tensor([s]))
            positions = torch.arange(len(s))
            cos, sin = model.rope(positions)
            for i, layer in enumerate(model.layers):
                if i in hidden:
                    hidden[i].append(model.norm(h)[0])
                h = layer(h, cos, sin, positions, None)
            targets.append(model.lm_head(model.norm(h))[0].argmax(-1))
    return {e: torch.cat(v) for e, v in hidden.items()}, torch.cat(targets)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--exits", default="4,8,12")
    p.add_argument("--train-tokens", type=int, default=12000)
    p.add_argument("--test-tokens", type=int, default=4000)
    p.add_argument("--json")
    a = p.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model, _ = load_model(a.checkpoint)
    model.eval()
    tok = Tokenizer.from_file(str(Path(a.checkpoint) / "tokenizer.json"))
    root, files = corpus_files()
    train, held = split_files(root, files)
    exits = [int(e) for e in a.exits.split(",")]
    t = time.time()
    h_train, y_train = features(model, chunks(tok, train, a.train_tokens, rng), exits)
    h_test, y_test = features(model, chunks(tok, held, a.test_tokens, rng), exits)
    print(f"features of {len(y_train)} + {len(y_test)} positions in {time.time() - t:.0f} s", flush=True)
    w = model.lm_head.weight.detach()
    results = []
    for k in (256, 2048):
        top = torch.bincount(y_train, minlength=w.shape[0]).argsort(descending=True)[:k]
        index = torch.full((w.shape[0],), -1, dtype=torch.long)
        index[top] = torch.arange(k)
        for e in exits:
            lens = (top[(h_test[e] @ w[top].T).argmax(-1)] == y_test).float().mean().item()
            head = torch.nn.Linear(w.shape[1], k)
            head.weight.data, head.bias.data = w[top].clone(), torch.zeros(k)
            keep = index[y_train] >= 0
            x, target = h_train[e][keep], index[y_train][keep]
            opt = torch.optim.Adam(head.parameters(), lr=1e-3)
            for _ in range(30):
                perm = torch.randperm(len(x))
                for b in range(0, len(x), 1024):
                    i = perm[b:b + 1024]
                    loss = torch.nn.functional.cross_entropy(head(x[i]), target[i])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                conf, pick = head(h_test[e]).softmax(-1).max(-1)
                right = top[pick] == y_test
            row = {"draft_vocab": k, "exit_layer": e, "covered": torch.isin(y_test, top).float().mean().item(),
                   "logit_lens_top1": lens, "trained_head_top1": right.float().mean().item(),
                   "by_tau": {tau: {"drafted": (conf >= tau).float().mean().item(),
                                    "right": right[conf >= tau].float().mean().item()} for tau in (0.5, 0.7, 0.9)}}
            print(row, flush=True)
            results.append(row)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
