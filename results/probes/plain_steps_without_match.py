"""Probe: should a step without a lookup match make one full-model call (a plain step) instead of drafting from the exit?

In plain decoding a full-model call costs less per token than an exit step of the lookup loop does (README), so the
probe swaps the loop's exit steps (decoding.speculative_step / exit_guess_step) for one full-model call each and
compares both, in a shuffled order per round after a full-call plain pass, on the same artifact (.pte artifacts
with row_sdpa are exact through the full-model call too).

    taskset -c 0 python results/probes/plain_steps_without_match.py ART/pte [ROUNDS]
"""
import sys, random, statistics
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.data import prompt_set
from runtime.bench import encode_prompts
from runtime.decoding import DEFAULT_LOOKUP, GenerationConfig
import runtime.decoding as dm
from runtime.loader import open_artifact
from runtime.measure import run_pass
opened = open_artifact(sys.argv[1], threads=1)
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
prompts, _ = encode_prompts(opened, [q["prompt"] for q in prompt_set("humaneval")[:30]], 128)
base = dict(max_new_tokens=128, eos_token_ids=tuple(opened.eos_token_ids), lookup=DEFAULT_LOOKUP,
            num_speculations=opened.num_speculations, draft_threshold=opened.draft_threshold)
orig_spec, orig_guess = dm.speculative_step, dm.exit_guess_step
def plain(calls, chooser, token, pos, d):
    return dm.autoregressive_step(calls, chooser, token, pos, True)
variants = {"exit (today)": (orig_spec, orig_guess), "plain full call": (plain, plain)}
ratios = {k: [] for k in variants}; ref = None
for r in range(rounds):
    p = run_pass(opened.backend, prompts, GenerationConfig(**{**base, "lookup": 0}, self_speculative=False, full_model_baseline=True))
    ref = ref or p.tokens
    for name in random.Random(r).sample(list(variants), len(variants)):
        dm.speculative_step, dm.exit_guess_step = variants[name]
        res = run_pass(opened.backend, prompts, GenerationConfig(**base))
        dm.speculative_step, dm.exit_guess_step = orig_spec, orig_guess
        ratios[name].append(res.decode_tokens_per_s / p.decode_tokens_per_s)
        kinds = ", ".join(f"{k} {c['us_per_token']:.0f} us/token ({c['token_share']:.0%})" for k, c in sorted(res.steps_by_kind.items()))
        same = sum(x == y for x, y in zip(res.tokens, ref))
        print(f"round {r+1} {name}: {res.decode_tokens_per_s:.0f} tok/s vs plain {p.decode_tokens_per_s:.0f}: {ratios[name][-1]:.3f}x; {kinds}; {same}/30 identical", flush=True)
for k, v in ratios.items():
    print(f"median {statistics.median(v):.3f}x {k} ({' '.join(f'{x:.3f}' for x in v)})")
