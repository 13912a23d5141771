"""Probe: what the ONNX backend's padded verify calls (2+ rows, even at blocks >= 64) cost, against verify calls as the loops make them.

Same artifact, one process, the two variants interleaved: per-call costs at position 200, decode tok/s
of plain (draft + verify, and full call) and self-speculative decoding (medians over repeats), and how
many prompts decode identically greedy self-speculative and plain.

    python results/probes/onnx_verify_pairs.py ARTIFACT [--limit 30] [--max-new-tokens 128] [--repeats 3] --out F.json
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtime import measure  # noqa: E402
from runtime.bench import encode_prompts, machine, prompt_set  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("artifact")
p.add_argument("--limit", type=int, default=30)
p.add_argument("--max-new-tokens", type=int, default=128)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--out", required=True)
args = p.parse_args()

opened = open_artifact(args.artifact, threads=1)
backend = opened.backend
paired = backend.verify
variants = {"as_called": backend.verify_rows, "padded": paired}  # verify_rows: the calls as made
texts = [q["prompt"] for q in prompt_set("humaneval")[:args.limit]]
prompts, _ = encode_prompts(opened, texts, args.max_new_tokens)
d, eos = opened.num_speculations, tuple(opened.eos_token_ids)
cfgs = {m: measure.mode_config(m, d, args.max_new_tokens, eos, opened.draft_threshold) for m in ("ar", "ar_full", "spec")}
runs = {v: {"calls_ms": None, **{m: [] for m in cfgs}} for v in variants}
tokens = {v: {} for v in variants}
for v, verify in variants.items():
    backend.verify = verify
    runs[v]["calls_ms"] = measure.per_call_latency(backend, d)
for r in range(args.repeats):
    for v, verify in variants.items():
        backend.verify = verify
        for m, cfg in cfgs.items():
            one = measure.run_pass(backend, prompts, cfg)
            runs[v][m].append(one.decode_tokens_per_s)
            tokens[v][m] = one.tokens
        print(f"[probe] repeat {r + 1}/{args.repeats} {v}: " + ", ".join(f"{m} {runs[v][m][-1]:.1f}" for m in cfgs),
              file=sys.stderr, flush=True)
out = {"artifact": args.artifact, "facts": opened.facts, "machine": machine(), "prompts": len(prompts),
       "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "d": d, "tau": opened.draft_threshold}
for v in variants:
    out[v] = {"calls_ms": runs[v]["calls_ms"],
              "decode_tokens_per_s_median": {m: statistics.median(runs[v][m]) for m in cfgs},
              "decode_tokens_per_s_repeats": {m: runs[v][m] for m in cfgs},
              "greedy_spec_identical_to_ar": sum(a == s for a, s in zip(tokens[v]["ar"], tokens[v]["spec"]))}
out["spec_padded_over_as_called"] = (out["padded"]["decode_tokens_per_s_median"]["spec"]
                                   / out["as_called"]["decode_tokens_per_s_median"]["spec"])
Path(args.out).write_text(json.dumps(out, indent=1))
for v in variants:
    print(v, {k: round(x, 3) for k, x in out[v]["calls_ms"].items()},
          {m: round(x, 1) for m, x in out[v]["decode_tokens_per_s_median"].items()},
          f"identical {out[v]['greedy_spec_identical_to_ar']}/{len(prompts)}")
print(f"self-spec, padded / as called: {out['spec_padded_over_as_called']:.3f}")
