"""Probe: how many drafts a lookup step should propose (K of --lookup), fixed or adapted per step.

Runs the runtime's loop (GenerationConfig.lookup) with the looked-up drafts cut to a per-step K set by a
policy from the previous lookup step's acceptance: fixed K = 8, fixed K = 5, K = accepted + 2, and
doubling after a fully accepted step / halving to accepted + 1 after a rejection (2..8). Self-speculative
decode tok/s, medians over --repeats interleaved passes of the first --limit HumanEval prompts x 128 tokens,
one process, greedy.

    python results/probes/lookup_k_policies.py ARTIFACT [--limit 30] [--repeats 3] [--json F.json]
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtime import decoding  # noqa: E402
from runtime.bench import encode_prompts, machine, prompt_set  # noqa: E402
from runtime.decoding import GenerationConfig, generate  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402
from runtime.measure import mode_config  # noqa: E402

POLICIES = {  # (accepted, proposed, current K) -> the next step's K
    "K=8": lambda accepted, proposed, k: 8,
    "K=5": lambda accepted, proposed, k: 5,
    "accepted+2": lambda accepted, proposed, k: max(2, min(8, accepted + 2)),
    "double/halve": lambda accepted, proposed, k: min(8, 2 * k) if accepted == proposed else max(2, accepted + 1),
}
STATE = {"k": 8, "policy": POLICIES["K=8"]}
runtime_drafts, runtime_step = decoding.lookup_drafts, decoding.lookup_step


def drafts_cut_to_k(context, k, n):
    return runtime_drafts(context, min(k, STATE["k"]), n)


def step_setting_k(calls, chooser, token, pos, drafts):
    accepted, new = runtime_step(calls, chooser, token, pos, drafts)
    STATE["k"] = STATE["policy"](accepted, len(drafts), STATE["k"])
    return accepted, new


decoding.lookup_drafts, decoding.lookup_step = drafts_cut_to_k, step_setting_k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    opened = open_artifact(a.artifact, threads=1)
    prompts, _ = encode_prompts(opened, [p["prompt"] for p in prompt_set("humaneval")[:a.limit]], 128)
    spec = mode_config("spec", opened.num_speculations, 128, tuple(opened.eos_token_ids), opened.draft_threshold)
    cfg = GenerationConfig(**{**spec.__dict__, "lookup": 8})
    tok_s = {name: [] for name in POLICIES}
    tokens_per_step = {}
    for _ in range(a.repeats):
        for name, policy in POLICIES.items():
            STATE["policy"] = policy
            decoded = seconds = steps = emitted = 0
            for ids in prompts:
                STATE["k"] = 8
                s = generate(opened.backend, ids, cfg).stats
                decoded, seconds, steps = decoded + s.generated_tokens - 1, seconds + s.decode_time_s, steps + s.steps
                emitted += sum(k * v for k, v in s.tokens_per_step.items())
            tok_s[name].append(decoded / seconds)
            tokens_per_step[name] = emitted / steps
    out = {"machine": machine(), "artifact": a.artifact, "prompts": len(prompts), "repeats": a.repeats,
           "policies": {name: {"decode_tokens_per_s": statistics.median(v), "repeats": v,
                               "mean_tokens_per_step": tokens_per_step[name]} for name, v in tok_s.items()}}
    for name, r in out["policies"].items():
        print(f"{name:14s} {r['decode_tokens_per_s']:8.1f} tok/s  {r['mean_tokens_per_step']:.2f} tokens/step")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
