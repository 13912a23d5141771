"""The evaluation's exact greedy-acceptance computation agrees with real self-speculative runs."""

import pytest
import torch

from conftest import tiny_model
from models.evaluate import exit_argmax, greedy_continuation, simulate_greedy_speculation
from runtime.decoding import GenerationConfig, generate
from runtime.eager import EagerBackend


@pytest.mark.parametrize("exit_layer,d", [(1, 2), (2, 4), (3, 6)])
def test_simulated_acceptance_equals_running_the_speculation(exit_layer, d):
    model = tiny_model()
    prompt, new_tokens = [0, 12, 40, 7, 99], 80
    tokens = greedy_continuation(model, prompt, new_tokens + d + 1)
    simulated = simulate_greedy_speculation(exit_argmax(model, tokens)[exit_layer - 1], tokens, len(prompt), d,
                                            new_tokens)
    real = generate(EagerBackend(model, exit_layer, 256), prompt,
                    GenerationConfig(max_new_tokens=new_tokens, num_speculations=d)).stats
    emitted = sum(k * v for k, v in real.tokens_per_step.items()) + 1
    assert simulated == (real.drafted, real.accepted, real.steps, emitted)
    assert 0 < real.accepted < real.drafted


def test_greedy_continuation_is_plain_greedy_decoding():
    model = tiny_model()
    prompt = [0, 3, 9]
    tokens = greedy_continuation(model, prompt, 20)
    with torch.no_grad():
        for t in range(len(prompt), len(tokens)):
            assert int(model(torch.tensor([tokens[:t]]), torch.tensor([0]))[0, -1].argmax()) == tokens[t]


def test_copy_sources_mark_what_an_induction_head_would_predict():
    from models.induction import copy_sources

    source, copyable = copy_sources([5, 6, 7, 5, 6, 9])
    assert source.tolist() == [-1, -1, -1, 1, 2]  # after the earlier 5 came position 1; after the 6, position 2
    assert copyable.tolist() == [False, False, False, True, False]  # 5 -> 6 repeats; 6 -> 7 does not (9 now)


def test_copyable_and_other_losses_recombine_to_each_exits_loss():
    import numpy as np

    from models.evaluate import exit_quality
    from models.induction import induction_report

    model = tiny_model()
    rng = np.random.default_rng(0)
    ids = np.tile(rng.integers(2, model.config.vocab_size, size=40), 12)  # repeats: many copyable tokens
    report = induction_report(model, ids, windows=3, seq_len=64)
    quality = exit_quality(model, ids, 64, 3)
    share = report["copyable_share"]
    assert 0.3 < share < 1
    for row in report["rows"]:
        mixed = share * row["loss_copyable"] + (1 - share) * row["loss_other"]
        assert mixed == pytest.approx(quality[row["layer"]]["loss"], rel=1e-4)
        assert 0 <= row["induction_score"] <= 1 and 0 <= row["previous_token_score"] <= 1
