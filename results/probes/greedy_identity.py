"""Probe: greedy self-speculation against plain decoding (draft + 1-token verify calls) on many prompts, with
drafts looked up in the context (K = 5, the runtime's defaults after a full accept) and with exit drafts
alone, at the artifact's d and tau. Prints the prompts whose tokens differ in either mode.

    taskset -c 0 python results/probes/greedy_identity.py ARTIFACT [N]   # the first N HumanEval prompts x 128
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.data import prompt_set  # noqa: E402
from runtime.bench import encode_prompts  # noqa: E402
from runtime.decoding import DEFAULT_LOOKUP, GenerationConfig, generate  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402


def main() -> None:
    artifact, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
    opened = open_artifact(artifact, threads=1)
    prompts, _ = encode_prompts(opened, [q["prompt"] for q in prompt_set("humaneval")[:n]], 128)
    base = dict(max_new_tokens=128, eos_token_ids=tuple(opened.eos_token_ids))
    spec = dict(base, num_speculations=opened.num_speculations, draft_threshold=opened.draft_threshold)
    differing = []
    for i, ids in enumerate(prompts):
        plain = generate(opened.backend, ids, GenerationConfig(**base, self_speculative=False)).tokens
        lookup = generate(opened.backend, ids, GenerationConfig(**spec, lookup=DEFAULT_LOOKUP)).tokens
        exit_only = generate(opened.backend, ids, GenerationConfig(**spec)).tokens
        if lookup != plain or exit_only != plain:
            differing.append({"prompt": i, "lookup_identical": lookup == plain, "exit_identical": exit_only == plain})
    print(f"{artifact}: {len(prompts)} prompts, d {opened.num_speculations}, tau {opened.draft_threshold}; "
          f"differing: {differing or 'none'}")


if __name__ == "__main__":
    main()
