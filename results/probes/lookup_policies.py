"""Probe: self-speculation with lookup under several (K, K after a fully accepted lookup step) policies on one
artifact, alternated, with each kind of step's cost per token (GenerationStats.step_tokens / step_time_s).

    taskset -c 0 python results/probes/lookup_policies.py ART [--prompts 30] [--policies 5:5 5:12] [--rounds 2]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.data import prompt_set  # noqa: E402
from runtime.bench import encode_prompts  # noqa: E402
from runtime.decoding import GenerationConfig, generate  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402


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
            tokens = seconds = 0.0
            kinds: dict = {}
            for ids in prompts:
                s = generate(opened.backend, ids, GenerationConfig(**base, lookup=k, lookup_run=run)).stats
                tokens += s.generated_tokens - 1
                seconds += s.decode_time_s
                for kind, n in s.step_tokens.items():
                    t, sec = kinds.get(kind, (0, 0.0))
                    kinds[kind] = (t + n, sec + s.step_time_s[kind])
            per_kind = ", ".join(f"{kind} {1e6 * sec / n:.1f} us/token ({n} tokens)" for kind, (n, sec) in kinds.items())
            print(f"round {r + 1} K {k} after a full accept {run}: {tokens / seconds:.0f} tok/s; {per_kind}", flush=True)


if __name__ == "__main__":
    main()
