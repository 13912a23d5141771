"""Probe: self-speculation with lookup under several (K, K after a fully accepted lookup step) policies on one
artifact, alternated, with each kind of step's cost per token (runtime.measure.run_pass: steps_by_kind).

    taskset -c 0 python results/probes/lookup_policies.py ART [--prompts 30] [--policies 5:5 5:12] [--rounds 2]

(results/probe_lookup_policies_shipped_{pte,onnx}.txt came from its first version, which printed each kind's
token count instead of its share.)
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.data import prompt_set  # noqa: E402
from runtime.bench import encode_prompts  # noqa: E402
from runtime.decoding import GenerationConfig  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402
from runtime.measure import run_pass  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("--prompts", type=int, default=30)
    p.add_argument("--policies", nargs="+", default=["5:5", "5:12"], help="K:K_after_a_full_accept")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    opened = open_artifact(a.artifact, threads=1)
    prompts, _ = encode_prompts(opened, [q["prompt"] for q in prompt_set("humaneval")[:a.prompts]], 128)
    base = dict(max_new_tokens=128, num_speculations=opened.num_speculations, draft_threshold=opened.draft_threshold,
                eos_token_ids=tuple(opened.eos_token_ids))
    for r in range(a.rounds):
        for policy in a.policies:
            k, run = (int(x) for x in policy.split(":"))
            result = run_pass(opened.backend, prompts, GenerationConfig(**base, lookup=k, lookup_run=run))
            per_kind = ", ".join(f"{kind} {c['us_per_token']:.1f} us/token ({c['token_share']:.0%} of tokens)"
                                 for kind, c in result.steps_by_kind.items())
            print(f"round {r + 1} K {k} after a full accept {run}: {result.decode_tokens_per_s:.0f} tok/s; {per_kind}",
                  flush=True)


if __name__ == "__main__":
    main()
