"""Probe: K and match length of a run (lookup_run, lookup_run_match) against a git revision's decoding loop,
alternated in one process on one artifact (medians of rounds, 30 HumanEval prompts x 128, tokens checked equal).

    taskset -c 0 python results/probes/lookup_runs.py ART --settings 12:8 12:6 [--against REV] [--rounds 4]

--against REV (default HEAD~1) loads that revision's runtime/decoding.py as it was (its own
defaults, e.g. 12 drafts after a fully accepted lookup step on the .pte before this rule).
"""
import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from models.data import prompt_set  # noqa: E402
from runtime import decoding  # noqa: E402
from runtime.bench import encode_prompts  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402


def decoding_at(revision: str):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:runtime/decoding.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "decoding_then.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("decoding_then", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["decoding_then"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("--settings", nargs="+", default=["12:8"], help="K:M")
    p.add_argument("--against", default="HEAD~1")
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    then = decoding_at(a.against)
    opened = open_artifact(a.artifact, threads=1)
    prompts, _ = encode_prompts(opened, [q["prompt"] for q in prompt_set("humaneval")[:30]], 128)
    base = dict(max_new_tokens=128, num_speculations=opened.num_speculations, draft_threshold=opened.draft_threshold,
                eos_token_ids=tuple(opened.eos_token_ids), lookup=decoding.DEFAULT_LOOKUP)

    def tok_per_s(module, cfg):
        tokens = seconds = 0.0
        out = []
        for ids in prompts:
            result = module.generate(opened.backend, ids, cfg)
            tokens, seconds = tokens + result.stats.generated_tokens - 1, seconds + result.stats.decode_time_s
            out.append(result.tokens)
        return tokens / seconds, out

    runs = {}
    for _ in range(a.rounds):
        speed, reference = tok_per_s(then, then.GenerationConfig(**base))
        runs.setdefault(f"{a.against}", []).append(speed)
        for setting in a.settings:
            k, m = (int(x) for x in setting.split(":"))
            speed, tokens = tok_per_s(decoding, decoding.GenerationConfig(**base, lookup_run=k, lookup_run_match=m))
            assert tokens == reference, f"K {k} M {m}: other tokens than {a.against}'s"
            runs.setdefault(f"K {k} M {m}", []).append(speed)
        plain = decoding.GenerationConfig(**{**base, "lookup": 0}, self_speculative=False, full_model_baseline=True)
        runs.setdefault("full-call plain", []).append(tok_per_s(decoding, plain)[0])
    plain = statistics.median(runs["full-call plain"])
    for name, speeds in runs.items():
        print(f"{name:16s} median {statistics.median(speeds):7.1f} tok/s, {statistics.median(speeds) / plain:.3f}x "
              f"full-call plain; rounds {[round(s) for s in speeds]}")


if __name__ == "__main__":
    main()
