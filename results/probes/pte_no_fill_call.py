"""Probe: issue 12's "no wasted call" on the .pte, measured.

Exports the default int4 .pte (custom_sdpa attention, as measured) with one more method, verify_last(hidden [1, k, dim], token [1, 1], input_pos)
-> (logits [1, k+1, V], hidden of the token [1, 1, dim]): layers [0, E) for the last draft at pos + k, then the
verify layers on the k cached rows and that one. A step that drafts all d tokens then makes d draft calls
and this call, instead of d + 1 draft calls and a verify. Measures the calls at position 200 and decode
tok/s of the two loops and full-call plain decoding, interleaved, on the first 30 HumanEval prompts x 128.

    python results/probes/pte_no_fill_call.py OUT_DIR [--repeats 5] --json F.json
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.export import Dim, export  # noqa: E402

import export.to_pte as to_pte  # noqa: E402
from export.pipeline import ExportConfig, run_export  # noqa: E402
from runtime import decoding, measure  # noqa: E402
from runtime.bench import encode_prompts, machine, prompt_set  # noqa: E402
from runtime.loader import open_artifact  # noqa: E402


class VerifyLast(nn.Module):
    def __init__(self, model, exit_layer):
        super().__init__()
        self.model, self.exit_layer = model, exit_layer

    def forward(self, hidden, token, input_pos):
        k = hidden.shape[1]
        last = self.model.prefix(token, input_pos + k, self.exit_layer, logits="none")
        return self.model.suffix(torch.cat([hidden, last.hidden], 1), input_pos, self.exit_layer), last.hidden


def trace_with_verify_last(trace):
    def traced(model, methods, exit_layer, max_tokens, draft_length=1):
        programs = trace(model, [m for m in methods if m != "verify_last"], exit_layer, max_tokens, draft_length)
        inputs = (torch.zeros(1, 2, model.config.hidden_size), torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
        with torch.no_grad():
            programs["verify_last"] = export(VerifyLast(model, exit_layer), inputs, strict=False,
                                             dynamic_shapes=({1: Dim("k", min=1, max=max_tokens - 1)}, None, None))
        return programs
    return traced


p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--json", required=True)
args = p.parse_args()

to_pte.trace = trace_with_verify_last(to_pte.trace)
run_export(ExportConfig(out=Path(args.out), backend="xnnpack", quant="int4", jobs=1, pte_attention="custom_sdpa",
                        methods=("draft", "verify", "forward", "verify_last")))  # as measured: one set of caches
opened = open_artifact(Path(args.out) / "pte", threads=1, preload=("draft", "verify", "forward", "verify_last"))
b = opened.backend


def verify_last(pos, k, token):
    hidden = torch.from_numpy(b.exit_cache[pos:pos + k][None])
    b._token_ids[0, 0] = token
    b._position_np[0] = pos
    logits, last = b._get("verify_last").execute((hidden, b._token_views[1], b._position))
    b.exit_cache[pos + k] = last.numpy()[0, 0]
    return logits.numpy()[0]


def step_without_fill_call(calls, chooser, token, pos, d):
    """Greedy speculative_step whose full-length drafts end in verify_last instead of a fill call + verify."""
    drafts, x, logits = [], token, None
    for k in range(d):
        drafted = chooser.choose(calls.draft([x], pos + k), chooser.cfg.draft_threshold)
        if drafted is None:
            logits = calls.verify(pos, len(drafts) + 1)
            break
        x = drafted[0]
        drafts.append(x)
    if logits is None:
        logits = calls._timed("verify", verify_last, pos, d, x)
    accepted, new = chooser.accept(drafts, [None] * len(drafts), logits)
    calls.stats.drafted += len(drafts)
    calls.stats.accepted += accepted
    calls.stats.early_stops += len(drafts) < d
    return accepted, new


pos = 200
for s in range(0, pos, 8):
    b.draft(list(range(5, 13)), s)
    b.verify(s, 8)
b.draft([5] * 6, pos)
calls = {"draft_1 + verify_5": measure._median_ms(lambda: (b.draft([5], pos + 4), b.verify(pos, 5)), 300),
         "verify_last (4 cached rows + 1)": measure._median_ms(lambda: verify_last(pos, 4, 5), 300)}

texts = [q["prompt"] for q in prompt_set("humaneval")[:30]]
prompts, _ = encode_prompts(opened, texts, 128)
eos = tuple(opened.eos_token_ids)
spec = measure.mode_config("spec", opened.num_speculations, 128, eos, opened.draft_threshold)
full = measure.mode_config("ar_full", opened.num_speculations, 128, eos, 0.0)
with_fill = decoding.speculative_step
runs, tokens = {"ar_full": [], "spec": [], "spec_without_fill_call": []}, {}
for r in range(args.repeats):
    runs["ar_full"].append(measure.run_pass(b, prompts, full).decode_tokens_per_s)
    one = measure.run_pass(b, prompts, spec)
    runs["spec"].append(one.decode_tokens_per_s)
    tokens["spec"] = one.tokens
    decoding.speculative_step = step_without_fill_call
    one = measure.run_pass(b, prompts, spec)
    decoding.speculative_step = with_fill
    runs["spec_without_fill_call"].append(one.decode_tokens_per_s)
    tokens["without"] = one.tokens
    print(f"[probe] repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()), file=sys.stderr, flush=True)
out = {"machine": machine(), "artifact": opened.facts, "calls_ms_at_200": calls, "decode_tokens_per_s_repeats": runs,
       "decode_tokens_per_s_median": {k: statistics.median(v) for k, v in runs.items()},
       "identical_tokens": sum(a == c for a, c in zip(tokens["spec"], tokens["without"])), "prompts": len(prompts)}
out["without_fill_call_over_spec"] = (out["decode_tokens_per_s_median"]["spec_without_fill_call"]
                                      / out["decode_tokens_per_s_median"]["spec"])
Path(args.json).write_text(json.dumps(out, indent=1))
print({k: round(v, 4) for k, v in calls.items()}, {k: round(v, 1) for k, v in out["decode_tokens_per_s_median"].items()},
      f"without fill call / spec {out['without_fill_call_over_spec']:.3f}, identical {out['identical_tokens']}/{len(prompts)}")
