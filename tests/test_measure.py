"""The benchmark's measuring instruments: held-out quality through a backend, peak RSS, predicted speedup."""

import numpy as np
import pytest
import torch

from models.checkpoint import load_model
from runtime import decoding, measure, rss
from runtime.eager import EagerBackend


def test_heldout_quality_through_chunked_calls_equals_one_full_forward(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    backend = EagerBackend(model, exit_layer=2, max_seq_len=64)
    backend.max_tokens_per_call = 7  # several draft+verify chunks per window
    rng = np.random.default_rng(0)
    windows = [rng.integers(2, model.config.vocab_size, size=40).tolist() for _ in range(2)]
    got = measure.heldout_quality(backend, windows)
    losses = []
    with torch.no_grad():
        for ids in windows:
            logits = model(torch.tensor([ids[:-1]]), torch.tensor([0]), caches=[])[0]  # no cache, one call
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
    assert got["tokens"] == 78
    assert got["loss"] == pytest.approx(float(sum(losses)) / 78, abs=1e-4)


def test_first_divergence_is_located_and_its_gap_read_from_plain_decodings_logits(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    backend = EagerBackend(model, exit_layer=2, max_seq_len=64)
    prompts = [[1, 5, 9, 14], [1, 7, 3]]
    cfg = measure.mode_config("ar", 1, 8, ())
    ar = measure.greedy_tokens(backend, prompts, cfg)
    spec = [list(ar[0]), list(ar[1])]
    spec[1][3] = (ar[1][3] + 1) % model.config.vocab_size  # self-speculation "chose" another token there
    spec[1][5] = (ar[1][5] + 1) % model.config.vocab_size  # only the first divergence counts
    got = measure.first_divergences(backend, prompts, spec, ar)
    with torch.no_grad():  # plain decoding's logits for token 3 of prompt 1, in one uncached call
        logits = model(torch.tensor([prompts[1] + ar[1][:3]]), torch.tensor([0]), caches=[])[0, -1]
    assert [(v["prompt"], v["index"], v["ar_token"], v["spec_token"]) for v in got] == [(1, 3, ar[1][3], spec[1][3])]
    assert got[0]["replayed"]
    assert got[0]["top"] == pytest.approx(float(logits[ar[1][3]]), abs=1e-4)
    assert got[0]["gap"] == pytest.approx(float(logits[ar[1][3]] - logits[spec[1][3]]), abs=1e-4)
    assert got[0]["gap"] >= 0


def test_benchmark_markdown_lists_each_artifacts_first_divergences():
    from runtime.bench import exactness_table

    divergence = {"prompt": 4, "index": 7, "ar_token": 11, "spec_token": 12, "top": 26.93, "gap": 0.1734,
                  "replayed": True}
    runs = [{"label": "pte int4", "prompts": 10,
             "modes": {"greedy_identical_fraction": 0.9, "greedy_divergences": [divergence],
                       "greedy_identical_to_full_call_fraction": 0.8}},
            {"label": "pte fp32", "prompts": 10, "modes": {"greedy_identical_fraction": 1.0, "greedy_divergences": []}}]
    lines = exactness_table(runs)
    assert "| pte int4 | 9 of 10 | 4: 7, 0.17 / 26.9 | 8 of 10 |" in lines
    assert "| pte fp32 | 10 of 10 | - | - |" in lines


def test_peak_rss_reset_sees_a_new_allocation():
    before = rss.reset_peak_rss()
    block = np.ones(200 * 2**20 // 8)  # 200 MB, touched
    assert rss.peak_rss_mb() - before >= 190
    del block


def test_predicted_speedup_is_tokens_per_step_times_cost_ratio():
    calls = {"draft_1": 1.0, "verify_3": 2.0, "ar_step_split": 4.0, "full_1": 3.0}
    # d=2, acceptance 0.5: 1 + 0.5 + 0.25 tokens per step; step = 3 drafts + verify(3) = 5; AR = 3 per token
    assert measure.predicted_speedup(calls, 2, 0.5) == pytest.approx(1.75 * 3.0 / 5.0)


def test_layer_bound_counts_layer_passes_per_token():
    # L=8, E=4, d=4: a step runs 5 x 4 draft layers + 4 verify layers = 24 layer passes; AR runs 8 per token.
    assert measure.layer_bound_speedup(8, 4, 4, 4.25) == pytest.approx(4.25 * 8 / 24)
    # every draft accepted at E=2, d=3: 4 tokens for 4 x 2 + 6 = 14 layer passes
    assert measure.layer_bound_speedup(8, 2, 3, 4.0) == pytest.approx(32 / 14)


def test_call_bound_is_the_layer_bounds_step_at_measured_call_costs():
    # calls that cost exactly their layers, whatever their rows: the layer bound (L=8, E=4, 2.5 drafts, 3 tokens)
    by_layers = {"draft_1": 4.0, "verify_1": 4.0, "verify_4": 4.0, "verify_5": 4.0, "full_1": 8.0, "ar_step_split": 8.0}
    assert measure.call_bound_speedup(by_layers, 2.5, 3.0) == pytest.approx(measure.layer_bound_speedup(8, 4, 2.5, 3.0))
    # 3.5 verify rows, between the measured verify_2 (2.5) and verify_4 (4.0): 3.625; step = 3.5 draft calls of 1 +
    # 3.625 = 7.125 for 3 tokens; plain is the cheaper of full (3) and split (3.5)
    calls = {"draft_1": 1.0, "verify_1": 2.0, "verify_2": 2.5, "verify_4": 4.0, "verify_5": 5.0, "full_1": 3.0,
             "ar_step_split": 3.5}
    assert measure.call_bound_speedup(calls, 2.5, 3.0) == pytest.approx(3 * 3.0 / 7.125)


def test_benchmark_rows_of_two_models_at_one_scheme_are_told_apart_by_path():
    from runtime.bench import label_by_path_where_alike

    runs = [{"label": "pte/xnnpack 8da4w", "artifact": "a/pte"}, {"label": "pte/xnnpack 8da4w", "artifact": "b/pte"},
            {"label": "onnx/onnxruntime int4", "artifact": "a/onnx"}]
    label_by_path_where_alike(runs)
    assert [r["label"] for r in runs] == ["pte/xnnpack 8da4w (a/pte)", "pte/xnnpack 8da4w (b/pte)",
                                          "onnx/onnxruntime int4"]


def test_the_lookup_mode_is_measured_beside_the_others_and_tabled(tiny_checkpoint):
    from runtime.bench import lookup_table

    model, _ = load_model(tiny_checkpoint)
    backend = EagerBackend(model, exit_layer=2, max_seq_len=192)
    prompts = [[0, 5, 9, 33, 70], [1, 7, 3, 7, 3]]
    out = measure.run_modes(backend, prompts, 3, 150, (), 1, lookup=4)
    lk = out[measure.LOOKUP_MODE]
    assert lk["greedy_identical_fraction"] == 1.0 and lk["greedy_identical_to_full_call_fraction"] == 1.0
    assert 0 < lk["lookup_step_fraction"] < 1
    assert lk["speedup"] == pytest.approx(lk["decode_tokens_per_s"] / max(out["ar"]["decode_tokens_per_s"],
                                                                          out["ar_full"]["decode_tokens_per_s"]))
    assert "lookup_step_fraction" not in out["spec"]
    assert lk["step_policy"] == {"lookup": 4, "lookup_run": 4, "lookup_run_match": decoding.RUN_MATCH,
                                 "lookup_fallback": 0, "exit_guesses": 0, "unmatched_step": "exit"}
    kinds = lk["steps_by_kind"]  # each kind of step's share of the tokens and its cost per token
    assert set(kinds) == {"lookup", "exit"} and sum(k["token_share"] for k in kinds.values()) == pytest.approx(1.0)
    assert all(k["us_per_token"] > 0 for k in kinds.values()) and set(out["spec"]["steps_by_kind"]) == {"exit"}
    lines = lookup_table([{"label": "eager", "prompts": 2, "modes": out}])
    assert lines[-1].startswith("| eager | ") and "| 2 of 2 | 2 of 2 |" in lines[-1]
    costs = (f"| {kinds['lookup']['us_per_token']:.0f} ({kinds['lookup']['token_share']:.0%}) / - / "
             f"{kinds['exit']['us_per_token']:.0f} ({kinds['exit']['token_share']:.0%}) / "
             f"{1e6 / out['ar_full']['decode_tokens_per_s']:.0f} |")
    assert costs in lines[-1]
    assert lookup_table([{"label": "eager", "prompts": 2, "modes": {"spec": out["spec"]}}]) == []
