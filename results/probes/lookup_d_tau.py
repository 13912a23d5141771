"""Probe: the exit drafting's d and tau beside --lookup, on artifacts exact for it.

With --lookup the exit drafts only at steps whose context has no earlier match (about 30% of the shipped
model's steps on HumanEval), and on artifacts exported for exact lookup (--pad-drafts, --pte-attention
row_invariant_drafts) each draft call costs more (0.12 -> 0.17-0.19 ms on the shipped model). This runs
the runtime's loop with lookup K = 5 at d in {3, 4, 6} x tau in {0.1, 0.3, 0.5}, and full-call plain
decoding, interleaved (medians over --repeats passes of the first --limit HumanEval prompts x 128 tokens,
one process, greedy). Its runs chose layerskip.json's "with_lookup" for the shipped model.

    python results/probes/lookup_d_tau.py ARTIFACT [--limit 30] [--repeats 3] [--json F.json]
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtime.bench import encode_prompts, machine, prompt_set  # noqa: E402
from runtime.decoding import DEFAULT_LOOKUP, GenerationConfig, generate  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    opened = open_artifact(a.artifact, threads=1, preload=("draft", "verify", "forward"))
    prompts, _ = encode_prompts(opened, [p["prompt"] for p in prompt_set("humaneval")[:a.limit]], 128)
    eos = tuple(opened.eos_token_ids)
    grid = {f"d{d} tau{tau}": GenerationConfig(max_new_tokens=128, num_speculations=d, draft_threshold=tau,
                                               eos_token_ids=eos, lookup=DEFAULT_LOOKUP)
            for d in (3, 4, 6) for tau in (0.1, 0.3, 0.5)}
    grid["full-call plain"] = GenerationConfig(max_new_tokens=128, self_speculative=False, full_model_baseline=True,
                                               eos_token_ids=eos)
    tok_s = {name: [] for name in grid}
    for _ in range(a.repeats):
        for name, cfg in grid.items():
            decoded = seconds = 0.0
            for ids in prompts:
                s = generate(opened.backend, ids, cfg).stats
                decoded, seconds = decoded + s.generated_tokens - 1, seconds + s.decode_time_s
            tok_s[name].append(decoded / seconds)
    plain = statistics.median(tok_s["full-call plain"])
    points = {name: {"decode_tokens_per_s": statistics.median(v), "repeats": v,
                     "vs_full_call_plain": statistics.median(v) / plain} for name, v in tok_s.items()}
    for name, p in points.items():
        print(f"{name:16s} {p['decode_tokens_per_s']:8.1f} tok/s  {p['vs_full_call_plain']:.3f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "artifact": a.artifact, "prompts": len(prompts),
                                            "lookup": DEFAULT_LOOKUP, "points": points}, indent=1))


if __name__ == "__main__":
    main()
