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
