"""Probe: drafts looked up in the context (prompt-lookup decoding) inside LayerSkip self-speculation.

A step at token t (position p) looks for the latest earlier occurrence of the last n tokens of the
context (prompt + output) and proposes the up to K tokens that followed it. A proposal costs no draft
call: it goes through layers [0, E) in one multi-row draft call (t and the proposal, rows p .. p+k) and
is verified in one call; a step without a proposal is a normal LayerSkip step (exit drafts, tau).
Greedy only. The multi-row draft call computes layers < E for several rows at once, where plain
decoding computes them one row at a time, so greedy output equals plain decoding only as far as those
kernels give a row the same bits at any row count (measured below, not by construction).

The loop is the runtime's (GenerationConfig.lookup, lookup_ngram); this probe counts its lookup steps.
Measures decode tok/s of plain decoding (draft + verify calls, and the full-model call),
self-speculation and lookup + self-speculation, interleaved in one process (medians over --repeats),
the lookup steps' acceptance, and greedy identity with both plain decoders, on the first --limit
HumanEval prompts x --max-new-tokens. (The sweep and k8 JSONs were made before the draft + verify
plain decoder was added.)

    python results/probes/lookup_drafts.py ARTIFACT [--n 2] [--K 8] [--repeats 3] [--json F.json]
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtime import decoding  # noqa: E402
from runtime.bench import encode_prompts, machine, prompt_set  # noqa: E402
from runtime.decoding import generate  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402
from runtime.measure import mode_config  # noqa: E402

COUNTS = {"lookup_steps": 0, "proposed": 0, "accepted": 0}


def counted_lookup_step(calls, chooser, token, pos, drafts, step=decoding.lookup_step):
    """The runtime's lookup step, counting its drafts and how many held."""
    accepted, new = step(calls, chooser, token, pos, drafts)
    COUNTS["lookup_steps"] += 1
    COUNTS["proposed"] += len(drafts)
    COUNTS["accepted"] += accepted
    return accepted, new


decoding.lookup_step = counted_lookup_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=2, help="tokens matched")
    ap.add_argument("--K", type=int, default=8, help="most tokens proposed")
    ap.add_argument("--num-speculations", type=int, help="d of exit drafting (default: the artifact's)")
    ap.add_argument("--draft-threshold", type=float, help="tau of exit drafting (default: the artifact's; near 1: "
                                                           "steps without a lookup decode one token, as plain decoding)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--json")
    a = ap.parse_args()
    opened = open_artifact(a.artifact, threads=1)
    backend = opened.backend
    prompts, _ = encode_prompts(opened, [p["prompt"] for p in prompt_set("humaneval")[:a.limit]], a.max_new_tokens)
    eos = tuple(opened.eos_token_ids)
    d = a.num_speculations or opened.num_speculations
    tau = opened.draft_threshold if a.draft_threshold is None else a.draft_threshold
    tok_s = {m: [] for m in ("ar", "ar_full", "spec", "lookup")}
    tokens, counts = {}, {}
    configs = {m: mode_config(m, d, a.max_new_tokens, eos, tau) for m in ("ar", "ar_full", "spec")}
    configs["lookup"] = decoding.GenerationConfig(**{**configs["spec"].__dict__, "lookup": a.K, "lookup_ngram": a.n})
    for _ in range(a.repeats):
        for mode in tok_s:
            c = {"steps": 0}
            COUNTS.update(lookup_steps=0, proposed=0, accepted=0)
            decoded = seconds = 0.0
            outs = []
            for ids in prompts:
                result = generate(backend, ids, configs[mode])
                decoded += result.stats.generated_tokens - 1
                seconds += result.stats.decode_time_s
                c["steps"] += result.stats.steps
                outs.append(result.tokens)
            c.update(COUNTS)
            tok_s[mode].append(decoded / seconds)
            tokens[mode], counts[mode] = outs, c
            print(f"{mode}: {decoded / seconds:.0f} tok/s", file=sys.stderr, flush=True)
    plain = statistics.median(tok_s["ar_full"])
    record = {"machine": machine(), "artifact": a.artifact, "n": a.n, "K": a.K, "d": d, "tau": tau,
              "prompts": len(prompts), "max_new_tokens": a.max_new_tokens, "repeats": a.repeats}
    for mode, runs in tok_s.items():
        c = counts[mode]
        record[mode] = {"tok_s": statistics.median(runs), "tok_s_repeats": runs,
                        "vs_full_call_plain": statistics.median(runs) / plain,
                        "identical_to_full_call_plain": sum(x == y for x, y in zip(tokens[mode], tokens["ar_full"])),
                        "identical_to_plain": sum(x == y for x, y in zip(tokens[mode], tokens["ar"])),
                        **({"lookup_steps": c["lookup_steps"], "steps": c["steps"],
                            "lookup_acceptance": c["accepted"] / max(c["proposed"], 1),
                            "tokens_per_lookup_step": (c["accepted"] + c["lookup_steps"]) / max(c["lookup_steps"], 1)}
                           if mode == "lookup" else {})}
        print(f"{mode:8s} {record[mode]['tok_s']:7.0f} tok/s  {record[mode]['vs_full_call_plain']:.3f}x full-call plain, "
              f"identical {record[mode]['identical_to_full_call_plain']}/{len(prompts)} "
              f"(to draft + verify plain decoding {record[mode]['identical_to_plain']})")
    if a.json:
        Path(a.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
