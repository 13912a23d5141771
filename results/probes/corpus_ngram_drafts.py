"""Probe: would drafts from the training corpus's n-gram counts pay where the context lookup finds no match?

Counts 1-, 2- and 3-token contexts over the model's training split (its tokenizer, the corpus it trained on), decodes
the benchmark's 30 HumanEval prompts x 128 tokens by full-model calls (the artifact's plain decoding), and at every
position whose last 2 tokens have no earlier occurrence in the context (runtime.decoding.lookup_drafts finds
nothing: today an exit step there) asks the longest known context for its most frequent next token: how often that
is the token decoded, by the share of that context's count it holds, and how many tokens a chain of such guesses
(up to 4) gets right.

    taskset -c 0 python results/probes/corpus_ngram_drafts.py models/default ART/onnx
"""
import sys, time, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np
from tokenizers import Tokenizer
from models.data import corpus_files, split_files, encode_files, prompt_set
from runtime.decoding import lookup_drafts, GenerationConfig, generate, DEFAULT_LOOKUP
from runtime.loader import open_artifact
from runtime.bench import encode_prompts

model = sys.argv[1]; art = sys.argv[2]
tok = Tokenizer.from_file(f"{model}/tokenizer.json")
cfgj = json.load(open(f"{model}/config.json"))
bos, eos = cfgj.get("bos_token_id", 1), cfgj.get("eos_token_id", 2)
t = time.time()
root, files = corpus_files()
train, held = split_files(root, files)
stream = encode_files(tok, train, bos, eos).astype(np.int64)
V = tok.get_vocab_size()
print(f"train stream {len(stream)} tokens, V {V}, {time.time()-t:.1f}s", flush=True)
def table(n):
    """context of n tokens -> (top next token, its count, total count)"""
    key = np.zeros(len(stream) - n, np.int64)
    for i in range(n):
        key = key * V + stream[i:len(stream) - n + i]
    nxt = stream[n:]
    full = key * V + nxt
    u, c = np.unique(full, return_counts=True)
    ctx, nx = u // V, u % V
    # per context: total and argmax
    order = np.lexsort((-c, ctx))
    ctx, nx, c = ctx[order], nx[order], c[order]
    first = np.r_[True, ctx[1:] != ctx[:-1]]
    starts = np.flatnonzero(first)
    totals = np.add.reduceat(c, starts)
    return dict(zip(ctx[starts].tolist(), zip(nx[starts].tolist(), c[starts].tolist(), totals.tolist())))
tabs = {n: table(n) for n in (1, 2, 3)}
print({n: len(v) for n, v in tabs.items()}, f"{time.time()-t:.1f}s", flush=True)
def predict(ctx, nmax=3, min_total=2):
    for n in range(nmax, 0, -1):
        if len(ctx) < n: continue
        k = 0
        for x in ctx[-n:]: k = k * V + x
        r = tabs[n].get(k)
        if r and r[2] >= min_total:
            return r[0], r[1] / r[2], n, r[2]
    return None
opened = open_artifact(art, threads=1)
prompts, _ = encode_prompts(opened, [q["prompt"] for q in prompt_set("humaneval")[:30]], 128)
cfg = GenerationConfig(max_new_tokens=128, eos_token_ids=tuple(opened.eos_token_ids), self_speculative=False, full_model_baseline=True)
buckets = {}  # confidence bucket -> [hits, total]
chain = {}  # bucket -> accepted lengths of chained drafts (k=4)
nomatch = 0; positions = 0
for p in prompts:
    out = generate(opened.backend, p, cfg).tokens
    seq = list(p) + out
    for i in range(len(p), len(seq) - 1):
        ctx = seq[:i + 1]  # last emitted token is seq[i]; next is seq[i+1]
        positions += 1
        if lookup_drafts(ctx, 5, 2):
            continue
        nomatch += 1
        pr = predict(ctx)
        if pr is None:
            buckets.setdefault("none", [0, 0])[1] += 1; continue
        b = min(int(pr[1] * 10), 9) / 10
        h = buckets.setdefault(b, [0, 0]); h[1] += 1; h[0] += pr[0] == seq[i + 1]
        # chained drafts
        c2 = list(ctx); acc = 0
        for j in range(4):
            q = predict(c2)
            if q is None or i + 1 + j >= len(seq) or q[0] != seq[i + 1 + j]: break
            acc += 1; c2.append(q[0])
        chain.setdefault(b, []).append(acc)
print(f"positions {positions}, without a context 2-gram match {nomatch}")
cum_hits = cum_tot = 0
for b in sorted([k for k in buckets if k != "none"], reverse=True):
    h, n = buckets[b]; cum_hits += h; cum_tot += n
    print(f"conf >= {b:.1f}: {h}/{n} = {h/n:.2f} top-1; cumulative {cum_hits}/{cum_tot} = {cum_hits/max(cum_tot,1):.2f} "
          f"({cum_tot/nomatch:.0%} of no-match positions); mean chained accepted (k=4) {np.mean(chain[b]):.2f}")
print("no prediction:", buckets.get("none"))
