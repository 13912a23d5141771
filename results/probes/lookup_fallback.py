"""Probe: self-speculation with lookup, and K of the 1-token-match fallback (lookup_fallback; 0: exit drafts
where the last 2 tokens have no earlier occurrence), the exit drafts of a step made by cheap calls (exit_guesses;
0: exact draft calls; -1: the backend's default) and the exit steps' d and tau (the artifact's by default), every
combination alternated on one artifact, with each kind of step's cost per token (runtime.measure.run_pass:
steps_by_kind), and how many prompts decode as plain decoding (draft + verify). --lookup 0: exit drafts alone.

    taskset -c 0 python results/probes/lookup_fallback.py ART [--prompts 30] [--fallbacks 0 1 3 5] [--rounds 2]
                                                           [--exit-guesses 0 1 2] [--d 1 3] [--tau 0.3 0.6] [--lookup K]
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
    p.add_argument("--d", nargs="+", type=int)
    p.add_argument("--tau", nargs="+", type=float)
    p.add_argument("--lookup", type=int, default=DEFAULT_LOOKUP)
    a = p.parse_args()
    opened = open_artifact(a.artifact, threads=1)
    prompts, _ = encode_prompts(opened, [q["prompt"] for q in prompt_set("humaneval")[:a.prompts]], 128)
    base = dict(max_new_tokens=128, eos_token_ids=tuple(opened.eos_token_ids), lookup=a.lookup)
    grid = [(k, g, d, tau) for k in a.fallbacks for g in a.exit_guesses for d in a.d or [opened.num_speculations]
            for tau in a.tau or [opened.draft_threshold]]
    plain = run_pass(opened.backend, prompts, GenerationConfig(**{**base, "lookup": 0}, self_speculative=False,
                                                               full_model_baseline=True))
    reference = run_pass(opened.backend, prompts, GenerationConfig(**{**base, "lookup": 0}, self_speculative=False))
    for r in range(a.rounds):
        print(f"round {r + 1} full-call plain: {plain.decode_tokens_per_s:.0f} tok/s", flush=True)
        for k, g, d, tau in grid:
            result = run_pass(opened.backend, prompts, GenerationConfig(
                **base, lookup_fallback=k, exit_guesses=None if g < 0 else g, num_speculations=d, draft_threshold=tau))
            per_kind = ", ".join(f"{kind} {c['us_per_token']:.1f} us/token ({c['token_share']:.0%} of tokens)"
                                 for kind, c in sorted(result.steps_by_kind.items()))
            same = sum(x == y for x, y in zip(result.tokens, reference.tokens))
            setting = (f"fallback K {k}" + ("" if g < 0 else f", exit guesses {g}")
                       + (f", d {d}, tau {tau:g}" if a.d or a.tau else ""))
            print(f"round {r + 1} {setting}: {result.decode_tokens_per_s:.0f} tok/s, "
                  f"{result.decode_tokens_per_s / plain.decode_tokens_per_s:.3f}x full-call plain; {per_kind}; "
                  f"{same} of {len(prompts)} as plain decoding",
                  flush=True)
        plain = run_pass(opened.backend, prompts, GenerationConfig(**{**base, "lookup": 0}, self_speculative=False,
                                                                   full_model_baseline=True))


if __name__ == "__main__":
    main()
