"""Probe: self-speculation with lookup under several step policies (GenerationConfig fields as JSON, over the
artifact's d and tau and the backend's defaults: {} is the artifact's policy), each round's
settings in a shuffled order after a full-call plain pass, speedups over that pass; medians over the rounds, and how
many prompts decode as the first round's full-call plain decoding.

    taskset -c 0 python results/probes/step_policy_sweep.py ART '[{}, {"lookup_fallback": 0}, {"draft_threshold": 0.1}]'
                                                          [--rounds 4] [--prompts 30]
"""
import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.data import prompt_set  # noqa: E402
from runtime.bench import encode_prompts  # noqa: E402
from runtime.decoding import DEFAULT_LOOKUP, GenerationConfig  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402
from runtime.measure import run_pass  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("settings", type=json.loads)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--prompts", type=int, default=30)
    a = p.parse_args()
    opened = open_artifact(a.artifact, threads=1)
    prompts, _ = encode_prompts(opened, [q["prompt"] for q in prompt_set("humaneval")[:a.prompts]], 128)
    base = dict(max_new_tokens=128, eos_token_ids=tuple(opened.eos_token_ids), lookup=DEFAULT_LOOKUP,
                num_speculations=opened.num_speculations, draft_threshold=opened.draft_threshold)  # the artifact's
    names = [json.dumps(s) for s in a.settings]
    ratios, reference = {n: [] for n in names}, None
    for r in range(a.rounds):
        plain = run_pass(opened.backend, prompts, GenerationConfig(**{**base, "lookup": 0}, self_speculative=False,
                                                                   full_model_baseline=True))
        reference = reference or plain.tokens
        for name in random.Random(r).sample(names, len(names)):
            result = run_pass(opened.backend, prompts, GenerationConfig(**{**base, **json.loads(name)}))
            ratios[name].append(result.decode_tokens_per_s / plain.decode_tokens_per_s)
            kinds = ", ".join(f"{kind} {c['us_per_token']:.0f} us/token ({c['token_share']:.0%})"
                              for kind, c in sorted(result.steps_by_kind.items()))
            same = sum(x == y for x, y in zip(result.tokens, reference))
            print(f"round {r + 1} {name}: {result.decode_tokens_per_s:.0f} tok/s, full-call plain "
                  f"{plain.decode_tokens_per_s:.0f}: {ratios[name][-1]:.3f}x; {kinds}; {same} of {len(prompts)} "
                  f"as full-call plain decoding", flush=True)
    print("medians over the rounds:")
    for name in sorted(names, key=lambda n: -statistics.median(ratios[n])):
        print(f"  {statistics.median(ratios[name]):.3f}x  {name}  ({' '.join(f'{x:.3f}' for x in ratios[name])})")


if __name__ == "__main__":
    main()
