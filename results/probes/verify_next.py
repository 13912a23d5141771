"""Probe (issue 12, "no wasted call"): would a verify that also runs layers [0, E) for the last draft
make a self-speculative step cheaper on the .pte than today's separate last draft call?

Exports the shipped model at 8da4w with today's draft / verify / forward methods plus `verify_next`
(token [1, 1], hidden [1, K, dim], input_pos) -> logits [1, K+1, vocab], which runs the prefix for the
token at position input_pos+K and the suffix over the K cached rows and that one. Then times, one
thread, the calls of a full d = 4 step interleaved as the decoding loop makes them (each method once per
round, 600 rounds, medians), after real tokens fill the caches up to the position:
    today:        5 draft calls + verify of 5 rows
    verify_next:  4 draft calls + verify_next of 4 cached rows and the 5th token

    python results/probes/verify_next.py export OUT.pte
    taskset -c 0 python results/probes/verify_next.py measure OUT.pte results/probe_verify_next.json
"""
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class VerifyNext(nn.Module):
    def __init__(self, model, exit_layer: int):
        super().__init__()
        self.model, self.exit_layer = model, exit_layer

    def forward(self, token, hidden, input_pos):
        m = self.model
        last = m.prefix(token, input_pos + hidden.shape[1], self.exit_layer, logits="none").hidden  # [1, 1, dim]
        return (m.suffix(torch.cat([hidden, last], 1), input_pos, self.exit_layer),)


def export(out: str) -> None:
    from torch.export import Dim
    from export.to_pte import lower, prepare_for_executorch, save, trace
    from models.checkpoint import load_model
    from quant.torchao_schemes import quantize_model

    model, _ = load_model("models/default")
    quantize_model(model, "int4", 0)  # the shipped layout: one scale per output channel
    prepare_for_executorch(model, 1024)
    programs = trace(model, ["draft", "verify", "forward"], 4, 64)
    with torch.no_grad():
        programs["verify_next"] = torch.export.export(
            VerifyNext(model, 4), (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 2, model.config.hidden_size),
                                   torch.tensor([0])),
            dynamic_shapes=(None, {1: Dim("rows", min=1, max=63)}, None), strict=False)
    save(lower(programs, "xnnpack", {"exit_layer": 4}), Path(out))


def measure(pte: str, out: str, positions=(50, 200, 300), rounds: int = 600, repeats: int = 3) -> None:
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    portable_lib._unsafe_reset_threadpool(1)
    program = Runtime.get().load_program(pte)
    methods = {n: program.load_method(n) for n in ("draft", "verify", "forward", "verify_next")}
    results = []
    for repeat in range(repeats):
        for p in positions:
            ids = torch.randint(0, 4000, (1, 64), generator=torch.Generator().manual_seed(p))
            for start in range(0, p + 8, 64):
                methods["forward"].execute((ids, torch.tensor([start])))
            hidden = torch.cat([methods["draft"].execute((ids[:, i:i + 1], torch.tensor([p + i])))[0].clone()
                                for i in range(5)], 1)  # [1, 5, dim]: real layer-E states
            token, pos, h4 = ids[:, 4:5].clone(), torch.tensor([p]), hidden[:, :4].contiguous()
            calls = {"draft": lambda: methods["draft"].execute((token, pos)),
                     "verify_5": lambda: methods["verify"].execute((hidden, pos)),
                     "verify_next_4+1": lambda: methods["verify_next"].execute((token, h4, pos)),
                     "full_1": lambda: methods["forward"].execute((token, pos))}
            times = {k: [] for k in calls}
            for _ in range(rounds):
                for k, fn in calls.items():
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            today, new = 5 * ms["draft"] + ms["verify_5"], 4 * ms["draft"] + ms["verify_next_4+1"]
            row = {"repeat": repeat, "position": p, **{k: round(v, 4) for k, v in ms.items()},
                   "step_today_ms": round(today, 4), "step_verify_next_ms": round(new, 4),
                   "verify_next_over_today": round(new / today, 3)}
            print(row, flush=True)
            results.append(row)
    Path(out).write_text(json.dumps({"machine": "AMD EPYC, 2 cores, taskset -c 0, one thread",
                                     "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": rounds,
                                     "rows": results}, indent=1))


if __name__ == "__main__":
    export(sys.argv[2]) if sys.argv[1] == "export" else measure(sys.argv[2], sys.argv[3])
