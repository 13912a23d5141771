"""The benchmark's measuring instruments: held-out quality through a backend, peak RSS, predicted speedup."""

import numpy as np
import pytest
import torch

from models.checkpoint import load_model
from runtime import measure, rss
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


def test_benchmark_rows_of_two_models_at_one_scheme_are_told_apart_by_path():
    from runtime.bench import label_by_path_where_alike

    runs = [{"label": "pte/xnnpack 8da4w", "artifact": "a/pte"}, {"label": "pte/xnnpack 8da4w", "artifact": "b/pte"},
            {"label": "onnx/onnxruntime int4", "artifact": "a/onnx"}]
    label_by_path_where_alike(runs)
    assert [r["label"] for r in runs] == ["pte/xnnpack 8da4w (a/pte)", "pte/xnnpack 8da4w (b/pte)",
                                          "onnx/onnxruntime int4"]
