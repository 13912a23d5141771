"""Probe: XNNPACK's weight cache off and on (runtime.kernels.share_xnnpack_weights), in processes taking turns.

Per process (the option holds for the whole process): peak RSS after opening the artifact (its default methods) and
after also loading `forward`; then ROUNDS rounds of full-call plain decoding and self-speculation with lookup (the
runtime's defaults) over the benchmark's 30 HumanEval prompts x 128 tokens: tok/s, their ratio, how many prompts
decode as the first plain pass, and the peak RSS.

    for r in 1 2 3; do for s in 0 1; do
        taskset -c 0 python results/probes/xnnpack_weight_cache.py ART/pte $s [ROUNDS]; done; done
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import runtime.executorch_backend as executorch_backend  # noqa: E402
from models.data import prompt_set  # noqa: E402
from runtime import rss  # noqa: E402
from runtime.bench import encode_prompts  # noqa: E402
from runtime.decoding import DEFAULT_LOOKUP, GenerationConfig  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402
from runtime.measure import run_pass  # noqa: E402


def main() -> None:
    artifact, share, rounds = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]) if len(sys.argv) > 3 else 1
    load_program = executorch_backend.load_program
    executorch_backend.load_program = lambda path, own_kernels=False: load_program(path, own_kernels, share)
    opened = open_artifact(artifact, threads=1)
    print(f"weight cache {'on' if share else 'off'}: opened, peak RSS {rss.peak_rss_mb():.1f} MB", flush=True)
    opened.backend._get("forward")
    print(f"  + forward: peak RSS {rss.peak_rss_mb():.1f} MB", flush=True)
    prompts, _ = encode_prompts(opened, [q["prompt"] for q in prompt_set("humaneval")[:30]], 128)
    base = dict(max_new_tokens=128, eos_token_ids=tuple(opened.eos_token_ids), lookup=DEFAULT_LOOKUP,
                num_speculations=opened.num_speculations, draft_threshold=opened.draft_threshold)
    reference = None
    for r in range(rounds):
        plain = run_pass(opened.backend, prompts, GenerationConfig(**{**base, "lookup": 0}, self_speculative=False,
                                                                   full_model_baseline=True))
        spec = run_pass(opened.backend, prompts, GenerationConfig(**base))
        reference = reference or plain.tokens
        same = sum(x == y for x, y in zip(spec.tokens, reference))
        print(f"  round {r + 1}: self-spec {spec.decode_tokens_per_s:.0f} tok/s, full-call plain "
              f"{plain.decode_tokens_per_s:.0f}: {spec.decode_tokens_per_s / plain.decode_tokens_per_s:.3f}x; "
              f"{same} of {len(prompts)} as plain decoding; peak RSS {rss.peak_rss_mb():.1f} MB", flush=True)


if __name__ == "__main__":
    main()
