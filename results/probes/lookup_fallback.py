"""Probe: self-speculation with lookup, and K of the 1-token-match fallback (lookup_fallback; 0: exit drafts
where the last 2 tokens have no earlier occurrence) and the exit drafts of a step made by cheap calls (exit_guesses;
0: exact draft calls; -1: the backend's default), alternated on one artifact, with each kind of step's cost per token
(runtime.measure.run_pass: steps_by_kind), and how many prompts decode as plain decoding (draft + verify).

    taskset -c 0 python results/probes/lookup_fallback.py ART [--prompts 30] [--fallbacks 0 1 3 5] [--rounds 2]
                                                           [--exit-guesses 0 1 2]
"""
import argparse
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
    p.add_argument("--prompts", type=int, default=30)
    p.add_argument("--fallbacks", nargs="+", type=int, default=[0, 1, 3, 5])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--exit-guesses", nargs="+", type=int, default=[-1])
    a = p.parse_args()
    opened = open_artifact(a.artifact, threads=1)
    prompts, _ = encode_prompts(opened, [q["prompt"] for q in prompt_set("humaneval")[:a.prompts]], 128)
    base = dict(max_new_tokens=128, num_speculations=opened.num_speculations, draft_threshold=opened.draft_threshold,
                eos_token_ids=tuple(opened.eos_token_ids), lookup=DEFAULT_LOOKUP)
    plain = run_pass(opened.backend, prompts, GenerationConfig(**{**base, "lookup": 0}, self_speculative=False,
                                                               full_model_baseline=True))
    reference = run_pass(opened.backend, prompts, GenerationConfig(**{**base, "lookup": 0}, self_speculative=False))
    for r in range(a.rounds):
        print(f"round {r + 1} full-call plain: {plain.decode_tokens_per_s:.0f} tok/s", flush=True)
        for k, g in [(k, g) for k in a.fallbacks for g in a.exit_guesses]:
            result = run_pass(opened.backend, prompts, GenerationConfig(**base, lookup_fallback=k,
                                                                        exit_guesses=None if g < 0 else g))
            per_kind = ", ".join(f"{kind} {c['us_per_token']:.1f} us/token ({c['token_share']:.0%} of tokens)"
                                 for kind, c in sorted(result.steps_by_kind.items()))
            same = sum(a == b for a, b in zip(result.tokens, reference.tokens))
            print(f"round {r + 1} fallback K {k}{'' if g < 0 else f', exit guesses {g}'}: {result.decode_tokens_per_s:.0f} tok/s, "
                  f"{result.decode_tokens_per_s / plain.decode_tokens_per_s:.3f}x full-call plain; {per_kind}; "
                  f"{same} of {len(prompts)} as plain decoding",
                  flush=True)
        plain = run_pass(opened.backend, prompts, GenerationConfig(**{**base, "lookup": 0}, self_speculative=False,
                                                                   full_model_baseline=True))


if __name__ == "__main__":
    main()
