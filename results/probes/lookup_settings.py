"""Probe: the settings of self-speculation with drafts looked up in the context (--lookup).

--what k: how many drafts a lookup step should propose (K), fixed or adapted per step. The runtime's
    loop runs with the looked-up drafts cut to a per-step K set by a policy from the previous lookup
    step's acceptance: fixed K = 8, fixed K = 5, K = accepted + 2, and doubling after a fully accepted
    step / halving to accepted + 1 after a rejection (2..8). Chose decoding.DEFAULT_LOOKUP.
--what d-tau: the exit drafting's d and tau beside lookup, on artifacts exact for it. With --lookup the
    exit drafts only at steps whose context has no earlier match (about 30% of the shipped model's steps
    on HumanEval), and on artifacts exported for exact lookup (--pad-drafts, --pte-attention
    row_invariant_drafts) each draft call costs more (0.12 -> 0.17-0.19 ms on the shipped model). Runs
    lookup K = 5 at d in {3, 4, 6} x tau in {0.1, 0.3, 0.5}, and full-call plain decoding. Chose
    layerskip.json's "with_lookup" for the shipped model.

Decode tok/s, medians over --repeats interleaved passes of the first --limit HumanEval prompts x 128
tokens, one process, greedy.

    python results/probes/lookup_settings.py ARTIFACT --what {k,d-tau} [--limit 30] [--repeats 3] [--json F.json]
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtime import decoding  # noqa: E402
from runtime.bench import encode_prompts, machine, prompt_set  # noqa: E402
from runtime.decoding import DEFAULT_LOOKUP, GenerationConfig, generate  # noqa: E402
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


def k_policies(opened) -> dict:
    """name -> (config, the policy that sets K per step)."""
    decoding.lookup_drafts, decoding.lookup_step = drafts_cut_to_k, step_setting_k
    spec = mode_config("spec", opened.num_speculations, 128, tuple(opened.eos_token_ids), opened.draft_threshold)
    cfg = GenerationConfig(**{**spec.__dict__, "lookup": 8})
    return {name: (cfg, policy) for name, policy in POLICIES.items()}


def d_tau_grid(opened) -> dict:
    eos = tuple(opened.eos_token_ids)
    grid = {f"d{d} tau{tau}": (GenerationConfig(max_new_tokens=128, num_speculations=d, draft_threshold=tau,
                                                eos_token_ids=eos, lookup=DEFAULT_LOOKUP), None)
            for d in (3, 4, 6) for tau in (0.1, 0.3, 0.5)}
    grid["full-call plain"] = (GenerationConfig(max_new_tokens=128, self_speculative=False, full_model_baseline=True,
                                                eos_token_ids=eos), None)
    return grid


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--what", choices=("k", "d-tau"), required=True)
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    opened = open_artifact(a.artifact, threads=1, preload=("draft", "verify", "forward"))
    prompts, _ = encode_prompts(opened, [p["prompt"] for p in prompt_set("humaneval")[:a.limit]], 128)
    points = k_policies(opened) if a.what == "k" else d_tau_grid(opened)
    tok_s = {name: [] for name in points}
    tokens_per_step = {}
    for _ in range(a.repeats):
        for name, (cfg, policy) in points.items():
            STATE["policy"] = policy
            decoded = seconds = steps = emitted = 0
            for ids in prompts:
                STATE["k"] = 8
                s = generate(opened.backend, ids, cfg).stats
                decoded, seconds, steps = decoded + s.generated_tokens - 1, seconds + s.decode_time_s, steps + s.steps
                emitted += sum(k * v for k, v in s.tokens_per_step.items())
            tok_s[name].append(decoded / seconds)
            tokens_per_step[name] = emitted / steps
    results = {name: {"decode_tokens_per_s": statistics.median(v), "repeats": v,
                      "mean_tokens_per_step": tokens_per_step[name]} for name, v in tok_s.items()}
    if "full-call plain" in results:
        plain = results["full-call plain"]["decode_tokens_per_s"]
        for r in results.values():
            r["vs_full_call_plain"] = r["decode_tokens_per_s"] / plain
    for name, r in results.items():
        print(f"{name:16s} {r['decode_tokens_per_s']:8.1f} tok/s  {r['mean_tokens_per_step']:.2f} tokens/step"
              + (f"  {r['vs_full_call_plain']:.3f}x" if "vs_full_call_plain" in r else ""))
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "artifact": a.artifact, "what": a.what,
                                            "prompts": len(prompts), "repeats": a.repeats, "points": results}, indent=1))


if __name__ == "__main__":
    main()
